//! A LLaMA-family decoder in plain burn modules, generic over the backend.
//!
//! Blocks are pre-norm: `h = x + Attn(RmsNorm(x))`, `y = h + Ffn(RmsNorm(h))`. Attention is
//! grouped-query and causal, with rotary position embeddings in the "rotate-half" (NeoX/HF)
//! form; the GGUF loader un-permutes llama.cpp's Q/K row order to match (see `load.rs`).
//! The FFN is its own module ([`FeedForward`]) inside an [`Ffn`] slot: the seam where adapters
//! attach (see `crate::adapter`); every projection is a LoRA-adaptable [`Projection`].

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Distribution, Int, Tensor, TensorData};

use super::config::LlamaConfig;
use std::sync::Arc;

use cube_kernels::attention::QueryPositions;
use cube_kernels::tokens::TokenPattern;

use super::ops::{self, causal_attention};
use crate::adapter::{DenseAdapterFfn, MeftFfn, Projection};
use crate::lemo::{Lemo, LemoAux, LemoMode};

/// Linear layer without bias, weight `[d_in, d_out]`.
pub(crate) fn linear<B: Backend>(weight: Tensor<B, 2>) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(weight),
        bias: None,
    }
}

/// A bias-free projection (LoRA-adaptable), weight `[d_in, d_out]`.
pub(crate) fn proj<B: Backend>(weight: Tensor<B, 2>) -> Projection<B> {
    Projection::new(linear(weight))
}

/// RMSNorm with the given scale.
pub(crate) fn rms_norm<B: Backend>(gamma: Tensor<B, 1>, eps: f64) -> RmsNorm<B> {
    RmsNorm {
        gamma: Param::from_tensor(gamma),
        epsilon: eps,
    }
}

/// Upcasts half-precision tensors to f32 for reductions; f32 and f64 stay as they are.
pub(crate) fn at_least_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.cast(DType::F32),
        _ => x,
    }
}

/// Root-mean-square norm `x / sqrt(mean(x²) + eps) · gamma`, reduced in at least f32 (burn's
/// own RmsNorm always reduces in f32, which would cap f64 gradient checks at f32 precision).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale.
    pub gamma: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub epsilon: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let rms = (at_least_f32(x.clone()).square().mean_dim(D - 1) + self.epsilon).sqrt();
        (x / rms.cast(dtype)) * self.gamma.val().unsqueeze()
    }
}

/// SiLU `x · σ(x)`. burn's sigmoid computes in f32; f64 tensors (used by gradient checks)
/// take an f64 formula instead.
pub(crate) fn silu_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F64 => x.clone() / (x.neg().exp() + 1.0),
        _ => silu(x),
    }
}

/// The SwiGLU feed-forward network: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Gate projection `[d, ffn]`.
    pub gate: Projection<B>,
    /// Up projection `[d, ffn]`.
    pub up: Projection<B>,
    /// Down projection `[ffn, d]`.
    pub down: Projection<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Random N(0, 0.02) weights at width `d` and hidden size `hidden`, frozen (for speed and
    /// memory work, where the values do not matter).
    pub fn init_random(d: usize, hidden: usize, device: &B::Device) -> Self {
        let w = |rows: usize, cols: usize| {
            proj(Tensor::<B, 2>::random(
                [rows, cols],
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        Self {
            gate: w(d, hidden),
            up: w(d, hidden),
            down: w(hidden, d),
        }
        .no_grad()
    }

    /// Model width d (the FFN's input width).
    pub fn d_model(&self) -> usize {
        self.gate.linear.weight.dims()[0]
    }
}

/// The FFN slot of a block: the base FFN alone, or wrapped with an adapter.
#[derive(Module, Debug)]
pub enum Ffn<B: Backend> {
    /// The base FFN.
    Base(FeedForward<B>),
    /// Base FFN + MEFT sparse adapter.
    Meft(MeftFfn<B>),
    /// Base FFN + dense parallel adapter.
    Dense(DenseAdapterFfn<B>),
}

impl<B: Backend> Ffn<B> {
    /// Applies the FFN (and its adapter) to `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Ffn::Base(f) => f.forward(x),
            Ffn::Meft(f) => f.forward(x),
            Ffn::Dense(f) => f.forward(x),
        }
    }

    /// The base FFN inside.
    pub fn base(&self) -> &FeedForward<B> {
        match self {
            Ffn::Base(f) => f,
            Ffn::Meft(f) => &f.base,
            Ffn::Dense(f) => &f.base,
        }
    }

    /// Takes the base FFN out (dropping any adapter).
    pub fn into_base(self) -> FeedForward<B> {
        match self {
            Ffn::Base(f) => f,
            Ffn::Meft(f) => f.base,
            Ffn::Dense(f) => f.base,
        }
    }
}

impl<B: Backend> FeedForward<B> {
    /// Applies the FFN to `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gated = silu_exact(self.gate.forward(x.clone())) * self.up.forward(x);
        self.down.forward(gated)
    }
}

