//! Memory-efficient language-model loss: the LM head and the cross-entropy fused, row chunk
//! by row chunk, with recomputation in the backward, so no `tokens × vocab` matrix is ever
//! stored.
//!
//! The plain form (`log_softmax(h · W)` gathered at the targets) keeps the f32 logits and
//! log-probabilities of every position for the backward, and its backward materialises
//! several more vocabulary-wide matrices: at 16 384 tokens and a 49 152-word vocabulary each
//! is 3 GiB, more than the activations of some models' whole decoder. Here the forward
//! computes `chunk` rows of logits at a time and keeps only the per-row log-sum-exp; the
//! backward recomputes each chunk's logits and forms the softmax gradient in place:
//! `G = (exp(L − lse) − onehot(target)) · dnll`, `dH = G Wᵀ`, `dW = Hᵀ G`. Logits and
//! softmax are computed in f32 whatever the storage type.
//!
//! Per chunk, the rows' log-sum-exp, likelihood and argmax ([`ChunkedLossBackend::loss_rows`])
//! and the softmax gradient ([`ChunkedLossBackend::loss_rows_grad`]) are plain burn ops by
//! default ([`plain_rows`], [`plain_rows_grad`]: ndarray, burn's fusion backend, the tests'
//! reference) and one row kernel each on the cubecl backends (`kernel.rs`, launched from
//! `cube.rs`). [`ChunkedLossBackend::chunked_token_nll`]'s default method is the whole forward;
//! `Autodiff<B>` registers the recomputing backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor};

use crate::attention::{f32_of, float, prim};

mod cube;
pub mod kernel;

pub use cube::loss_kernels_enabled;

/// Bytes of f32 logits one chunk may hold: `MEFT_LOSS_CHUNK_MB` (default 256 MiB).
pub fn chunk_budget_bytes() -> usize {
    std::env::var("MEFT_LOSS_CHUNK_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

/// Rows per chunk for a `vocab`-wide head: as many as fit `budget` bytes of f32 logits, a
/// multiple of 16, at least 16.
pub fn chunk_rows(vocab: usize, budget: usize) -> usize {
    let per_row = (vocab * 4).max(1);
    (budget / per_row).max(16) / 16 * 16
}

/// Rows per chunk when `n` rows are cut into chunks of at most `chunk`: the same number of
/// chunks, of even size (a multiple of 16 where that stays within `chunk`), so the last one is
/// never a sliver — a chunk of a few rows costs a vocabulary-long product all the same (its
/// `dH = G Wᵀ` has a small output and a long inner dimension, which the matmul runs on few
/// cubes).
pub fn balanced_chunk(n: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk).max(1);
    let even = n.div_ceil(chunks);
    even.div_ceil(16).saturating_mul(16).min(chunk)
}

/// What the forward returns: per-row negative log-likelihood (f32 or f64), the per-row
/// log-sum-exp the backward needs, and the per-row argmax of the logits.
pub struct LossForward<B: Backend> {
    /// `−log softmax(h W)[target]` per row, `[rows]`.
    pub nll: Tensor<B, 1>,
    /// `log Σ exp(h W)` per row, `[rows]`.
    pub lse: Tensor<B, 1>,
    /// Index of the largest logit per row, `[rows]` (first on ties).
    pub best: Tensor<B, 1, Int>,
}

/// The chunked forward: `hidden` `[rows, d]`, `weight` `[d, vocab]` (the LM head's
/// `[d_in, d_out]` layout), `targets` `[rows]` in `0..vocab`. Each chunk's logits are one
/// matmul; their log-sum-exp, likelihood and argmax are [`ChunkedLossBackend::loss_rows`].
pub fn forward<B: ChunkedLossBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    chunk: usize,
) -> LossForward<B> {
    let [n, d] = hidden.dims();
    let (mut nll, mut lse, mut best) = (Vec::new(), Vec::new(), Vec::new());
    let chunk = balanced_chunk(n, chunk);
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let logits = hidden
            .clone()
            .slice([start..end, 0..d])
            .matmul(weight.clone());
        let t = targets.clone().narrow(0, start, end - start);
        let (l, z, b) = B::loss_rows(prim(logits), t.into_primitive());
        nll.push(float::<B, 1>(l));
        lse.push(float::<B, 1>(z));
        best.push(Tensor::<B, 1, Int>::from_primitive(b));
        start = end;
    }
    if n == 0 {
        let device = hidden.device();
        let dtype = f32_of(hidden.clone()).dtype();
        return LossForward {
            nll: Tensor::<B, 1>::zeros([0], &device).cast(dtype),
            lse: Tensor::<B, 1>::zeros([0], &device).cast(dtype),
            best: Tensor::zeros([0], &device),
        };
    }
    LossForward {
        nll: Tensor::cat(nll, 0),
        lse: Tensor::cat(lse, 0),
        best: Tensor::cat(best, 0),
    }
}

