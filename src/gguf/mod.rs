//! A small, strict reader for GGUF v2/v3 files (the llama.cpp model format).
//!
//! We parse GGUF ourselves instead of pulling in a tensor framework: the format is simple,
//! and owning the parser lets every count and offset be checked against the file size before
//! anything is allocated, so a corrupt or hostile header is an error, never a panic or an
//! unbounded allocation.
//!
//! Layout: `magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | kv* | tensor_info* |
//! padding to alignment | tensor data`. All integers are little-endian.

mod dequant;
mod reader;

pub use dequant::{dequantize, GgmlType};
pub use reader::{GgufFile, MetadataValue, TensorInfo};

use thiserror::Error;

/// Everything that can go wrong while reading a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    /// The file could not be read.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// Path of the file.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic bytes are {0:?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    /// A GGUF version other than 2 or 3.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends before a structure it declares.
    #[error("GGUF file is truncated: needed {needed} bytes for {what} at offset {offset}, file has {len}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes needed.
        needed: u64,
        /// File length.
        len: u64,
    },
    /// A structural field holds an impossible value.
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    /// A tensor uses a ggml type this reader cannot dequantize.
    #[error("tensor '{name}' has ggml type {type_id} ({type_name}), which meft cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)")]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// Raw ggml type id.
        type_id: u32,
        /// Name of the type if known.
        type_name: &'static str,
    },
    /// A required metadata key is absent or has the wrong type.
    #[error("GGUF metadata key '{key}': {problem}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor is missing or has an unexpected shape.
    #[error("tensor '{name}': {problem}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}