/// Precomputed rotary embedding tables (`[max_seq, head_dim]`, rotate-half layout).
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Builds tables for positions `0..max_seq`.
    pub fn new(head_dim: usize, max_seq: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq * head_dim);
        let mut sin = Vec::with_capacity(max_seq * head_dim);
        for pos in 0..max_seq {
            for i in 0..head_dim {
                let freq = theta.powf(-2.0 * (i % half) as f64 / head_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 1>::from_floats(v.as_slice(), device).reshape([max_seq, head_dim])
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rotates `[batch, heads, seq, head_dim]` for positions `start..start + seq`.
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [_, _, seq, _] = x.dims();
        let cos = self.cos.clone().narrow(0, start, seq).unsqueeze::<4>();
        let sin = self.sin.clone().narrow(0, start, seq).unsqueeze::<4>();
        Self::rotate(x, cos, sin)
    }

    /// Rotates `[batch, heads, seq, head_dim]` for per-token positions `[batch, seq]` (the
    /// kept tokens of a LeMo layer keep their original positions).
    pub fn apply_at(&self, x: Tensor<B, 4>, positions: Tensor<B, 2, Int>) -> Tensor<B, 4> {
        let [b, seq] = positions.dims();
        let hd = x.dims()[3];
        let flat = positions.reshape([b * seq]);
        let table = |t: &Tensor<B, 2>| t.clone().select(0, flat.clone()).reshape([b, 1, seq, hd]);
        let (cos, sin) = (table(&self.cos), table(&self.sin));
        Self::rotate(x, cos, sin)
    }

    fn rotate(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
        let hd = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, hd / 2);
        let x2 = x.clone().narrow(3, hd / 2, hd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

/// Cache capacity grows in multiples of this many positions, so decoding steps reuse the
/// same tensor shapes (GPU kernels are compiled per shape class) instead of growing by one.
const CACHE_BLOCK: usize = 256;

/// Capacity a cache of capacity `cap` must have to hold `need` positions.
fn grown_capacity(cap: usize, need: usize) -> usize {
    if cap >= need {
        cap
    } else {
        need.max(2 * cap).div_ceil(CACHE_BLOCK) * CACHE_BLOCK
    }
}

/// The `[1, 1, t, cap]` attention mask of a decoding step: query `i` (absolute position
/// `start + i`) sees keys `0..=start + i`; later and unused slots are masked (`true`).
fn decode_mask<B: Backend>(
    start: usize,
    t: usize,
    cap: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mask: Vec<bool> = (0..t)
        .flat_map(|i| (0..cap).map(move |j| j > start + i))
        .collect();
    Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [t, cap]), device).reshape([1, 1, t, cap])
}

/// One layer's keys and values `[batch, kv_heads, capacity, head_dim]`; positions `len..`
/// are unused and masked out of attention.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> LayerCache<B> {
    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) after the cached positions, growing
    /// the buffers when needed; returns the full buffers.
    fn append(
        slot: &mut Option<Self>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, t, hd] = k.dims();
        let start = slot.as_ref().map_or(0, |c| c.len);
        let need = start + t;
        let cap = slot.as_ref().map_or(0, |c| c.k.dims()[2]);
        let mut cache = match slot.take() {
            Some(c) if cap >= need => c,
            old => {
                let new_cap = grown_capacity(cap, need);
                let device = k.device();
                let mut grown = Self {
                    k: Tensor::zeros([b, h, new_cap, hd], &device),
                    v: Tensor::zeros([b, h, new_cap, hd], &device),
                    len: start,
                };
                if let Some(old) = old.filter(|o| o.len > 0) {
                    let keep = [0..b, 0..h, 0..old.len, 0..hd];
                    grown.k = grown
                        .k
                        .slice_assign(keep.clone(), old.k.slice(keep.clone()));
                    grown.v = grown.v.slice_assign(keep.clone(), old.v.slice(keep));
                }
                grown
            }
        };
        let new = [0..b, 0..h, start..need, 0..hd];
        cache.k = cache.k.slice_assign(new.clone(), k);
        cache.v = cache.v.slice_assign(new, v);
        cache.len = need;
        let out = (cache.k.clone(), cache.v.clone());
        *slot = Some(cache);
        out
    }
}

