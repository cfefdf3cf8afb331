//! The plain-op reference of token elimination (the default methods of
//! [`TokenSparsityBackend`](super::TokenSparsityBackend), used by ndarray and by the tests):
//! selection on the host, gather with `select`, merge as a masked sum with a `select` over
//! the compact rows plus one zero row (which the eliminated value `B·K` points at).

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::select_segments_host;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Reads `scores` back and selects on the host ([`select_segments_host`]).
pub fn segment_select<B: Backend>(
    scores: FloatTensor<B>,
    segment: usize,
    keep: usize,
) -> (IntTensor<B>, IntTensor<B>) {
    let scores = float::<B, 2>(scores);
    let [batch, seq] = scores.dims();
    let device = scores.device();
    let host: Vec<f32> = scores
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 scores");
    let (idx, inv) = select_segments_host(&host, batch, seq, segment, keep);
    let int1 = |v: Vec<i32>| {
        let n = v.len();
        let data = TensorData::new(v, [n]).convert::<B::IntElem>();
        Tensor::<B, 1, Int>::from_data(data, &device).into_primitive()
    };
    (int1(idx), int1(inv))
}

/// `kept ? comp[inv] : base` per row, with burn ops (differentiable when called through
/// [`merge_tensors`]).
pub fn token_merge<B: Backend>(
    base: Option<FloatTensor<B>>,
    comp: Option<FloatTensor<B>>,
    inv: IntTensor<B>,
    kept_rows: usize,
    width: usize,
) -> FloatTensor<B> {
    let inv = Tensor::<B, 1, Int>::from_primitive(inv);
    let rows = inv.dims()[0];
    let dtype = base
        .as_ref()
        .or(comp.as_ref())
        .map(|t| t.dtype())
        .expect("token_merge needs base or comp");
    let device = inv.device();
    let mut out = Tensor::<B, 2>::zeros([rows, width], (&device, dtype));
    if let Some(base) = base {
        out = out + pass_through(float::<B, 2>(base), inv.clone(), kept_rows);
    }
    if let Some(comp) = comp {
        out = out + expand(float::<B, 2>(comp), inv);
    }
    out.into_primitive().tensor()
}

/// `base` with kept rows zeroed.
fn pass_through<B: Backend>(
    base: Tensor<B, 2>,
    inv: Tensor<B, 1, Int>,
    kept_rows: usize,
) -> Tensor<B, 2> {
    let eliminated = inv
        .greater_equal_elem(kept_rows as i64)
        .float()
        .cast(base.dtype());
    base * eliminated.unsqueeze_dim(1)
}

/// Compact rows at their original positions, zeros where eliminated.
fn expand<B: Backend>(comp: Tensor<B, 2>, inv: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [_, w] = comp.dims();
    let zero = Tensor::<B, 2>::zeros([1, w], (&comp.device(), comp.dtype()));
    Tensor::cat(vec![comp, zero], 0).select(0, inv)
}

/// Differentiable gather with burn ops: `x[idx]`.
pub fn gather_tensors<B: Backend>(x: Tensor<B, 2>, idx: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    x.select(0, idx)
}

/// Differentiable merge with burn ops: kept rows from `comp`, the rest from `base`.
pub fn merge_tensors<B: Backend>(
    base: Tensor<B, 2>,
    comp: Tensor<B, 2>,
    inv: Tensor<B, 1, Int>,
) -> Tensor<B, 2> {
    let kept_rows = comp.dims()[0];
    pass_through(base, inv.clone(), kept_rows) + expand(comp, inv)
}
