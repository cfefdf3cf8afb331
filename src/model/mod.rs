//! The LLaMA-family base model: config, modules, GGUF loading.

mod config;
mod llama;
mod load;
pub mod ops;

pub use config::{ConfigError, LlamaConfig};
pub use llama::{
    Attention, Block, CausalLmBatch, FeedForward, Ffn, KvCache, LayerCache, LayerStep, Llama,
    RmsNorm, RotaryEmbedding,
};