/// What one layer needs for a cached decoding step: its cache slot and the step's mask.
pub type LayerStep<'a, B> = (&'a mut Option<LayerCache<B>>, &'a Tensor<B, 4, Bool>);

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
        }
    }
    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.k.dims()[2])
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.len)
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Grouped-query causal self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `[d, n_heads · head_dim]`.
    pub wq: Projection<B>,
    /// Key projection `[d, n_kv_heads · head_dim]`.
    pub wk: Projection<B>,
    /// Value projection `[d, n_kv_heads · head_dim]`.
    pub wv: Projection<B>,
    /// Output projection `[n_heads · head_dim, d]`.
    pub wo: Projection<B>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// Causal self-attention among the tokens of `x` `[batch, seq, d]` at their original
    /// `positions` `[batch, seq]` (ascending per input): a LeMo layer's kept tokens. Causal
    /// order among them is their order in `x`.
    pub fn forward_at(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        positions: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let (q, k, v) = self.project(x);
        let q = rope.apply_at(q, positions.clone());
        let k = rope.apply_at(k, positions);
        let out = causal_attention(q, k, v);
        self.wo.forward(out.swap_dims(1, 2).reshape([b, t, d]))
    }

    /// Attention of the kept tokens of a LeMo layer to the keys of *every* token: `xn`
    /// `[batch, seq, d]` is the normalised input of all tokens, `p` the kept tokens,
    /// `positions` their positions `[batch, kept]` and `bound` an upper bound of each kept
    /// row's position (see `cube_kernels::attention::QueryPositions`). Returns the kept tokens'
    /// outputs `[batch, kept, d]`. Queries are computed for the kept tokens only.
    pub fn forward_among(
        &self,
        xn: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        p: &TokenPattern<B>,
        positions: Tensor<B, 2, Int>,
        bound: Arc<Vec<usize>>,
    ) -> Tensor<B, 3> {
        let k = self.wk.forward(xn.clone());
        let v = self.wv.forward(xn.clone());
        self.attend_at(ops::gather(xn, p), k, v, rope, positions, bound)
    }

    /// Causal attention of the query rows `xq` `[batch, n, d]` (normalised inputs at
    /// `positions` `[batch, n]`, each row's position at most `bound[row]`) to the projected,
    /// not yet rotated keys and values `[batch, seq, kv_dim]` of every token. Returns
    /// `[batch, n, d]`.
    pub fn attend_at(
        &self,
        xq: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        positions: Tensor<B, 2, Int>,
        bound: Arc<Vec<usize>>,
    ) -> Tensor<B, 3> {
        let (k, v) = self.key_heads(k, v, rope);
        self.attend_heads_at(xq, k, v, rope, positions, bound)
    }

    /// The projected keys and values `[batch, seq, kv_dim]` as the attention reads them:
    /// `[batch, kv_heads, seq, head_dim]`, keys rotated to their positions `0..seq`.
    pub fn key_heads(
        &self,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, kv_dim] = k.dims();
        let hd = kv_dim / self.n_kv_heads;
        let heads = |y: Tensor<B, 3>| y.reshape([b, t, self.n_kv_heads, hd]).swap_dims(1, 2);
        (rope.apply(heads(k), 0), heads(v))
    }

    /// [`Attention::attend_at`] on keys and values already in [`Attention::key_heads`] form
    /// (so several query sets can share one rotation of the keys).
    pub fn attend_heads_at(
        &self,
        xq: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        rope: &RotaryEmbedding<B>,
        positions: Tensor<B, 2, Int>,
        bound: Arc<Vec<usize>>,
    ) -> Tensor<B, 3> {
        let [b, n, d] = xq.dims();
        let hd = d / self.n_heads;
        let q = self
            .wq
            .forward(xq)
            .reshape([b, n, self.n_heads, hd])
            .swap_dims(1, 2);
        let q = rope.apply_at(q, positions.clone());
        let at = QueryPositions {
            pos: positions,
            bound,
        };
        let out = ops::causal_attention_at(q, k, v, &at);
        self.wo.forward(out.swap_dims(1, 2).reshape([b, n, d]))
    }

    /// Query, key and value heads `[batch, heads, seq, head_dim]` of `x` (before rotation).
    pub fn project(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, d] = x.dims();
        let hd = d / self.n_heads;
        let heads = |y: Tensor<B, 3>, h: usize| y.reshape([b, t, h, hd]).swap_dims(1, 2);
        let q = heads(self.wq.forward(x.clone()), self.n_heads);
        let k = heads(self.wk.forward(x.clone()), self.n_kv_heads);
        let v = heads(self.wv.forward(x), self.n_kv_heads);
        (q, k, v)
    }

    /// Attends `[batch, seq, d]`; with a cache, the new keys/values are appended to it.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        cache: Option<LayerStep<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let (q, k, v) = self.project(x);

        let start = cache
            .as_ref()
            .and_then(|(c, _)| c.as_ref())
            .map_or(0, |c| c.len);
        let q = rope.apply(q, start);
        let k = rope.apply(k, start);
        let out = match cache {
            None => causal_attention(q, k, v),
            Some((slot, mask)) => {
                let (k, v) = LayerCache::append(slot, k, v);
                let mask = mask.clone().expand([b, self.n_heads, t, k.dims()[2]]);
                let opts = AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal: false,
                };
                attention(
                    q,
                    self.repeat_kv(k),
                    self.repeat_kv(v),
                    Some(mask),
                    None,
                    opts,
                )
            }
        };
        self.wo.forward(out.swap_dims(1, 2).reshape([b, t, d]))
    }

    /// Repeats each key/value head for the query heads that share it.
    pub fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        ops::repeat_kv(x, self.n_heads)
    }
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before the FFN.
    pub ffn_norm: RmsNorm<B>,
    /// The feed-forward network (with its adapter, if any).
    pub ffn: Ffn<B>,
}

