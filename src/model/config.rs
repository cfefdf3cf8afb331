//! `LlamaConfig`: the geometry of a LLaMA-family model, read from GGUF or from a preset.

use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};

/// Geometry of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size d.
    pub d_model: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when < `n_heads`).
    pub n_kv_heads: usize,
    /// Hidden size of the SwiGLU FFN.
    pub ffn_hidden: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Longest sequence the model supports (positions beyond are an error).
    pub max_seq_len: usize,
    /// Whether the LM head shares the token embedding matrix.
    pub tie_embeddings: bool,
}

/// A config that cannot describe a working model.
#[derive(Debug, thiserror::Error)]
#[error("invalid model config: {0}")]
pub struct ConfigError(pub String);

impl LlamaConfig {
    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        if self.vocab_size == 0 || self.d_model == 0 || self.n_layers == 0 || self.ffn_hidden == 0 {
            return fail(format!("sizes must be positive: {self:?}"));
        }
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return fail(format!(
                "d_model {} is not divisible by n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return fail(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.rope_theta > 0.0 && self.norm_eps > 0.0) || self.max_seq_len == 0 {
            return fail("rope_theta, norm_eps and max_seq_len must be positive".into());
        }
        Ok(())
    }

    /// Reads the geometry from `llama.*` GGUF metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, GgufError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::Metadata {
                key: "general.architecture".into(),
                problem: format!("'{arch}' is not supported (supported: llama)"),
            });
        }
        let u = |k: &str| gguf.get_u64(&format!("llama.{k}")).map(|v| v as usize);
        let n_heads = u("attention.head_count")?;
        let vocab_size = match gguf.get_u64("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => gguf.tensor_info("token_embd.weight")?.shape()[0],
        };
        let cfg = Self {
            vocab_size,
            d_model: u("embedding_length")?,
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads: u("attention.head_count_kv").unwrap_or(n_heads),
            ffn_hidden: u("feed_forward_length")?,
            rope_theta: gguf.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            norm_eps: gguf.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            max_seq_len: u("context_length")?,
            tie_embeddings: !gguf.tensors.contains_key("output.weight"),
        };
        cfg.validate().map_err(|e| GgufError::Metadata {
            key: "llama.*".into(),
            problem: e.0,
        })?;
        Ok(cfg)
    }

    /// SmolLM2-135M's geometry.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49_152,
            d_model: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            ffn_hidden: 1536,
            rope_theta: 100_000.0,
            norm_eps: 1e-5,
            max_seq_len: 8192,
            tie_embeddings: true,
        }
    }

    /// LLaMA-7B's geometry with a chosen number of layers (the real model has 32).
    pub fn llama_7b(n_layers: usize) -> Self {
        Self {
            vocab_size: 32_000,
            d_model: 4096,
            n_layers,
            n_heads: 32,
            n_kv_heads: 32,
            ffn_hidden: 11_008,
            rope_theta: 10_000.0,
            norm_eps: 1e-6,
            max_seq_len: 4096,
            tie_embeddings: false,
        }
    }
}
