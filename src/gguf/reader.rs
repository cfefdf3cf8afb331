//! Parsing of the GGUF header, metadata and tensor table, with every size checked.

use std::collections::BTreeMap;
use std::path::Path;

use super::dequant::{dequantize, GgmlType};
use super::GgufError;

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays accepted in metadata (real files use 1).
const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions a tensor may declare (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// Unsigned integer (u8, u16, u32, u64 in the file).
    UInt(u64),
    /// Signed integer (i8, i16, i32, i64 in the file).
    Int(i64),
    /// Float (f32, f64 in the file).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::UInt(v) => Some(v),
            MetadataValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::Float(v) => Some(v),
            MetadataValue::UInt(v) => Some(v as f64),
            MetadataValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Byte range of the tensor's data within the file.
    pub data: std::ops::Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in row-major (burn) order: the reverse of ggml's order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    /// GGUF format version.
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: BTreeMap<String, MetadataValue>,
    /// Tensor table, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: Vec<u8>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| GgufError::Corrupt(format!("{what} is not valid UTF-8")))
    }

    /// Rejects a declared element count that cannot fit in what is left of the file.
    fn check_count(&self, count: u64, min_item_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(GgufError::Corrupt(format!(
                "{what} declares {count} entries, more than the {} bytes left in the file can hold",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetadataValue, GgufError> {
        use MetadataValue as V;
        let what = format!("metadata value of '{key}'");
        Ok(match type_id {
            0 => V::UInt(self.array::<1>(&what)?[0] as u64),
            1 => V::Int(self.array::<1>(&what)?[0] as i8 as i64),
            2 => V::UInt(u16::from_le_bytes(self.array(&what)?) as u64),
            3 => V::Int(i16::from_le_bytes(self.array(&what)?) as i64),
            4 => V::UInt(self.u32(&what)? as u64),
            5 => V::Int(i32::from_le_bytes(self.array(&what)?) as i64),
            6 => V::Float(f32::from_le_bytes(self.array(&what)?) as f64),
            7 => match self.array::<1>(&what)?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => return Err(GgufError::Corrupt(format!("{what}: bool byte {b}"))),
            },
            8 => V::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Corrupt(format!(
                        "{what}: arrays nested too deep"
                    )));
                }
                let item_type = self.u32(&what)?;
                let count = self.u64(&what)?;
                self.check_count(count, min_value_bytes(item_type), &what)?;
                // Grow as items parse, so a lying count cannot reserve memory up front.
                let mut items = Vec::with_capacity(count.min(4096) as usize);
                for _ in 0..count {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::UInt(self.u64(&what)?),
            11 => V::Int(i64::from_le_bytes(self.array(&what)?)),
            12 => V::Float(f64::from_le_bytes(self.array(&what)?)),
            t => {
                return Err(GgufError::Corrupt(format!(
                    "{what}: unknown metadata value type {t}"
                )))
            }
        })
    }
}

/// Smallest encoded size of one value of a metadata type (used to bound counts).
fn min_value_bytes(type_id: u32) -> u64 {
    match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

impl GgufFile {
    /// Reads and validates a GGUF file from disk.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(bytes)
    }

    /// Parses and validates a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        let magic: [u8; 4] = c.array("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A key/value pair needs at least 8 (key length) + 4 (type) + 1 bytes,
        // a tensor entry at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        c.check_count(n_kv, 13, "metadata table")?;
        c.check_count(n_tensors, 24, "tensor table")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let type_id = c.u32("metadata type")?;
            let value = c.value(type_id, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Corrupt(format!(
                    "duplicate metadata key '{key}'"
                )));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(GgufError::Metadata {
                        key: "general.alignment".into(),
                        problem: format!("must be a power of two, got {v:?}"),
                    })
                }
            },
        };

        let mut raw_infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Tensor {
                    name,
                    problem: format!("declares {n_dims} dimensions (1..={MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw_infos.push((name, dims, type_id, offset));
        }

        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, offset) in raw_infos {
            let ggml_type = GgmlType::from_id(type_id).ok_or(GgufError::UnsupportedTensorType {
                name: name.clone(),
                type_id,
                type_name: GgmlType::name_of(type_id),
            })?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| GgufError::Tensor {
                    name: name.clone(),
                    problem: format!("invalid dimensions {dims:?}"),
                })?;
            if dims[0] % ggml_type.block_size() != 0 {
                return Err(GgufError::Tensor {
                    name,
                    problem: format!(
                        "row length {} is not a multiple of the {:?} block size {}",
                        dims[0],
                        ggml_type,
                        ggml_type.block_size()
                    ),
                });
            }
            let n_bytes = n_elements / ggml_type.block_size() * ggml_type.block_bytes();
            if offset % alignment != 0 {
                return Err(GgufError::Tensor {
                    name,
                    problem: format!("data offset {offset} is not aligned to {alignment}"),
                });
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= file_len => (s, e),
                _ => {
                    return Err(GgufError::Truncated {
                        what: format!("data of tensor '{name}'"),
                        offset: data_start.saturating_add(offset),
                        needed: n_bytes,
                        len: file_len,
                    })
                }
            };
            let info = TensorInfo {
                name: name.clone(),
                dims,
                ggml_type,
                data: start as usize..end as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(GgufError::Corrupt(format!(
                    "duplicate tensor name '{name}'"
                )));
            }
        }

        Ok(Self {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::Metadata {
            key: key.to_string(),
            problem: "missing".into(),
        })
    }

    /// A required non-negative integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or_else(|| GgufError::Metadata {
            key: key.to_string(),
            problem: "expected a non-negative integer".into(),
        })
    }

    /// A required float metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or_else(|| GgufError::Metadata {
            key: key.to_string(),
            problem: "expected a number".into(),
        })
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?.as_str().ok_or_else(|| GgufError::Metadata {
            key: key.to_string(),
            problem: "expected a string".into(),
        })
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let bad = || GgufError::Metadata {
            key: key.to_string(),
            problem: "expected an array of strings".into(),
        };
        self.get(key)?
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| v.as_str().ok_or_else(bad))
            .collect()
    }

    /// The table entry of a tensor, or an error naming it.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors.get(name).ok_or_else(|| GgufError::Tensor {
            name: name.to_string(),
            problem: "missing from the file".into(),
        })
    }

    /// Dequantizes a tensor to f32, checking its row-major shape against `expected`.
    pub fn tensor_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor_info(name)?;
        if info.shape() != expected {
            return Err(GgufError::Tensor {
                name: name.to_string(),
                problem: format!(
                    "shape {:?} does not match the model config, expected {:?}",
                    info.shape(),
                    expected
                ),
            });
        }
        Ok(dequantize(
            info.ggml_type,
            &self.bytes[info.data.clone()],
            info.num_elements() as usize,
        ))
    }
}
