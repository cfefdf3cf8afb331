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

/// `[b, kv, rc, keys]` → `[b·kv, nb, rc, block]`: keys padded with zeros to `nb · block` and
/// cut into blocks of `block`.
pub fn key_blocks<B: Backend>(x: Tensor<B, 4>, block: usize) -> Tensor<B, 4> {
    let [b, kv, rc, keys] = x.dims();
    let nb = keys.div_ceil(block.max(1)).max(1);
    let x = x.reshape([b * kv, rc, keys]);
    let x = if nb * block > keys {
        let pad = Tensor::zeros([b * kv, rc, nb * block - keys], (&x.device(), x.dtype()));
        Tensor::cat(vec![x, pad], 2)
    } else {
        x
    };
    x.reshape([b * kv, rc, nb, block]).swap_dims(1, 2)
}

/// Rows of `s` `[b, kv, rc, keys]` as `[b·kv·rc, keys]` in f32 (f64 stays), scaled, with the
/// keys after each row's last visible key at −∞.
fn masked<B: Backend>(s: Tensor<B, 4>, limit: Tensor<B, 1, Int>, scale: f64) -> Tensor<B, 2> {
    let [b, kv, rc, keys] = s.dims();
    let rows = b * kv * rc;
    (f32_of(s.reshape([rows, keys])) * scale).mask_fill(later(limit, rows, keys), f32::NEG_INFINITY)
}

/// Causal softmax of the scores `s` `[b, kv, rc, keys]` scaled by `scale`, row r (over
/// `(b, kv, rc)`) seeing keys `0..=limit[r]`: the probabilities (masked keys 0) as `dtype`,
/// in key blocks `[b·kv, nb, rc, block]` ([`key_blocks`]), and the per-row log-sum-exp
/// `[rows]` (f32, or f64 for f64 scores).
pub fn causal_softmax<B: Backend>(
    s: Tensor<B, 4>,
    limit: Tensor<B, 1, Int>,
    scale: f64,
    dtype: DType,
    block: usize,
) -> (Tensor<B, 4>, Tensor<B, 1>) {
    let [b, kv, rc, keys] = s.dims();
    let s = masked(s, limit, scale);
    let m = s.clone().max_dim(1);
    let e = (s - m.clone()).exp();
    let l = e.clone().sum_dim(1);
    let p = (e / l.clone()).cast(dtype).reshape([b, kv, rc, keys]);
    (key_blocks(p, block), (m + l.log()).reshape([b * kv * rc]))
}

/// The backward rows: `p = exp(scale·s − lse)` (masked keys 0) and `ds = p ⊙ (dp − delta) ·
/// scale`, both as `dtype` in key blocks; `s`, `dp` `[b, kv, rc, keys]`, `lse`, `delta`
/// `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_grad<B: Backend>(
    s: Tensor<B, 4>,
    dp: Tensor<B, 4>,
    lse: Tensor<B, 1>,
    delta: Tensor<B, 1>,
    limit: Tensor<B, 1, Int>,
    scale: f64,
    dtype: DType,
    block: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let shape = s.dims();
    let [b, kv, rc, keys] = shape;
    let rows = b * kv * rc;
    let p = (masked(s, limit, scale) - lse.reshape([rows, 1])).exp();
    let dp = f32_of(dp.reshape([rows, keys]));
    let ds = p.clone() * (dp - delta.reshape([rows, 1])) * scale;
    let blocks = |x: Tensor<B, 2>| key_blocks(x.cast(dtype).reshape(shape), block);
    (blocks(p), blocks(ds))
}
