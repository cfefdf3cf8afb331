//! Memory-efficient causal attention: query chunks in the forward, recomputation in the
//! backward, so no `T × T` matrix is ever stored.
//!
//! burn 0.21's autodiff attention is the decomposed fallback: it keeps the scores, the mask
//! and the probabilities of every layer for the backward (`~12·H·T²` bytes per layer, 7 GB
//! at T = 8192 with 9 heads), which makes long-context fine-tuning impossible whatever else
//! is saved. Here the forward runs query chunk by chunk (each chunk only against the keys it
//! may see), keeps only the output and the per-row log-sum-exp, and the backward recomputes
//! each chunk's probabilities (the FlashAttention recurrence, at the tensor-op level):
//! `P = exp(S − lse)`, `dV += Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS K·s`,
//! `dK += dSᵀ Q·s`. Scores and softmax are computed in f32 whatever the storage type.
//!
//! Keys and values may have fewer heads than the queries (grouped-query attention, as in
//! LLaMA-2/3 and SmolLM2): each key/value head serves its group of query heads in one matmul
//! and is kept once for the backward, never repeated.
//!
//! Queries may also be a subset of the keys' tokens at known positions ([`QueryPositions`]):
//! a LeMo layer whose kept tokens attend to the keys of every token — query row i sees the
//! keys at positions `0..=pos[i]`.
//!
//! Each chunk's softmax (forward) and scores' gradient (backward) are one row kernel each on
//! the cubecl backends ([`ChunkedAttentionBackend::causal_softmax`] and
//! [`ChunkedAttentionBackend::causal_softmax_grad`], `kernel.rs`): the causal mask comes from
//! each row's last visible key, and the plain ops' six to eight passes over the chunk's
//! scores become one. Their default methods are the same in plain burn ops (`reference.rs`,
//! the test oracle; ndarray and burn's fusion backend run them). The matmuls stay burn's.
//! [`ChunkedAttentionBackend::chunked_attention`]'s default method is the whole forward;
//! `Autodiff<B>` registers the recomputing backward.

mod cube;
pub mod kernel;
pub mod reference;

pub use cube::attention_kernels_enabled;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use std::sync::Arc;

use burn::tensor::ops::IntTensor;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};

pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Bytes of f32 scores one chunk may hold: `MEFT_ATTN_CHUNK_MB` (default 256 MiB).
pub fn chunk_budget_bytes() -> usize {
    std::env::var("MEFT_ATTN_CHUNK_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

/// Query rows per chunk for `batch · heads` score rows of `seq` keys: as many as fit the
/// budget, a multiple of 16, at least 16.
pub fn chunk_rows(batch_heads: usize, seq: usize, budget: usize) -> usize {
    let per_row = (batch_heads * seq * 4).max(1);
    let rows = (budget / per_row).max(16) / 16 * 16;
    rows.min(seq.max(1))
}

/// Where the query rows sit among the keys when they are not the keys' own tokens: the key
/// position of every query row, `[batch, queries]` (ascending per input), and a host-side
/// inclusive upper bound of the positions of each query row (non-decreasing), which limits the
/// keys a chunk of rows reads without reading the positions back.
#[derive(Debug, Clone)]
pub struct QueryPositions<B: Backend> {
    /// Key position of every query row, `[batch, queries]`.
    pub pos: Tensor<B, 2, Int>,
    /// Inclusive upper bound of the positions of query row i (over the batch), non-decreasing.
    pub bound: Arc<Vec<usize>>,
}

/// The causal structure: query i is key i ([`Causal::Square`]) or sits at given positions.
#[derive(Debug, Clone)]
enum Causal<B: Backend> {
    Square,
    At(QueryPositions<B>),
}

impl<B: Backend> Causal<B> {
    /// Square without positions, else at `pos` with `bound` (the form the autodiff state keeps).
    fn of(at: Option<(IntTensor<B>, Arc<Vec<usize>>)>) -> Self {
        match at {
            None => Causal::Square,
            Some((pos, bound)) => Causal::At(QueryPositions {
                pos: Tensor::from_primitive(pos),
                bound,
            }),
        }
    }

    /// Keys `0..end` that query rows `..c1` may see, out of `keys`.
    fn key_end(&self, c1: usize, keys: usize) -> usize {
        match self {
            Causal::Square => c1,
            Causal::At(p) => (p.bound[c1 - 1] + 1).min(keys),
        }
    }

    /// `[batch, c1 - c0]`: the last key each of the query rows `c0..c1` may see.
    fn limits(&self, b: usize, c0: usize, c1: usize, device: &B::Device) -> Tensor<B, 2, Int> {
        match self {
            // Copies by `cat`, not a broadcast view: with a broadcast view reshaped again,
            // burn's fusion backend gave wrong rows at batch 2 (seen in tests/lemo_kernels.rs).
            Causal::Square => {
                let row =
                    Tensor::<B, 1, Int>::arange(c0 as i64..c1 as i64, device).reshape([1, c1 - c0]);
                Tensor::cat(vec![row; b], 0)
            }
            Causal::At(p) => p.pos.clone().slice([0..b, c0..c1]),
        }
    }
}

pub(crate) fn f32_of<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F32 | DType::F64 => x,
        _ => x.cast(DType::F32),
    }
}

