//! Building a [`Llama`] from a GGUF file: tensor names, layouts and dequantization.

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::config::LlamaConfig;
use super::llama::{linear, rms_norm, Attention, Block, FeedForward, Ffn, Llama, RotaryEmbedding};
use crate::adapter::Projection;
use crate::gguf::{GgufError, GgufFile};

/// Uploads host data of the given shape to the device in the backend's float type.
fn upload<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    // Explicit dtype: a device's default dtype is set by the first backend that touches it.
    let data = TensorData::new(data, shape).convert::<B::FloatElem>();
    let dtype = data.dtype;
    Tensor::from_data(data, (device, dtype))
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// Undoes llama.cpp's Q/K row permutation so that rotate-half RoPE applies: GGUF stores each
/// head's rows as interleaved pairs `(i, i + hd/2)`; HF/NeoX order keeps the halves apart.
fn unpermute_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

struct Loader<'a, B: Backend> {
    gguf: &'a GgufFile,
    device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    /// A `[d_in, d_out]` linear weight from a GGUF `[d_out, d_in]` (row-major) tensor,
    /// optionally un-permuting Q/K rows for `heads` heads.
    fn linear(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
        heads: Option<usize>,
    ) -> Result<burn::nn::Linear<B>, GgufError> {
        let mut w = self.gguf.tensor_f32(name, &[d_out, d_in])?;
        if let Some(h) = heads {
            w = unpermute_rows(&w, h, d_out / h, d_in);
        }
        Ok(linear(upload(
            transpose(&w, d_out, d_in),
            [d_in, d_out],
            self.device,
        )))
    }

    fn vector(&self, name: &str, n: usize) -> Result<Tensor<B, 1>, GgufError> {
        Ok(upload(self.gguf.tensor_f32(name, &[n])?, [n], self.device))
    }
}

impl<B: Backend> Llama<B> {
    /// Loads a frozen (no-grad) model from a parsed GGUF file; every tensor's shape is
    /// checked against the config read from the file's metadata.
    pub fn from_gguf(
        gguf: &GgufFile,
        device: &B::Device,
    ) -> Result<(Self, LlamaConfig), GgufError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        let l = Loader::<B> { gguf, device };
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let kv = cfg.n_kv_heads * hd;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            blocks.push(Block {
                attn_norm: rms_norm(l.vector(&n("attn_norm"), d)?, cfg.norm_eps),
                attn: Attention {
                    wq: Projection::new(l.linear(&n("attn_q"), d, d, Some(cfg.n_heads))?),
                    wk: Projection::new(l.linear(&n("attn_k"), d, kv, Some(cfg.n_kv_heads))?),
                    wv: Projection::new(l.linear(&n("attn_v"), d, kv, None)?),
                    wo: Projection::new(l.linear(&n("attn_output"), d, d, None)?),
                    n_heads: cfg.n_heads,
                    n_kv_heads: cfg.n_kv_heads,
                },
                ffn_norm: rms_norm(l.vector(&n("ffn_norm"), d)?, cfg.norm_eps),
                ffn: Ffn::Base(FeedForward {
                    gate: Projection::new(l.linear(&n("ffn_gate"), d, cfg.ffn_hidden, None)?),
                    up: Projection::new(l.linear(&n("ffn_up"), d, cfg.ffn_hidden, None)?),
                    down: Projection::new(l.linear(&n("ffn_down"), cfg.ffn_hidden, d, None)?),
                }),
            });
        }
        let embed = gguf.tensor_f32("token_embd.weight", &[cfg.vocab_size, d])?;
        // A tied head is stored as its own transposed copy: the base is frozen, so the two
        // never diverge, and backends then multiply by a contiguous [d, vocab] matrix.
        let lm_head = if cfg.tie_embeddings {
            linear(upload(
                transpose(&embed, cfg.vocab_size, d),
                [d, cfg.vocab_size],
                device,
            ))
        } else {
            l.linear("output.weight", d, cfg.vocab_size, None)?
        };
        let model = Self {
            embed: Embedding {
                weight: Param::from_tensor(upload(embed, [cfg.vocab_size, d], device)),
            },
            blocks,
            norm: rms_norm(l.vector("output_norm.weight", d)?, cfg.norm_eps),
            lm_head,
            rope: RotaryEmbedding::new(hd, cfg.max_seq_len, cfg.rope_theta, device),
            max_seq_len: cfg.max_seq_len,
            lemo: None,
        };
        Ok((model.no_grad(), cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2); build it by hand.
        let (heads, hd, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let hf_row = h * hd + j * (hd / 2) + i;
                    let gg_row = h * hd + 2 * i + j;
                    gguf[gg_row * cols..(gg_row + 1) * cols]
                        .copy_from_slice(&hf[hf_row * cols..(hf_row + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, hd, cols), hf);
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }
}