/// One chunk's rows in plain ops (the trait's default and the kernels' reference): `logits`
/// `[rows, vocab]` (any float type; computed in at least f32) and `targets` `[rows]` →
/// (`nll`, `lse`, `best`), each `[rows]`.
pub fn plain_rows<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1, Int>) {
    let logits = f32_of(logits);
    let max = logits.clone().detach().max_dim(1);
    let l = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.clone().gather(1, targets.unsqueeze_dim::<2>(1));
    let best = logits.argmax(1).squeeze_dim::<1>(1);
    let nll = (l.clone() - picked).squeeze_dim::<1>(1);
    (nll, l.squeeze_dim::<1>(1), best)
}

/// One chunk's softmax gradient in plain ops (the trait's default and the kernels'
/// reference): `(exp(logits − lse) − onehot(targets)) · dnll` as `dtype`; `lse`, `dnll`
/// `[rows]` in f32 (or f64).
pub fn plain_rows_grad<B: Backend>(
    logits: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    dnll: Tensor<B, 1>,
    targets: Tensor<B, 1, Int>,
    dtype: DType,
) -> Tensor<B, 2> {
    let g = dnll.unsqueeze_dim::<2>(1);
    let grad = (f32_of(logits) - lse.unsqueeze_dim::<2>(1)).exp() * g.clone();
    grad.scatter(
        1,
        targets.unsqueeze_dim::<2>(1),
        g.neg(),
        IndexingUpdateOp::Add,
    )
    .cast(dtype)
}

/// The recomputing backward: gradients of `Σ dnll · nll` with respect to `hidden` and (when
/// `want_weight`) `weight`, in their storage types.
pub fn backward<B: ChunkedLossBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    dnll: Tensor<B, 1>,
    chunk: usize,
    want_weight: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [n, d] = hidden.dims();
    let (hdtype, wdtype) = (hidden.dtype(), weight.dtype());
    let dnll = f32_of(dnll);
    let wt = weight.clone().transpose();
    let mut dh = Vec::new();
    let mut dw: Option<Tensor<B, 2>> = None;
    let chunk = balanced_chunk(n, chunk);
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let h = hidden.clone().slice([start..end, 0..d]);
        let logits = h.clone().matmul(weight.clone());
        let grad = float::<B, 2>(B::loss_rows_grad(
            prim(logits),
            prim(lse.clone().narrow(0, start, end - start)),
            prim(dnll.clone().narrow(0, start, end - start)),
            targets
                .clone()
                .narrow(0, start, end - start)
                .into_primitive(),
            hdtype,
        ));
        dh.push(grad.clone().matmul(wt.clone()));
        if want_weight {
            let part = f32_of(h.transpose().matmul(grad));
            dw = Some(match dw {
                Some(acc) => acc + part,
                None => part,
            });
        }
        start = end;
    }
    let dh = match n {
        0 => hidden.zeros_like(),
        _ => Tensor::cat(dh, 0),
    };
    let dw = want_weight.then(|| {
        dw.map(|d| d.cast(wdtype))
            .unwrap_or_else(|| weight.zeros_like())
    });
    (dh, dw)
}

