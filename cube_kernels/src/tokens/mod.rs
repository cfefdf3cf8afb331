//! LeMo's token elimination kernels: segment-based, permutation-free selection of the kept
//! tokens, gather into a compact layout, and merge back into the residual stream.
//!
//! A sequence of `T` tokens is cut into segments of `S` tokens. Each segment keeps its `k`
//! highest-scoring tokens (ties go to the earlier token; a last, shorter segment keeps
//! `min(k, len)`), in their original order. Because every full segment keeps exactly `k`,
//! kept token `e` of segment `g` lands at compact slot `g·k + (kept tokens before e in g)`:
//! no sort and no global prefix sum, so one cube per segment builds its part of the
//! [`TokenPattern`] on its own ([`TokenSparsityBackend::segment_select`]).
//!
//! The pattern holds both directions of the map, flattened over the batch:
//! - `idx` `[B·K]`: for each compact slot, the flat row `b·T + t` it came from (ascending);
//! - `inv` `[B·T]`: for each row, its compact slot, or `B·K` (the *eliminated* value).
//!
//! [`gather_tokens`] copies the kept rows out (`x[idx]`); [`merge_tokens`] writes the
//! layer's results back: kept rows take the compact result, eliminated rows keep their input
//! (they pass through on the residual stream). Both read and write every row once, in row
//! order, and are exact copies (no arithmetic), so they are deterministic. Their backward
//! passes are the same two operations the other way round (see `backward.rs`).

mod backward;
pub(crate) mod forward;
mod fusion;
pub mod kernel;
pub mod reference;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};

use crate::SparseAdapterBackend;

/// Tokens one input keeps: `k` per full segment of `segment` tokens, `min(k, len)` in a last
/// shorter one (`k <= segment`).
pub fn kept_per_input(seq: usize, segment: usize, keep: usize) -> usize {
    if seq == 0 || segment == 0 {
        return 0;
    }
    let full = seq / segment;
    let last = seq % segment;
    full * keep.min(segment) + keep.min(last)
}

/// For each of the [`kept_per_input`] kept tokens of an input (in order), an inclusive upper
/// bound of its position: the last position of the segment it was kept from. Known without
/// reading the pattern back (what [`crate::attention::QueryPositions`] needs). When every
/// token is kept the bounds are the positions themselves.
pub fn kept_position_bounds(seq: usize, segment: usize, keep: usize) -> Vec<usize> {
    let keep = keep.min(segment);
    if keep == segment {
        return (0..seq).collect();
    }
    (0..kept_per_input(seq, segment, keep))
        .map(|i| (((i / keep.max(1)) + 1) * segment).min(seq) - 1)
        .collect()
}

/// The host version of [`TokenSparsityBackend::segment_select`] (the test oracle and the
/// ndarray path): `scores` `[batch, seq]` row-major → `(idx, inv)` as described in the
/// module docs.
pub fn select_segments_host(
    scores: &[f32],
    batch: usize,
    seq: usize,
    segment: usize,
    keep: usize,
) -> (Vec<i32>, Vec<i32>) {
    assert_eq!(scores.len(), batch * seq, "scores must be [batch, seq]");
    let kept = kept_per_input(seq, segment, keep);
    let sentinel = (batch * kept) as i32;
    let mut idx = vec![0i32; batch * kept];
    let mut inv = vec![sentinel; batch * seq];
    for b in 0..batch {
        let mut slot = b * kept;
        for start in (0..seq).step_by(segment.max(1)) {
            let len = segment.min(seq - start);
            let k = keep.min(len);
            let s = &scores[b * seq + start..][..len];
            // rank(e) = number of tokens that beat e (higher score, or equal and earlier).
            for e in 0..len {
                let rank = (0..len)
                    .filter(|&f| s[f] > s[e] || (s[f] == s[e] && f < e))
                    .count();
                if rank < k {
                    let row = b * seq + start + e;
                    idx[slot] = row as i32;
                    inv[row] = slot as i32;
                    slot += 1;
                }
            }
        }
    }
    (idx, inv)
}

