//! Backend-extension operations for model code that is generic over `B: Backend`:
//! memory-efficient causal attention and LeMo's token gather/merge/selection, routed at run
//! time (by type) to `cube_kernels`' implementations on the backends this crate ships —
//! ndarray (plain-op reference), wgpu and CUDA (kernels), each with or without autodiff
//! (and with burn's balanced activation checkpointing). Any other backend falls back to
//! burn's own attention and the plain-op reference, which is also what `MEFT_KERNELS=0`
//! selects for the token operations.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor};
use cube_kernels::attention::{chunked_attention, chunked_attention_at, QueryPositions};
use cube_kernels::loss::chunked_token_nll;
use cube_kernels::tokens::{kept_per_input, reference, segment_select, TokenPattern};

use super::llama::at_least_f32;
use crate::adapter::meft::compute::kernels_enabled;

fn cast<A: 'static, C: 'static>(a: A) -> C {
    *(Box::new(a) as Box<dyn Any>)
        .downcast::<C>()
        .expect("type checked by TypeId")
}

/// Calls `$mac!(T)` for every backend type with the extensions, bare and under autodiff.
macro_rules! extension_backends {
    ($mac:ident) => {
        extension_backends!(@each $mac, burn::backend::NdArray<f32>);
        extension_backends!(@each $mac, burn::backend::NdArray<f64>);
        #[cfg(feature = "wgpu")]
        extension_backends!(@each $mac, burn::backend::Wgpu<f32>);
        #[cfg(feature = "wgpu")]
        extension_backends!(@each $mac, burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>);
        #[cfg(feature = "cuda")]
        extension_backends!(@each $mac, burn::backend::Cuda<f32>);
        #[cfg(feature = "cuda")]
        extension_backends!(@each $mac, burn::backend::Cuda<half::bf16>);
        #[cfg(feature = "cuda")]
        extension_backends!(@each $mac, crate::backend::CudaUnfused<f32>);
        #[cfg(feature = "cuda")]
        extension_backends!(@each $mac, crate::backend::CudaUnfused<half::bf16>);
    };
    (@each $mac:ident, $t:ty) => {
        $mac!($t);
        $mac!(Autodiff<$t>);
        $mac!(Autodiff<$t, BalancedCheckpointing>);
    };
}

/// Whether backend `B` has the extensions (see the module docs).
pub fn has_extensions<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    macro_rules! check {
        ($t:ty) => {
            if id == TypeId::of::<$t>() {
                return true;
            }
        };
    }
    extension_backends!(check);
    false
}

/// False when `MEFT_ATTENTION=burn` asks for burn's own attention.
fn chunked_enabled() -> bool {
    !matches!(std::env::var("MEFT_ATTENTION").as_deref(), Ok("burn"))
}

/// True when `MEFT_ATTENTION=repeat-kv` asks the chunked attention to receive keys and values
/// repeated to every query head (the layout before grouped-query attention; for comparison).
fn repeat_kv_requested() -> bool {
    matches!(std::env::var("MEFT_ATTENTION").as_deref(), Ok("repeat-kv"))
}

/// Repeats each of the `kv_heads` heads of `x` `[batch, kv_heads, seq, head_dim]` for the
/// `heads / kv_heads` query heads that share it: `[batch, heads, seq, head_dim]`.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, kv, t, hd] = x.dims();
    let rep = heads / kv;
    if rep == 1 {
        return x;
    }
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, rep, t, hd])
        .reshape([b, kv * rep, t, hd])
}

/// Causal self-attention of `q` `[batch, heads, seq, head_dim]` to `k`, `v` `[batch,
/// kv_heads, seq, head_dim]` (`kv_heads` divides `heads`; query head j reads key/value head
/// `j / (heads / kv_heads)`; query i sees keys `0..=i`). On the extension backends it is the
/// memory-efficient chunked form (no `T × T` matrix kept for the backward, keys and values
/// kept once per key/value head); elsewhere burn's attention on repeated keys and values.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (k, v) = if repeat_kv_requested() {
        (repeat_kv(k, q.dims()[1]), repeat_kv(v, q.dims()[1]))
    } else {
        (k, v)
    };
    if chunked_enabled() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    return cast(chunked_attention::<$t>(cast(q), cast(k), cast(v)));
                }
            };
        }
        extension_backends!(run);
    }
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let h = q.dims()[1];
    attention(q, repeat_kv(k, h), repeat_kv(v, h), None, None, opts)
}

/// Causal attention of query rows `q` `[batch, heads, queries, head_dim]` sitting at
/// positions `at` among the keys `k`, `v` `[batch, kv_heads, keys, head_dim]` (grouped as in
/// [`causal_attention`]; row i sees keys
/// `0..=pos[i]`): a LeMo layer's kept tokens attending to every token. Chunked (no score
/// matrix kept) on the extension backends; elsewhere burn's attention with an explicit mask.
pub fn causal_attention_at<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    at: &QueryPositions<B>,
) -> Tensor<B, 4> {
    let (k, v) = if repeat_kv_requested() {
        (repeat_kv(k, q.dims()[1]), repeat_kv(v, q.dims()[1]))
    } else {
        (k, v)
    };
    if chunked_enabled() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    let at: &QueryPositions<$t> =
                        (at as &dyn Any).downcast_ref().expect("same type");
                    return cast(chunked_attention_at::<$t>(cast(q), cast(k), cast(v), at));
                }
            };
        }
        extension_backends!(run);
    }
    let [b, h, tq, _] = q.dims();
    let tk = k.dims()[2];
    let device = q.device();
    let pos = at.pos.clone().reshape([b, 1, tq, 1]).expand([b, h, tq, tk]);
    let mask = Tensor::<B, 1, Int>::arange(0..tk as i64, &device)
        .reshape([1, 1, 1, tk])
        .expand([b, h, tq, tk])
        .greater(pos);
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: false,
    };
    attention(q, repeat_kv(k, h), repeat_kv(v, h), Some(mask), None, opts)
}