/// Causal attention of `q` `[batch, heads, seq, head_dim]` to `k`, `v` `[batch, kv_heads,
/// seq, head_dim]` (`kv_heads` divides `heads`; query head j reads key/value head
/// `j / (heads / kv_heads)`, grouped-query attention; query i sees keys `0..=i`), scale `1/sqrt(head_dim)`, `chunk` query rows at a time. Returns the output and
/// the per-row log-sum-exp `[batch, heads, seq, 1]` (f32, or f64 for f64 inputs).
pub fn forward<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    forward_masked(q, k, v, &Causal::Square, chunk)
}

/// [`forward`] for query rows `q` `[batch, heads, queries, head_dim]` at positions `at` among
/// the keys `k`, `v` `[batch, kv_heads, keys, head_dim]`: row i sees the keys `0..=pos[i]`.
pub fn forward_at<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    at: &QueryPositions<B>,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    forward_masked(q, k, v, &Causal::At(at.clone()), chunk)
}

fn forward_masked<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: &Causal<B>,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, hd] = q.dims();
    let g = Groups::of(h, &k);
    let keys = k.dims()[2];
    let dtype = q.dtype();
    let device = q.device();
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for c0 in (0..t).step_by(chunk.max(1)) {
        let c1 = (c0 + chunk).min(t);
        let end = causal.key_end(c1, keys);
        let qc = g.group(q.clone().slice([0..b, 0..h, c0..c1, 0..hd]));
        let kc = k.clone().slice([0..b, 0..g.kv, 0..end, 0..hd]);
        let vc = v.clone().slice([0..b, 0..g.kv, 0..end, 0..hd]);
        let s = qc.matmul(kc.swap_dims(2, 3));
        let [_, _, rc, _] = s.dims();
        let block = key_block(end);
        let limit = g.limits(causal, b, c0, c1, &device).into_primitive();
        let (p, lse) = B::causal_softmax(prim(s), limit, scale, dtype, block);
        // One matmul per key block, summed in f32: nb times the parallelism of one
        // `[rc, end] · [end, head_dim]` product, whose few output tiles leave most of the GPU idle.
        let o = f32_of(float::<B, 4>(p).matmul(in_blocks(vc, block)))
            .sum_dim(1)
            .reshape([b, g.kv, rc, hd])
            .cast(dtype);
        outs.push(g.ungroup(o));
        lses.push(g.ungroup(float::<B, 1>(lse).reshape([b, g.kv, rc, 1])));
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// Query heads sharing a key/value head (grouped-query attention): query head `j` reads
/// key/value head `j / rep`. A chunk's query rows `[batch, heads, c, ·]` are viewed as
/// `[batch, kv_heads, rep · c, ·]`, so one matmul per key/value head serves its whole group
/// and the keys and values are never repeated (nor saved repeated for the backward).
#[derive(Debug, Clone, Copy)]
struct Groups {
    kv: usize,
    rep: usize,
}

impl Groups {
    /// The grouping of `heads` query heads over the heads of `k` `[batch, kv_heads, ·, ·]`.
    fn of<B: Backend>(heads: usize, k: &Tensor<B, 4>) -> Self {
        let kv = k.dims()[1];
        assert!(
            kv > 0 && heads.is_multiple_of(kv),
            "attention: {heads} query heads do not share {kv} key/value heads evenly"
        );
        Groups {
            kv,
            rep: heads / kv,
        }
    }

    /// `[batch, heads, c, w]` → `[batch, kv_heads, rep · c, w]`.
    fn group<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.rep == 1 {
            return x;
        }
        let [b, _, c, w] = x.dims();
        x.reshape([b, self.kv, self.rep * c, w])
    }

    /// `[batch, kv_heads, rep · c, w]` → `[batch, heads, c, w]`.
    fn ungroup<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.rep == 1 {
            return x;
        }
        let [b, _, rc, w] = x.dims();
        x.reshape([b, self.kv * self.rep, rc / self.rep, w])
    }

    /// The last visible key of every grouped score row of query rows `c0..c1`, in the rows'
    /// order `[batch, kv_heads, rep · c]`, flattened.
    fn limits<B: Backend>(
        &self,
        causal: &Causal<B>,
        b: usize,
        c0: usize,
        c1: usize,
        device: &B::Device,
    ) -> Tensor<B, 1, Int> {
        let c = c1 - c0;
        let per_head = causal.limits(b, c0, c1, device).reshape([b, 1, c]);
        Tensor::cat(vec![per_head; self.kv * self.rep], 1).reshape([b * self.kv * self.rep * c])
    }
}