impl<B: Backend> Block<B> {
    /// Applies the block to `[batch, seq, d]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        cache: Option<LayerStep<'_, B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + self.attn.forward(self.attn_norm.forward(x), rope, cache);
        h.clone() + self.ffn.forward(self.ffn_norm.forward(h))
    }
}

/// A LLaMA-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding `[vocab, d]`.
    pub embed: Embedding<B>,
    /// Decoder blocks.
    pub blocks: Vec<Block<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head `[d, vocab]`. For tied models it holds a transposed copy of the embedding
    /// (the base model is frozen, so the copies stay equal).
    pub lm_head: Linear<B>,
    /// Rotary tables.
    pub rope: RotaryEmbedding<B>,
    /// Longest supported sequence.
    pub max_seq_len: usize,
    /// LeMo token elimination (its pattern predictors), when attached for training.
    pub lemo: Option<Lemo<B>>,
}

/// A training batch for causal-LM loss: `targets[b, t]` is the token after `inputs[b, t]`,
/// and `target_mask[b, t]` is 1 where that target counts (answer tokens) and 0 elsewhere
/// (prompt and padding).
#[derive(Debug, Clone)]
pub struct CausalLmBatch<B: Backend> {
    /// Input ids `[batch, seq]`.
    pub inputs: Tensor<B, 2, Int>,
    /// Next-token ids `[batch, seq]`.
    pub targets: Tensor<B, 2, Int>,
    /// 1.0 where the target is in the loss, else 0.0, `[batch, seq]`.
    pub target_mask: Tensor<B, 2>,
}