/// Which tokens one layer keeps, for a `[batch, seq]` input (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenPattern<B: Backend> {
    /// `[batch · kept]` flat source row of each compact slot, ascending.
    pub idx: Tensor<B, 1, Int>,
    /// `[batch · seq]` compact slot of each row, `batch · kept` where eliminated.
    pub inv: Tensor<B, 1, Int>,
    /// Inputs.
    pub batch: usize,
    /// Tokens per input.
    pub seq: usize,
    /// Tokens kept per input.
    pub kept: usize,
}

impl<B: Backend> TokenPattern<B> {
    /// The pattern from host index lists (as [`select_segments_host`] returns them).
    pub fn from_host(
        idx: &[i32],
        inv: &[i32],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Self {
        assert_eq!(inv.len(), batch * seq, "inv must be [batch · seq]");
        assert_eq!(idx.len() % batch.max(1), 0, "idx must be [batch · kept]");
        let int1 = |v: &[i32]| {
            let data = burn::tensor::TensorData::new(v.to_vec(), [v.len()]).convert::<B::IntElem>();
            Tensor::<B, 1, Int>::from_data(data, device)
        };
        Self {
            idx: int1(idx),
            inv: int1(inv),
            batch,
            seq,
            kept: idx.len() / batch.max(1),
        }
    }
}

/// burn backend extension: token elimination's operations. The default methods are the
/// plain-op reference ([`reference`]); cubecl backends override the two primitive ones with
/// kernels, and `Autodiff` gives [`TokenSparsityBackend::gather_tokens`] and
/// [`TokenSparsityBackend::merge_tokens`] their backward.
pub trait TokenSparsityBackend: SparseAdapterBackend {
    /// Per segment top-`keep` of `scores` `[batch, seq]` → `(idx, inv)` (module docs).
    /// `1 <= keep <= segment`; scores must not be NaN.
    fn segment_select(
        scores: FloatTensor<Self>,
        segment: usize,
        keep: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        reference::segment_select::<Self>(scores, segment, keep)
    }

    /// Row `r` of the result is `comp[inv[r]]` where `inv[r] < kept_rows`, else `base[r]`;
    /// a missing `base` or `comp` reads as zeros. `[rows, width]`; not differentiable.
    fn token_merge(
        base: Option<FloatTensor<Self>>,
        comp: Option<FloatTensor<Self>>,
        inv: IntTensor<Self>,
        kept_rows: usize,
        width: usize,
    ) -> FloatTensor<Self> {
        reference::token_merge::<Self>(base, comp, inv, kept_rows, width)
    }

    /// `x[idx]` (`x` `[batch · seq, d]` → `[batch · kept, d]`); differentiable in `x`.
    fn gather_tokens(
        x: FloatTensor<Self>,
        idx: IntTensor<Self>,
        _inv: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::gather_rows(x, idx)
    }

    /// Kept rows from `comp`, eliminated rows from `base`; differentiable in both.
    fn merge_tokens(
        base: FloatTensor<Self>,
        comp: FloatTensor<Self>,
        _idx: IntTensor<Self>,
        inv: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        use burn::tensor::TensorMetadata;
        let kept_rows = comp.shape().dims::<2>()[0];
        let width = base.shape().dims::<2>()[1];
        Self::token_merge(Some(base), Some(comp), inv, kept_rows, width)
    }
}

impl TokenSparsityBackend for burn::backend::NdArray<f32> {}
impl TokenSparsityBackend for burn::backend::NdArray<f64> {}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The pattern of `scores` `[batch, seq]`: each segment of `segment` tokens keeps its `keep`
/// highest-scoring tokens (on the backend's selection kernel).
pub fn segment_select<B: TokenSparsityBackend>(
    scores: Tensor<B, 2>,
    segment: usize,
    keep: usize,
) -> TokenPattern<B> {
    let [batch, seq] = scores.dims();
    assert!(
        keep >= 1 && keep <= segment,
        "segment_select: need 1 <= keep ({keep}) <= segment ({segment})"
    );
    let (idx, inv) = B::segment_select(scores.into_primitive().tensor(), segment, keep);
    TokenPattern {
        idx: Tensor::from_primitive(idx),
        inv: Tensor::from_primitive(inv),
        batch,
        seq,
        kept: kept_per_input(seq, segment, keep),
    }
}

/// The kept rows of `x` `[batch, seq, d]` as `[batch, kept, d]`, in order.
pub fn gather_tokens<B: TokenSparsityBackend>(
    x: Tensor<B, 3>,
    p: &TokenPattern<B>,
) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let flat = x.reshape([b * t, d]).into_primitive().tensor();
    let out = B::gather_tokens(
        flat,
        p.idx.clone().into_primitive(),
        p.inv.clone().into_primitive(),
    );
    float::<B, 2>(out).reshape([b, p.kept, d])
}