/// burn backend extension: the LM head and cross-entropy fused (see the module docs).
pub trait ChunkedLossBackend: Backend {
    /// Per-row negative log-likelihood `[rows]` of `targets` under `softmax(hidden · weight)`
    /// (`hidden` `[rows, d]`, `weight` `[d, vocab]`), `chunk` rows at a time, and the per-row
    /// argmax (not differentiable); differentiable in `hidden` and `weight` on `Autodiff`
    /// backends, with a recomputing backward.
    fn chunked_token_nll(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let f = forward::<Self>(
            float(hidden),
            float(weight),
            Tensor::from_primitive(targets),
            chunk,
        );
        (prim(f.nll), f.best.into_primitive())
    }

    /// One chunk's per-row `(nll, lse, best)` from its `logits` `[rows, vocab]` (the head's
    /// storage type; the results are f32, or f64 for f64 logits) and `targets` `[rows]`
    /// ([`plain_rows`] by default; one row kernel on the cubecl backends).
    fn loss_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        let (nll, lse, best) = plain_rows::<Self>(float(logits), Tensor::from_primitive(targets));
        (prim(nll), prim(lse), best.into_primitive())
    }

    /// One chunk's softmax gradient `(exp(logits − lse) − onehot(targets)) · dnll` as `dtype`
    /// ([`plain_rows_grad`] by default; one row kernel on the cubecl backends).
    fn loss_rows_grad(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        prim(plain_rows_grad::<Self>(
            float(logits),
            float(lse),
            float(dnll),
            Tensor::from_primitive(targets),
            dtype,
        ))
    }
}

impl ChunkedLossBackend for burn::backend::NdArray<f32> {}
impl ChunkedLossBackend for burn::backend::NdArray<f64> {}
impl<B: burn_fusion::FusionBackend> ChunkedLossBackend for burn_fusion::Fusion<B> {}

#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    chunk: usize,
}

#[derive(Debug)]
struct LossBackward;

impl<B: ChunkedLossBackend> Backward<B, 2> for LossBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nh, nw] = ops.parents;
        let dnll = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dh, dw) = backward::<B>(
            float(s.hidden),
            float(s.weight),
            Tensor::from_primitive(s.targets),
            float(s.lse),
            float(dnll),
            s.chunk,
            nw.is_some(),
        );
        if let Some(node) = nh {
            grads.register::<B>(node.id, prim(dh));
        }
        if let (Some(node), Some(dw)) = (nw, dw) {
            grads.register::<B>(node.id, prim(dw));
        }
    }
}

impl<B: ChunkedLossBackend, C: CheckpointStrategy> ChunkedLossBackend for Autodiff<B, C> {
    fn chunked_token_nll(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let prep = LossBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        let (hp, wp) = (hidden.primitive, weight.primitive);
        let f = forward::<B>(
            float(hp.clone()),
            float(wp.clone()),
            Tensor::from_primitive(targets.clone()),
            chunk,
        );
        let best = f.best.into_primitive();
        let nll = prim(f.nll);
        let out = match prep {
            OpsKind::Tracked(prep) => {
                let state = Saved {
                    hidden: hp,
                    weight: wp,
                    targets,
                    lse: prim(f.lse),
                    chunk,
                };
                prep.finish(state, nll)
            }
            OpsKind::UnTracked(prep) => prep.finish(nll),
        };
        (out, best)
    }
}

/// Per-row next-token negative log-likelihood `[rows]` of `targets` under the LM head
/// `weight` `[d, vocab]` applied to `hidden` `[rows, d]`, and the per-row argmax, without
/// storing any `rows × vocab` matrix (chunk size from [`chunk_budget_bytes`]).
pub fn chunked_token_nll<B: ChunkedLossBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let chunk = chunk_rows(weight.dims()[1], chunk_budget_bytes());
    let (nll, best) =
        B::chunked_token_nll(prim(hidden), prim(weight), targets.into_primitive(), chunk);
    (float(nll), Tensor::from_primitive(best))
}
