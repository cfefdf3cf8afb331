//! Exact token informativeness: the attention a token receives at a layer.
//!
//! For key j, the probability mass that the queries able to see it (i ≥ j, causal) put on
//! it, averaged over those `T − j` queries and over heads. Tokens many queries attend to
//! carry information the layer uses; tokens nobody attends to can skip it. Computed from the
//! layer's normalised input without gradients, query chunk by query chunk (no `T × T`
//! matrix is kept), so it costs the layer's Q/K projections and one pass over its scores.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Tensor, TensorData};
use cube_kernels::attention::{chunk_budget_bytes, chunk_rows};

use crate::model::{Attention, RotaryEmbedding};

/// Attention received per token, `[batch, seq]` f32, for the normalised layer input `xn`
/// `[batch, seq, d]` (see the module docs).
pub fn attention_received<B: Backend>(
    attn: &Attention<B>,
    xn: Tensor<B, 3>,
    rope: &RotaryEmbedding<B>,
) -> Tensor<B, 2> {
    let xn = xn.detach();
    let [b, t, d] = xn.dims();
    let hd = d / attn.n_heads;
    let heads = |y: Tensor<B, 3>, h: usize| y.reshape([b, t, h, hd]).swap_dims(1, 2).detach();
    let q = rope.apply(heads(attn.wq.forward(xn.clone()), attn.n_heads), 0);
    let k = rope.apply(heads(attn.wk.forward(xn), attn.n_kv_heads), 0);
    let k = attn.repeat_kv(k);
    let h = attn.n_heads;
    let device = q.device();
    let scale = 1.0 / (hd as f64).sqrt();
    let chunk = chunk_rows(b * h, t, chunk_budget_bytes());
    let mut received = Tensor::<B, 4>::zeros([b, h, 1, t], (&device, DType::F32));
    for c0 in (0..t).step_by(chunk.max(1)) {
        let c1 = (c0 + chunk).min(t);
        let c = c1 - c0;
        let qc = q.clone().slice([0..b, 0..h, c0..c1, 0..hd]);
        let kc = k.clone().slice([0..b, 0..h, 0..c1, 0..hd]);
        let s = qc.matmul(kc.swap_dims(2, 3)).cast(DType::F32) * scale;
        let mask = Tensor::<B, 2, Bool>::tril_mask([c, c1], c0 as i64, &device)
            .unsqueeze::<4>()
            .expand([b, h, c, c1]);
        let p = softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3);
        let col = p.sum_dim(2);
        let part = [0..b, 0..h, 0..1, 0..c1];
        received = received
            .clone()
            .slice_assign(part.clone(), received.slice(part) + col);
    }
    let visible: Vec<f32> = (0..t).map(|j| (t - j) as f32).collect();
    let visible =
        Tensor::<B, 1>::from_data(TensorData::new(visible, [t]), &device).cast(DType::F32);
    received.mean_dim(1).reshape([b, t]) / visible.unsqueeze::<2>()
}