/// False when `MEFT_LOSS=dense` asks for the plain LM head + log-softmax (for comparison).
fn chunked_loss_enabled() -> bool {
    !matches!(std::env::var("MEFT_LOSS").as_deref(), Ok("dense"))
}

/// Per-row next-token negative log-likelihood `[rows]` (at least f32) of `targets` `[rows]`
/// under the LM head `weight` `[d, vocab]` applied to `hidden` `[rows, d]`, and the per-row
/// argmax of the logits (not differentiable). On the extension backends the head and the
/// cross-entropy are fused chunk by chunk, with a recomputing backward
/// (`cube_kernels::loss`): no `rows × vocab` matrix is kept for the backward. Elsewhere (or
/// with `MEFT_LOSS=dense`) the plain `log_softmax(hidden · weight)`.
pub fn token_nll<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    if chunked_loss_enabled() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    let (nll, best) =
                        chunked_token_nll::<$t>(cast(hidden), cast(weight), cast(targets));
                    return (cast(nll), cast(best));
                }
            };
        }
        extension_backends!(run);
    }
    plain_token_nll(hidden.matmul(weight), targets)
}

/// Per-row negative log-likelihood `[rows]` of `targets` under `logits` `[rows, vocab]`
/// (computed in at least f32) and the per-row argmax: the plain `log_softmax` form.
pub fn plain_token_nll<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let logits = at_least_f32(logits);
    let best = logits.clone().detach().argmax(1).squeeze_dim::<1>(1);
    let nll = log_softmax(logits, 1)
        .gather(1, targets.unsqueeze_dim(1))
        .squeeze_dim::<1>(1)
        .neg();
    (nll, best)
}

fn token_kernels<B: Backend>() -> bool {
    kernels_enabled() && has_extensions::<B>()
}

/// Each segment of `segment` tokens of `scores` `[batch, seq]` keeps its `keep` best tokens
/// (`cube_kernels::tokens`): on the selection kernel where the backend has it, else on the
/// host.
pub fn select_tokens<B: Backend>(
    scores: Tensor<B, 2>,
    segment: usize,
    keep: usize,
) -> TokenPattern<B> {
    if token_kernels::<B>() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    return cast(segment_select::<$t>(cast(scores), segment, keep));
                }
            };
        }
        extension_backends!(run);
    }
    let [batch, seq] = scores.dims();
    let (idx, inv) =
        reference::segment_select::<B>(scores.into_primitive().tensor(), segment, keep);
    TokenPattern {
        idx: Tensor::from_primitive(idx),
        inv: Tensor::from_primitive(inv),
        batch,
        seq,
        kept: kept_per_input(seq, segment, keep),
    }
}

/// The kept tokens of `x` `[batch, seq, d]`, `[batch, kept, d]` in order (differentiable).
pub fn gather<B: Backend>(x: Tensor<B, 3>, p: &TokenPattern<B>) -> Tensor<B, 3> {
    if token_kernels::<B>() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    let p: &TokenPattern<$t> = (p as &dyn Any).downcast_ref().expect("same type");
                    return cast(cube_kernels::tokens::gather_tokens::<$t>(cast(x), p));
                }
            };
        }
        extension_backends!(run);
    }
    let [b, t, d] = x.dims();
    reference::gather_tensors(x.reshape([b * t, d]), p.idx.clone()).reshape([b, p.kept, d])
}

/// `base` `[batch, seq, d]` with its kept rows replaced by `comp` `[batch, kept, d]`; the
/// eliminated rows pass through unchanged (differentiable in both).
pub fn merge<B: Backend>(
    base: Tensor<B, 3>,
    comp: Tensor<B, 3>,
    p: &TokenPattern<B>,
) -> Tensor<B, 3> {
    if token_kernels::<B>() {
        let id = TypeId::of::<B>();
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    let p: &TokenPattern<$t> = (p as &dyn Any).downcast_ref().expect("same type");
                    return cast(cube_kernels::tokens::merge_tokens::<$t>(
                        cast(base),
                        cast(comp),
                        p,
                    ));
                }
            };
        }
        extension_backends!(run);
    }
    let [b, t, d] = base.dims();
    let comp = comp.reshape([b * p.kept, d]);
    reference::merge_tensors(base.reshape([b * t, d]), comp, p.inv.clone()).reshape([b, t, d])
}

/// Original positions of the kept tokens, `[batch, kept]` (from the flat rows in `p.idx`).
pub fn kept_positions<B: Backend>(p: &TokenPattern<B>) -> Tensor<B, 2, Int> {
    let device = p.idx.device();
    let offsets = Tensor::<B, 1, Int>::arange(0..p.batch as i64, &device).mul_scalar(p.seq as i64);
    p.idx.clone().reshape([p.batch, p.kept]) - offsets.unsqueeze_dim(1)
}