/// Keys per block for a chunk seeing `keys` keys: at most `MEFT_ATTN_KEY_BLOCK` (default
/// 1 024), blocks of equal size (a multiple of 16 when there are several), so a chunk's
/// products with the values and keys run as `keys / block` independent matmuls.
pub fn key_block(keys: usize) -> usize {
    let most = std::env::var("MEFT_ATTN_KEY_BLOCK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
        .max(16);
    let nb = keys.div_ceil(most).max(1);
    if nb == 1 {
        keys.max(1)
    } else {
        keys.div_ceil(nb).div_ceil(16) * 16
    }
}

/// Keys or values `[b, kv, keys, head_dim]` → `[b·kv, nb, block, head_dim]`, padded with zero
/// rows to `nb · block`.
fn in_blocks<B: Backend>(x: Tensor<B, 4>, block: usize) -> Tensor<B, 4> {
    let [b, kv, keys, hd] = x.dims();
    let nb = keys.div_ceil(block).max(1);
    let x = if nb * block > keys {
        let pad = Tensor::zeros([b, kv, nb * block - keys, hd], (&x.device(), x.dtype()));
        Tensor::cat(vec![x, pad], 2)
    } else {
        x
    };
    x.reshape([b * kv, nb, block, hd])
}

/// Gradients `(dq, dk, dv)` of [`forward`] for output gradient `dout`, recomputing each
/// chunk's probabilities from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    dout: Tensor<B, 4>,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    backward_masked(q, k, v, out, lse, dout, &Causal::Square, chunk)
}

