//! The plain-op versions of the row kernels (`kernel.rs`): the default methods of
//! [`super::ChunkedAttentionBackend`] (ndarray, burn's fusion backend, and `MEFT_ATTN_KERNELS=0`)
//! and the kernels' test oracle.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor};

use super::f32_of;

/// `[rows, keys]` mask, true where key `j` is later than the row's last visible key.
fn later<B: Backend>(limit: Tensor<B, 1, Int>, rows: usize, keys: usize) -> Tensor<B, 2, Bool> {
    let device = limit.device();
    Tensor::<B, 1, Int>::arange(0..keys as i64, &device)
        .reshape([1, keys])
        .expand([rows, keys])
        .greater(limit.reshape([rows, 1]).expand([rows, keys]))
}

/// Causal softmax of `s` `[rows, keys]` scaled by `scale`, row r seeing keys `0..=limit[r]`:
/// the probabilities (masked keys 0) as `dtype` and the per-row log-sum-exp `[rows]` (f32, or
/// f64 for f64 scores).
pub fn causal_softmax<B: Backend>(
    s: Tensor<B, 2>,
    limit: Tensor<B, 1, Int>,
    scale: f64,
    dtype: DType,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let [rows, keys] = s.dims();
    let s = (f32_of(s) * scale).mask_fill(later(limit, rows, keys), f32::NEG_INFINITY);
    let m = s.clone().max_dim(1);
    let e = (s - m.clone()).exp();
    let l = e.clone().sum_dim(1);
    let p = (e / l.clone()).cast(dtype);
    (p, (m + l.log()).reshape([rows]))
}

/// The backward rows: `p = exp(scale·s − lse)` (masked keys 0) and `ds = p ⊙ (dp − delta) ·
/// scale`, both as `dtype`; `lse`, `delta` `[rows]`.
pub fn causal_softmax_grad<B: Backend>(
    s: Tensor<B, 2>,
    dp: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    delta: Tensor<B, 1>,
    limit: Tensor<B, 1, Int>,
    scale: f64,
    dtype: DType,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [rows, keys] = s.dims();
    let s = (f32_of(s) * scale).mask_fill(later(limit, rows, keys), f32::NEG_INFINITY);
    let p = (s - lse.reshape([rows, 1])).exp();
    let ds = p.clone() * (f32_of(dp) - delta.reshape([rows, 1])) * scale;
    (p.cast(dtype), ds.cast(dtype))
}