/// `base` `[batch, seq, d]` with its kept rows replaced by `comp` `[batch, kept, d]`.
pub fn merge_tokens<B: TokenSparsityBackend>(
    base: Tensor<B, 3>,
    comp: Tensor<B, 3>,
    p: &TokenPattern<B>,
) -> Tensor<B, 3> {
    let [b, t, d] = base.dims();
    let base = base.reshape([b * t, d]).into_primitive().tensor();
    let comp = comp.reshape([b * p.kept, d]).into_primitive().tensor();
    let out = B::merge_tokens(
        base,
        comp,
        p.idx.clone().into_primitive(),
        p.inv.clone().into_primitive(),
    );
    float::<B, 2>(out).reshape([b, t, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_include_the_short_segment() {
        assert_eq!(kept_per_input(10, 4, 2), 2 + 2 + 2);
        assert_eq!(kept_per_input(9, 4, 2), 2 + 2 + 1);
        assert_eq!(kept_per_input(8, 4, 4), 8);
        assert_eq!(kept_per_input(0, 4, 2), 0);
    }

    #[test]
    fn host_selection_keeps_top_k_per_segment_in_order() {
        // 1 input, 7 tokens, segments of 3 keeping 2: [0.1 0.9 0.5 | 0.3 0.3 0.2 | 0.7].
        let s = [0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.7];
        let (idx, inv) = select_segments_host(&s, 1, 7, 3, 2);
        assert_eq!(idx, vec![1, 2, 3, 4, 6]);
        assert_eq!(inv, vec![5, 0, 1, 2, 3, 5, 4]);
    }

    #[test]
    fn host_selection_offsets_by_input() {
        let s = [1.0, 0.0, 0.0, 1.0];
        let (idx, inv) = select_segments_host(&s, 2, 2, 2, 1);
        assert_eq!(idx, vec![0, 3]);
        assert_eq!(inv, vec![0, 2, 2, 1]);
    }

    #[test]
    fn position_bounds_hold_for_every_selection() {
        for (seq, segment, keep) in [(10, 4, 2), (9, 4, 2), (7, 3, 3), (5, 8, 6), (16, 4, 1)] {
            let bounds = kept_position_bounds(seq, segment, keep);
            assert_eq!(bounds.len(), kept_per_input(seq, segment, keep));
            assert!(bounds.windows(2).all(|w| w[0] <= w[1]));
            for seed in 0..20u64 {
                let s: Vec<f32> = (0..seq as u64)
                    .map(|j| ((j * 7919 + seed * 104_729) % 97) as f32)
                    .collect();
                let (idx, _) = select_segments_host(&s, 1, seq, segment, keep);
                for (i, &pos) in idx.iter().enumerate() {
                    assert!(pos as usize <= bounds[i], "{seq}/{segment}/{keep}: row {i}");
                    assert!(bounds[i] < seq);
                    // The bound is the end of the row's own segment.
                    assert_eq!(bounds[i] / segment, pos as usize / segment);
                }
            }
        }
    }
}