#[allow(clippy::too_many_arguments)]
fn backward_masked<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    dout: Tensor<B, 4>,
    causal: &Causal<B>,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, hd] = q.dims();
    let g = Groups::of(h, &k);
    let keys = k.dims()[2];
    let dtype = q.dtype();
    let device = q.device();
    let acc = lse.dtype();
    let scale = 1.0 / (hd as f64).sqrt();
    let delta = (f32_of(dout.clone()) * f32_of(out)).sum_dim(3);
    let mut dq = Vec::new();
    let mut dk = Tensor::<B, 4>::zeros([b, g.kv, keys, hd], (&device, acc));
    let mut dv = Tensor::<B, 4>::zeros([b, g.kv, keys, hd], (&device, acc));
    for c0 in (0..t).step_by(chunk.max(1)) {
        let c1 = (c0 + chunk).min(t);
        let end = causal.key_end(c1, keys);
        let mine = [0..b, 0..h, c0..c1, 0..hd];
        let seen = [0..b, 0..g.kv, 0..end, 0..hd];
        let qc = g.group(q.clone().slice(mine.clone()));
        let kc = k.clone().slice(seen.clone());
        let vc = v.clone().slice(seen.clone());
        let doc = g.group(dout.clone().slice(mine));
        let s = qc.clone().matmul(kc.clone().swap_dims(2, 3));
        let dp = doc.clone().matmul(vc.swap_dims(2, 3));
        let [_, _, rc, _] = s.dims();
        let n = b * g.kv * rc;
        let block = key_block(end);
        let lse_c = g.group(lse.clone().slice([0..b, 0..h, c0..c1, 0..1]));
        let delta_c = g.group(delta.clone().slice([0..b, 0..h, c0..c1, 0..1]));
        let (p, ds) = B::causal_softmax_grad(
            prim(s),
            prim(dp),
            prim(lse_c.reshape([n])),
            prim(delta_c.reshape([n])),
            g.limits(causal, b, c0, c1, &device).into_primitive(),
            scale,
            dtype,
            block,
        );
        let (p, ds) = (float::<B, 4>(p), float::<B, 4>(ds));
        let nb = p.dims()[1];
        // dq: one matmul per key block, summed; dk, dv: each block's keys from its own matmul.
        let dq_c = f32_of(ds.clone().matmul(in_blocks(kc, block)))
            .sum_dim(1)
            .reshape([b, g.kv, rc, hd])
            .cast(dtype);
        dq.push(g.ungroup(dq_c));
        let per_block = |x: Tensor<B, 4>| {
            x.reshape([b * g.kv, 1, rc, hd])
                .expand([b * g.kv, nb, rc, hd])
        };
        let of_blocks = |x: Tensor<B, 4>| {
            f32_of(x)
                .reshape([b, g.kv, nb * block, hd])
                .slice([0..b, 0..g.kv, 0..end, 0..hd])
        };
        let dv_c = of_blocks(p.swap_dims(2, 3).matmul(per_block(doc)));
        let dk_c = of_blocks(ds.swap_dims(2, 3).matmul(per_block(qc)));
        dk = dk
            .clone()
            .slice_assign(seen.clone(), dk.slice(seen.clone()) + dk_c);
        dv = dv.clone().slice_assign(seen.clone(), dv.slice(seen) + dv_c);
    }
    (Tensor::cat(dq, 2), dk.cast(dtype), dv.cast(dtype))
}

/// burn backend extension: memory-efficient causal attention (see the module docs).
pub trait ChunkedAttentionBackend: Backend {
    /// Causal softmax of a chunk's scores `s` `[b, kv, rc, keys]` (unscaled `q·kᵀ`, any
    /// strides) times `scale`, row r (over `(b, kv, rc)`) seeing keys `0..=limit[r]` (`limit`
    /// `[rows]`): the probabilities as `dtype` (masked keys 0) in key blocks of `block`,
    /// `[b·kv, nb, rc, block]` (keys padded with zeros to `nb · block`), and the per-row
    /// log-sum-exp `[rows]` (f32; f64 for f64 scores).
    fn causal_softmax(
        s: FloatTensor<Self>,
        limit: IntTensor<Self>,
        scale: f64,
        dtype: DType,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (p, lse) = reference::causal_softmax::<Self>(
            float(s),
            Tensor::from_primitive(limit),
            scale,
            dtype,
            block,
        );
        (prim(p), prim(lse))
    }

    /// The backward of [`Self::causal_softmax`] for one chunk: the recomputed probabilities
    /// `p = exp(scale·s − lse)` and the scores' gradient `p ⊙ (dp − delta) · scale` (`dp` =
    /// `dO·Vᵀ` `[b, kv, rc, keys]`, `delta` = rowsum(dO ⊙ O) `[rows]`), both as `dtype` in key
    /// blocks of `block` as in [`Self::causal_softmax`], masked keys 0.
    #[allow(clippy::too_many_arguments)]
    fn causal_softmax_grad(
        s: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        limit: IntTensor<Self>,
        scale: f64,
        dtype: DType,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (p, ds) = reference::causal_softmax_grad::<Self>(
            float(s),
            float(dp),
            float(lse),
            float(delta),
            Tensor::from_primitive(limit),
            scale,
            dtype,
            block,
        );
        (prim(p), prim(ds))
    }

