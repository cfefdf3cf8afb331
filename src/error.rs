//! The crate-wide error type.

use crate::gguf::GgufError;
use crate::model::ConfigError;
use crate::tokenizer::TokenizerError;

/// Everything a meft operation can fail with, each naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A GGUF file is unreadable, corrupt or unsupported.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The tokenizer could not be built or used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A model config is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An adapter config is inconsistent (with itself or with the model it wraps).
    #[error("invalid adapter config: {0}")]
    AdapterConfig(String),
    /// A LeMo (token elimination) config is inconsistent.
    #[error("invalid LeMo config: {0}")]
    LemoConfig(String),
    /// The loss or a gradient is not finite.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// The input is longer than the model's context.
    #[error("input needs {tokens} positions but the model's context is {max} tokens")]
    ContextTooLong {
        /// Positions needed.
        tokens: usize,
        /// Model context length.
        max: usize,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} is out of range for a vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The host or the GPU has less memory than the run needs (both sizes named).
    #[error("not enough memory: {0}")]
    Resources(String),
    /// A request the chosen backend or build cannot serve.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

/// Result alias for meft operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