impl<B: Backend> Llama<B> {
    /// A model with random weights (N(0, 0.02), norms 1) at the given geometry; for speed and
    /// memory work, where the values do not matter.
    pub fn init_random(cfg: &LlamaConfig, device: &B::Device) -> Self {
        let w = |rows: usize, cols: usize| {
            Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, 0.02), device)
        };
        let ones = |n: usize| Tensor::<B, 1>::ones([n], device);
        let (d, kv) = (cfg.d_model, cfg.n_kv_heads * cfg.head_dim());
        let blocks = (0..cfg.n_layers)
            .map(|_| Block {
                attn_norm: rms_norm(ones(d), cfg.norm_eps),
                attn: Attention {
                    wq: proj(w(d, d)),
                    wk: proj(w(d, kv)),
                    wv: proj(w(d, kv)),
                    wo: proj(w(d, d)),
                    n_heads: cfg.n_heads,
                    n_kv_heads: cfg.n_kv_heads,
                },
                ffn_norm: rms_norm(ones(d), cfg.norm_eps),
                ffn: Ffn::Base(FeedForward {
                    gate: proj(w(d, cfg.ffn_hidden)),
                    up: proj(w(d, cfg.ffn_hidden)),
                    down: proj(w(cfg.ffn_hidden, d)),
                }),
            })
            .collect();
        let embed = w(cfg.vocab_size, d);
        let lm_head = match cfg.tie_embeddings {
            true => embed.clone().transpose(),
            false => w(d, cfg.vocab_size),
        };
        Self {
            embed: Embedding {
                weight: Param::from_tensor(embed),
            },
            blocks,
            norm: rms_norm(ones(d), cfg.norm_eps),
            lm_head: linear(lm_head),
            rope: RotaryEmbedding::new(cfg.head_dim(), cfg.max_seq_len, cfg.rope_theta, device),
            max_seq_len: cfg.max_seq_len,
            lemo: None,
        }
    }

    /// Final hidden states `[batch, seq, d]` (after the last norm).
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let t = tokens.dims()[1];
        // One mask per step, shared by every layer (their caches grow in step).
        let mask = cache.as_deref().map(|c| {
            let cap = grown_capacity(c.capacity(), c.len() + t);
            decode_mask::<B>(c.len(), t, cap, &tokens.device())
        });
        let mut x = self.embed.forward(tokens);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache
                .as_deref_mut()
                .map(|c| &mut c.layers[i])
                .zip(mask.as_ref());
            x = block.forward(x, &self.rope, slot);
        }
        self.norm.forward(x)
    }

    /// Logits `[batch, seq, vocab]`. Callers check lengths first ([`Llama::check_length`]).
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.lm_head.forward(self.forward_hidden(tokens, cache))
    }

    /// Mean next-token cross-entropy over the masked-in targets (computed in at least f32).
    pub fn loss(&self, batch: &CausalLmBatch<B>) -> Tensor<B, 1> {
        self.loss_and_correct(batch).0
    }

    /// [`Llama::loss`] and the number of masked-in targets the model ranks first (greedy
    /// token accuracy's numerator, `[1]`, not differentiable).
    pub fn loss_and_correct(&self, batch: &CausalLmBatch<B>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let hidden = self.forward_hidden(batch.inputs.clone(), None);
        let [b, t, d] = hidden.dims();
        let (nll, best) = self.token_nll(
            hidden.reshape([b * t, d]),
            batch.targets.clone().reshape([b * t]),
        );
        let (nll, best) = (nll.reshape([b, t]), best.reshape([b, t]));
        let mask = batch.target_mask.clone().cast(nll.dtype());
        let hits = best.equal(batch.targets.clone()).float().cast(nll.dtype());
        let correct = (hits * mask.clone()).sum();
        let count = mask.clone().sum().clamp_min(1.0);
        ((nll * mask).sum() / count, correct)
    }

    /// Per-row next-token negative log-likelihood `[rows]` (at least f32) of `targets` under
    /// the LM head applied to final hidden states `hidden` `[rows, d]`, and the per-row argmax
    /// of the logits. The head and the cross-entropy are fused chunk by chunk on the extension
    /// backends ([`ops::token_nll`]): no `rows × vocab` logits are kept for the backward.
    pub fn token_nll(
        &self,
        hidden: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
    ) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
        let weight = self.lm_head.weight.val();
        match &self.lm_head.bias {
            // Heads built here have no bias; one with a bias takes the plain path.
            Some(bias) => {
                ops::plain_token_nll(hidden.matmul(weight) + bias.val().unsqueeze_dim(0), targets)
            }
            None => ops::token_nll(hidden, weight, targets),
        }
    }

    /// [`Llama::loss_and_correct`] computed only where it counts: the LM head and softmax run
    /// on the hidden states at `positions` (flat `batch · seq` indices of the in-loss targets)
    /// instead of at every position, which for answer-only losses saves most of the
    /// vocabulary-wide work and memory. `targets[i]` is the token after `positions[i]`.
    /// Equal to the masked loss of the same targets.
    pub fn selected_loss_and_correct(
        &self,
        inputs: Tensor<B, 2, Int>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let hidden = self.forward_hidden(inputs, None);
        self.selected_loss_on_hidden(hidden, positions, targets)
    }

    /// Final hidden states with the attached LeMo layers treated as `mode` says (the plain
    /// [`Llama::forward_hidden`] when no LeMo is attached or `mode` is off); `given`: the
    /// patterns of [`LemoMode::Given`] ([`crate::lemo::Lemo::forward_hidden_given`]).
    pub fn forward_hidden_lemo(
        &self,
        tokens: Tensor<B, 2, Int>,
        mode: LemoMode,
        given: &[(usize, TokenPattern<B>)],
    ) -> (Tensor<B, 3>, LemoAux<B>) {
        match (&self.lemo, mode) {
            (Some(lemo), m) if m != LemoMode::Off => {
                lemo.forward_hidden_given(self, tokens, m, given)
            }
            _ => (
                self.forward_hidden(tokens, None),
                LemoAux {
                    predictor_loss: None,
                    overlap: Vec::new(),
                },
            ),
        }
    }

    /// [`Llama::selected_loss_and_correct`] from final hidden states `[batch, seq, d]`.
    pub fn selected_loss_on_hidden(
        &self,
        hidden: Tensor<B, 3>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let (nll, correct) = self.selected_nll_on_hidden(hidden, positions, targets);
        let n = nll.dims()[0].max(1) as f64;
        (nll.sum() / n, correct)
    }

    /// The per-target negative log-likelihoods `[positions]` behind
    /// [`Llama::selected_loss_on_hidden`] (its loss is their mean) and the correct count.
    pub fn selected_nll_on_hidden(
        &self,
        hidden: Tensor<B, 3>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let [b, t, d] = hidden.dims();
        let picked_hidden = hidden.reshape([b * t, d]).select(0, positions);
        let (nll, best) = self.token_nll(picked_hidden, targets.clone());
        let correct = best.equal(targets).float().sum().cast(nll.dtype());
        (nll, correct)
    }

    /// Errors if `total` positions would exceed the model's context.
    pub fn check_length(&self, total: usize) -> Result<(), crate::Error> {
        if total > self.max_seq_len {
            return Err(crate::Error::ContextTooLong {
                tokens: total,
                max: self.max_seq_len,
            });
        }
        Ok(())
    }
}