    /// Causal attention of `q` `[batch, heads, seq, head_dim]` to `k`, `v` `[batch,
    /// kv_heads, seq, head_dim]` (grouped query heads, see [`forward`]), `chunk` query rows at a
    /// time; differentiable on `Autodiff` backends (with a recomputing backward).
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        prim(forward::<Self>(float(q), float(k), float(v), chunk).0)
    }

    /// [`Self::chunked_attention`] for query rows at positions `pos` `[batch, queries]` among
    /// the keys (row i sees keys `0..=pos[i]`; `bound` as in [`QueryPositions`]).
    fn chunked_attention_at(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        pos: IntTensor<Self>,
        bound: Arc<Vec<usize>>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let at = QueryPositions {
            pos: Tensor::from_primitive(pos),
            bound,
        };
        prim(forward_at::<Self>(float(q), float(k), float(v), &at, chunk).0)
    }
}

impl ChunkedAttentionBackend for burn::backend::NdArray<f32> {}
impl ChunkedAttentionBackend for burn::backend::NdArray<f64> {}
impl<B: burn_fusion::FusionBackend> ChunkedAttentionBackend for burn_fusion::Fusion<B> {}

#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    at: Option<(IntTensor<B>, Arc<Vec<usize>>)>,
    chunk: usize,
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: ChunkedAttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nq, nk, nv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let causal = Causal::of(s.at);
        let (dq, dk, dv) = backward_masked::<B>(
            float(s.q),
            float(s.k),
            float(s.v),
            float(s.out),
            float(s.lse),
            float(dout),
            &causal,
            s.chunk,
        );
        if let Some(node) = nq {
            grads.register::<B>(node.id, prim(dq));
        }
        if let Some(node) = nk {
            grads.register::<B>(node.id, prim(dk));
        }
        if let Some(node) = nv {
            grads.register::<B>(node.id, prim(dv));
        }
    }
}

impl<B: ChunkedAttentionBackend, C: CheckpointStrategy> ChunkedAttentionBackend for Autodiff<B, C> {
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        tracked::<B, C>(q, k, v, None, chunk)
    }

    fn chunked_attention_at(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        pos: IntTensor<Self>,
        bound: Arc<Vec<usize>>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        tracked::<B, C>(q, k, v, Some((pos, bound)), chunk)
    }
}

/// The chunked forward on the inner backend, registered with the recomputing backward.
fn tracked<B: ChunkedAttentionBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    at: Option<(IntTensor<B>, Arc<Vec<usize>>)>,
    chunk: usize,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    let (qp, kp, vp) = (q.primitive, k.primitive, v.primitive);
    let causal = Causal::of(at.clone());
    let (out, lse) = forward_masked::<B>(
        float(qp.clone()),
        float(kp.clone()),
        float(vp.clone()),
        &causal,
        chunk,
    );
    let out = prim(out);
    match prep {
        OpsKind::Tracked(prep) => {
            let state = Saved {
                q: qp,
                k: kp,
                v: vp,
                out: out.clone(),
                lse: prim(lse),
                at,
                chunk,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Causal attention of `q` `[batch, heads, seq, head_dim]` to `k`, `v` `[batch, kv_heads,
/// seq, head_dim]` (grouped query heads, see [`forward`]) without storing scores
/// (chunk size from [`chunk_budget_bytes`]).
pub fn chunked_attention<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, _] = q.dims();
    let chunk = chunk_rows(b * h, t, chunk_budget_bytes());
    float(B::chunked_attention(prim(q), prim(k), prim(v), chunk))
}

/// [`chunked_attention`] for query rows at positions `at` among the keys `k`, `v`
/// `[batch, kv_heads, keys, head_dim]` (row i sees the keys `0..=pos[i]`).
pub fn chunked_attention_at<B: ChunkedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    at: &QueryPositions<B>,
) -> Tensor<B, 4> {
    let [b, h, _, _] = q.dims();
    let keys = k.dims()[2];
    let chunk = chunk_rows(b * h, keys, chunk_budget_bytes());
    float(B::chunked_attention_at(
        prim(q),
        prim(k),
        prim(v),
        at.pos.clone().into_primitive(),
        at.bound.clone(),
        chunk,
    ))
}
