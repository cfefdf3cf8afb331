//! safetensors files for checkpoints and adapter exports: written to a path and fsync'd (the
//! caller renames into place), read back with every tensor's dtype and size checked.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::{Error, Result};

/// A tensor to write: name, shape and little-endian bytes (f32 or u32).
pub struct Entry<'a> {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// Raw bytes.
    pub bytes: &'a [u8],
}

impl<'a> Entry<'a> {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &'a [f32]) -> Self {
        Self {
            name: name.into(),
            shape,
            dtype: Dtype::F32,
            bytes: bytemuck::cast_slice(values),
        }
    }

    /// A u32 tensor.
    pub fn u32(name: impl Into<String>, shape: Vec<usize>, values: &'a [u32]) -> Self {
        Self {
            name: name.into(),
            shape,
            dtype: Dtype::U32,
            bytes: bytemuck::cast_slice(values),
        }
    }
}

/// Writes `entries` with `metadata` to `path` and fsyncs it.
pub fn write(
    path: &Path,
    entries: Vec<Entry<'_>>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let err = |m: String| Error::Other(format!("writing {}: {m}", path.display()));
    let mut views = Vec::with_capacity(entries.len());
    for e in entries {
        let v = TensorView::new(e.dtype, e.shape, e.bytes)
            .map_err(|x| err(format!("tensor {}: {x}", e.name)))?;
        views.push((e.name, v));
    }
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|x| err(x.to_string()))?;
    sync_file(path)
}

/// fsyncs a file.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::Other(format!("syncing {}: {e}", path.display())))
}

/// A safetensors file read into memory.
pub struct TensorsFile {
    path: String,
    bytes: Vec<u8>,
}

impl TensorsFile {
    /// Reads and validates the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Other(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&path.display().to_string(), bytes)
    }

    /// Validates the header of a file already in memory (`origin` names it in errors).
    pub fn from_bytes(origin: &str, bytes: Vec<u8>) -> Result<Self> {
        let f = Self {
            path: origin.to_string(),
            bytes,
        };
        f.parsed()?;
        Ok(f)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| {
            Error::Other(format!(
                "{} is not a valid safetensors file: {e}",
                self.path
            ))
        })
    }

    /// The file's metadata.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, m) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::Other(format!("{}: {e}", self.path)))?;
        Ok(m.metadata().clone().unwrap_or_default())
    }

    /// Tensor names.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .parsed()?
            .names()
            .into_iter()
            .map(String::from)
            .collect())
    }

    fn view(&self, name: &str, dtype: Dtype) -> Result<(Vec<usize>, Vec<[u8; 4]>)> {
        let st = self.parsed()?;
        let v = st
            .tensor(name)
            .map_err(|_| Error::Other(format!("{}: no tensor {name}", self.path)))?;
        if v.dtype() != dtype {
            return Err(Error::Other(format!(
                "{}: tensor {name} is {:?}, expected {dtype:?}",
                self.path,
                v.dtype()
            )));
        }
        let words = v
            .data()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        Ok((v.shape().to_vec(), words))
    }

    /// An f32 tensor's shape and values.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (s, w) = self.view(name, Dtype::F32)?;
        Ok((s, w.into_iter().map(f32::from_le_bytes).collect()))
    }

    /// A u32 tensor's shape and values.
    pub fn u32(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>)> {
        let (s, w) = self.view(name, Dtype::U32)?;
        Ok((s, w.into_iter().map(u32::from_le_bytes).collect()))
    }
}
