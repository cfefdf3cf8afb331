//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of an asset under `assets/`, with a clear message when the assets were not fetched.
pub fn asset(rel: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(rel);
    assert!(
        path.exists(),
        "missing asset {}: run scripts/fetch-assets.sh first",
        path.display()
    );
    path
}

/// The SmolLM2-135M-Instruct GGUF.
pub fn smollm2() -> PathBuf {
    asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The tiny F16 LLaMA GGUF.
pub fn tinycoder() -> PathBuf {
    asset("tinycoder/tiny.gguf")
}

/// The committed reference fixture.
pub fn reference() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_logits.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Writes small GGUF files for tests: metadata strings/u32s and raw tensors.
#[derive(Default)]
pub struct GgufBuilder {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    /// Adds a string value.
    pub fn string(mut self, key: &str, v: &str) -> Self {
        let mut b = (v.len() as u64).to_le_bytes().to_vec();
        b.extend(v.as_bytes());
        self.kv.push((key.into(), 8, b));
        self
    }
    /// Adds a u32 value.
    pub fn u32(mut self, key: &str, v: u32) -> Self {
        self.kv.push((key.into(), 4, v.to_le_bytes().to_vec()));
        self
    }
    /// Adds a tensor with raw data bytes.
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, data));
        self
    }
    /// Serialises to GGUF v3 bytes (alignment 32).
    pub fn build(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kv {
            out.extend((k.len() as u64).to_le_bytes());
            out.extend(k.as_bytes());
            out.extend(t.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            data.extend(bytes);
            while !data.len().is_multiple_of(32) {
                data.push(0);
            }
            offset = data.len() as u64;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(data);
        out
    }
}

/// A tiny random-weight LLaMA geometry (d 16, GQA 2/1 heads, vocab 40) with `n_layers` blocks.
pub fn tiny_llama(n_layers: usize) -> meft::model::LlamaConfig {
    meft::model::LlamaConfig {
        vocab_size: 40,
        d_model: 16,
        n_layers,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_hidden: 32,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        max_seq_len: 32,
        tie_embeddings: true,
    }
}
