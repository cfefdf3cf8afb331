//! [`Lemo`]: the per-layer predictors and plan, and the model's forward with token
//! elimination.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use cube_kernels::tokens::TokenPattern;

use super::predictor::{bce_with_logits, PatternPredictor};
use super::score::attention_received;
use super::{Elimination, KeyScope, LemoConfig, PatternSource};
use crate::model::ops::{gather, kept_positions, merge, select_tokens};
use crate::model::{Block, Llama, RotaryEmbedding};
use crate::Result;

/// How a forward pass treats the LeMo layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LemoMode {
    /// No elimination: the plain model.
    Off,
    /// No elimination; each LeMo layer computes its exact pattern and its predictor's
    /// cross-entropy against it (warm-up / calibration).
    Calibrate,
    /// Eliminate with the exact pattern.
    Exact,
    /// Eliminate with the predicted pattern.
    Predicted,
    /// Eliminate with a random pattern drawn from this seed (mixed with the layer index).
    Random(u64),
    /// Eliminate with one random pattern drawn from this seed for every layer.
    RandomShared(u64),
    /// Eliminate with patterns the caller chose (one per keep budget, shared by every layer
    /// with that budget; [`Lemo::forward_hidden_given`]); the caller's choice is drawn from
    /// this seed where it is random.
    Given(u64),
}

impl LemoMode {
    /// The eliminating mode for `source` at training step `step` (random patterns are drawn
    /// from `seed` and `step`, so a resumed run draws the same ones).
    ///
    /// `source` as [`LemoConfig::pattern_source`] resolves it (`auto` is taken as
    /// `random-runs`, its value under the default backward elimination). Host-chosen sources
    /// (`difficulty`, `random-runs`) give [`LemoMode::Given`]: the caller builds the patterns.
    pub fn eliminating(source: PatternSource, seed: u64, step: usize) -> Self {
        match source {
            PatternSource::Predicted => LemoMode::Predicted,
            PatternSource::Exact => LemoMode::Exact,
            PatternSource::Random => LemoMode::Random(mix(seed, step as u64)),
            PatternSource::RandomShared => LemoMode::RandomShared(mix(seed, step as u64)),
            PatternSource::Difficulty | PatternSource::RandomRuns | PatternSource::Auto => {
                LemoMode::Given(mix(seed, step as u64))
            }
        }
    }
}

/// splitmix64 of `a` combined with `b`: a well-spread 64-bit hash.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Random scores `[batch, seq]` (f32) from `seed`, on `device`.
fn random_score_tensor<B: Backend>(
    seed: u64,
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let v = random_scores(seed, batch * seq);
    Tensor::<B, 2>::from_data(TensorData::new(v, [batch, seq]), device).cast(DType::F32)
}

/// `n` scores uniform in [0, 1), a pure function of `seed`.
pub fn random_scores(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| (mix(seed, i) >> 40) as f32 / (1u64 << 24) as f32)
        .collect()
}

/// Scores `[batch, seq]` (row-major) under which each `segment`-token segment keeps one
/// contiguous run: the segment's tokens score highest at a random offset (drawn from `seed`
/// per input and segment) and lower with each position after it, wrapping at the segment's
/// end — so the `k` best of a segment are the `k` positions from the offset on, for any `k`.
pub fn random_run_scores(seed: u64, batch: usize, seq: usize, segment: usize) -> Vec<f32> {
    let segment = segment.max(1);
    let per_input = seq.div_ceil(segment);
    let mut out = vec![0.0f32; batch * seq];
    for b in 0..batch {
        for (s, start) in (0..seq).step_by(segment).enumerate() {
            let n = segment.min(seq - start);
            let o = (mix(seed, (b * per_input + s) as u64) % n as u64) as usize;
            for j in 0..n {
                out[b * seq + start + j] = -(((j + n - o) % n) as f32);
            }
        }
    }
    out
}

/// Where and how much LeMo eliminates (plain values derived from [`LemoConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LemoPlan {
    /// Model layers that eliminate tokens, ascending.
    pub layers: Vec<usize>,
    /// Tokens kept per segment at each of those layers.
    pub keep: Vec<usize>,
    /// Tokens per segment.
    pub segment: usize,
    /// Leading tokens always kept.
    pub sink: usize,
    /// Trailing tokens always kept.
    pub recent: usize,
    /// Which keys kept tokens attend to.
    pub keys: KeyScope,
    /// What eliminated tokens do.
    pub eliminate: Elimination,
    /// Whether kept tokens' branch gradient is scaled by their inverse keep chance.
    pub rescale_gradient: bool,
    /// Whether eliminated tokens' keys and values stay in the graph.
    pub kv_graph: bool,
}

impl LemoPlan {
    /// The plan of `cfg` for a model of `n_layers` layers (validated).
    pub fn new(cfg: &LemoConfig, n_layers: usize) -> Result<Self> {
        cfg.validate(n_layers)?;
        let layers = cfg.layer_indices(n_layers)?;
        let keep = (0..layers.len()).map(|i| cfg.keep_per_segment(i)).collect();
        Ok(Self {
            layers,
            keep,
            segment: cfg.segment,
            sink: cfg.sink,
            recent: cfg.recent,
            keys: cfg.keys,
            eliminate: cfg.eliminate,
            rescale_gradient: cfg.rescale_gradient,
            kv_graph: cfg.kv_gradient,
        })
    }

    /// Upper bounds of the kept tokens' positions at layer slot `i` in a `seq`-token input
    /// (for attention to all keys).
    pub fn position_bounds(&self, i: usize, seq: usize) -> Arc<Vec<usize>> {
        Arc::new(cube_kernels::tokens::kept_position_bounds(
            seq,
            self.segment,
            self.keep[i],
        ))
    }

    /// Upper bounds of the eliminated tokens' positions at layer slot `i` (laid out as the
    /// pattern [`eliminated`] returns).
    pub fn eliminated_position_bounds(&self, i: usize, seq: usize) -> Arc<Vec<usize>> {
        Arc::new(cube_kernels::tokens::kept_position_bounds(
            seq,
            self.segment,
            self.segment - self.keep[i],
        ))
    }

    /// Per position of a `seq`-token input, the inverse of the chance that layer slot `i`
    /// keeps it when the non-forced tokens of each segment are kept uniformly at random:
    /// 1 for forced tokens (the first `sink`, the last `recent`) and in segments that keep
    /// every token; `(n − f) / (k − f)` for the others of a segment of `n` tokens, `f` forced,
    /// `k` kept. Where `k ≤ f` (a segment with more forced tokens than it keeps) the choice
    /// is not random and every scale there is 1.
    pub fn gradient_scale(&self, i: usize, seq: usize) -> Vec<f32> {
        let forced = |j: usize| j < self.sink || j + self.recent >= seq;
        let mut out = vec![1.0f32; seq];
        for start in (0..seq).step_by(self.segment.max(1)) {
            let end = (start + self.segment).min(seq);
            let n = end - start;
            let k = self.keep[i].min(n);
            let f = (start..end).filter(|&j| forced(j)).count();
            if k > f && k < n {
                let s = (n - f) as f32 / (k - f) as f32;
                for (j, o) in out.iter_mut().enumerate().take(end).skip(start) {
                    if !forced(j) {
                        *o = s;
                    }
                }
            }
        }
        out
    }

    /// Share of tokens layer slot `i` keeps in a `seq`-token input.
    pub fn kept_share(&self, i: usize, seq: usize) -> f64 {
        let k = cube_kernels::tokens::kept_per_input(seq, self.segment, self.keep[i]);
        k as f64 / seq.max(1) as f64
    }
}

/// What a LeMo forward pass reports besides the hidden states.
#[derive(Debug)]
pub struct LemoAux<B: Backend> {
    /// Sum over LeMo layers of the predictors' cross-entropy (calibration only).
    pub predictor_loss: Option<Tensor<B, 1>>,
    /// Per LeMo layer, the share of the exact pattern's kept tokens the predictor also
    /// keeps (calibration only; forced tokens excluded).
    pub overlap: Vec<f64>,
}

/// LeMo's trainable part (one pattern predictor per eliminating layer) and its plan.
#[derive(Module, Debug)]
pub struct Lemo<B: Backend> {
    /// Predictors, one per layer of `plan.layers`.
    pub predictors: Vec<PatternPredictor<B>>,
    /// Where and how much to eliminate.
    #[module(skip)]
    pub plan: LemoPlan,
}

impl<B: Backend> Lemo<B> {
    /// Fresh predictors for `model` as `cfg` asks.
    pub fn new(cfg: &LemoConfig, model: &Llama<B>, device: &B::Device) -> Result<Self> {
        let plan = LemoPlan::new(cfg, model.blocks.len())?;
        let d = model.embed.weight.dims()[1];
        let predictors = plan
            .layers
            .iter()
            .map(|&l| {
                PatternPredictor::new(
                    d,
                    cfg.predictor_hidden,
                    cfg.seed.wrapping_add(l as u64),
                    device,
                )
            })
            .collect();
        Ok(Self { predictors, plan })
    }

    /// `+1e30` at the always-kept positions of a `seq`-token input, else 0 (`[1, seq]`).
    fn forced_bias(&self, seq: usize, device: &B::Device) -> Tensor<B, 2> {
        let v: Vec<f32> = (0..seq)
            .map(|j| {
                let forced = j < self.plan.sink || j + self.plan.recent >= seq;
                if forced {
                    1e30
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::<B, 2>::from_data(TensorData::new(v, [1, seq]), device).cast(DType::F32)
    }

    fn pattern(&self, slot: usize, scores: Tensor<B, 2>, bias: &Tensor<B, 2>) -> TokenPattern<B> {
        let scores = scores.cast(DType::F32).detach() + bias.clone();
        select_tokens(scores, self.plan.segment, self.plan.keep[slot])
    }

    /// Final hidden states `[batch, seq, d]` of `model` for `tokens`, with the LeMo layers
    /// treated as `mode` says ([`LemoMode::Given`] has no patterns here and runs the plain
    /// model).
    pub fn forward_hidden(
        &self,
        model: &Llama<B>,
        tokens: Tensor<B, 2, Int>,
        mode: LemoMode,
    ) -> (Tensor<B, 3>, LemoAux<B>) {
        self.forward_hidden_given(model, tokens, mode, &[])
    }

    /// The patterns this plan's budgets keep under `scores` `[batch, seq]` (row-major, on the
    /// host): each segment keeps its highest-scoring tokens (forced ones first), one pattern
    /// per distinct keep budget, uploaded to `device` as [`LemoMode::Given`] takes them. Also
    /// returns the first budget's `inv` (compact slot per row, `batch · kept` where
    /// eliminated).
    pub fn patterns_from_scores(
        &self,
        scores: &[f32],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> (Vec<(usize, TokenPattern<B>)>, Vec<i32>) {
        let mut out: Vec<(usize, TokenPattern<B>)> = Vec::new();
        let mut first = Vec::new();
        for &keep in &self.plan.keep {
            if out.iter().any(|(k, _)| *k == keep) {
                continue;
            }
            let p = &self.plan;
            let (idx, inv) =
                super::select::select_kept(scores, batch, seq, p.segment, keep, p.sink, p.recent);
            if out.is_empty() {
                first = inv.clone();
            }
            let pattern = TokenPattern::from_host(&idx, &inv, batch, seq, device);
            out.push((keep, pattern));
        }
        (out, first)
    }

    /// [`Lemo::forward_hidden`] where [`LemoMode::Given`] eliminates with `given` (keep
    /// budget, pattern): a layer uses the pattern of its budget, and runs the plain layer if
    /// none is given for it.
    pub fn forward_hidden_given(
        &self,
        model: &Llama<B>,
        tokens: Tensor<B, 2, Int>,
        mode: LemoMode,
        given: &[(usize, TokenPattern<B>)],
    ) -> (Tensor<B, 3>, LemoAux<B>) {
        let [_, seq] = tokens.dims();
        let device = tokens.device();
        let mut aux = LemoAux {
            predictor_loss: None,
            overlap: Vec::new(),
        };
        let bias = (mode != LemoMode::Off).then(|| self.forced_bias(seq, &device));
        // `RandomShared`: the pattern of the last budget drawn (every layer shares the draw).
        let mut shared: Option<(usize, TokenPattern<B>)> = None;
        let mut x = model.embed.forward(tokens);
        for (i, block) in model.blocks.iter().enumerate() {
            let slot = self.plan.layers.iter().position(|&l| l == i);
            let (Some(slot), Some(bias)) = (slot, bias.as_ref()) else {
                x = block.forward(x, &model.rope, None);
                continue;
            };
            // A layer that keeps every token is the plain layer (no selection, gather or
            // merge; bit for bit the plain model's values and gradients).
            if self.plan.keep[slot] >= self.plan.segment && mode != LemoMode::Calibrate {
                x = block.forward(x, &model.rope, None);
                continue;
            }
            x = match mode {
                LemoMode::Off => unreachable!("no bias without LeMo"),
                LemoMode::Calibrate => {
                    let exact = exact_scores(block, x.clone(), &model.rope);
                    let truth = self.pattern(slot, exact, bias);
                    let logits = self.predictors[slot].forward(x.clone().detach());
                    let labels = kept_mask(&truth);
                    let loss = bce_with_logits(logits.clone().cast(DType::F32), labels);
                    aux.predictor_loss = Some(match aux.predictor_loss.take() {
                        Some(l) => l + loss,
                        None => loss,
                    });
                    let guess = self.pattern(slot, logits, bias);
                    aux.overlap.push(overlap(&truth, &guess, &self.plan));
                    block.forward(x, &model.rope, None)
                }
                LemoMode::Exact => {
                    let exact = exact_scores(block, x.clone(), &model.rope);
                    let p = self.pattern(slot, exact, bias);
                    self.eliminate_at(slot, block, x, &model.rope, &p)
                }
                LemoMode::Predicted => {
                    // Only the selection reads the logits: run the predictor untracked, so
                    // no graph (and none of its full-length activations) is kept.
                    let predictor = self.predictors[slot].clone().no_grad();
                    let logits = predictor.forward(x.clone().detach());
                    let p = self.pattern(slot, logits, bias);
                    self.eliminate_at(slot, block, x, &model.rope, &p)
                }
                LemoMode::Random(seed) => {
                    let scores =
                        random_score_tensor(mix(seed, i as u64), x.dims()[0], seq, &device);
                    let p = self.pattern(slot, scores, bias);
                    self.eliminate_at(slot, block, x, &model.rope, &p)
                }
                LemoMode::RandomShared(seed) => {
                    // One draw for every layer: select once per keep budget, reuse after.
                    let keep = self.plan.keep[slot];
                    let p = match &shared {
                        Some((k, p)) if *k == keep => p.clone(),
                        _ => {
                            let scores = random_score_tensor(seed, x.dims()[0], seq, &device);
                            let p = self.pattern(slot, scores, bias);
                            shared = Some((keep, p.clone()));
                            p
                        }
                    };
                    self.eliminate_at(slot, block, x, &model.rope, &p)
                }
                LemoMode::Given(_) => {
                    let keep = self.plan.keep[slot];
                    match given.iter().find(|(k, _)| *k == keep) {
                        Some((_, p)) => self.eliminate_at(slot, block, x, &model.rope, p),
                        None => block.forward(x, &model.rope, None),
                    }
                }
            };
        }
        (model.norm.forward(x), aux)
    }

    /// Layer slot `slot`'s `block` on `x` with the kept tokens `p`, as the plan says.
    fn eliminate_at(
        &self,
        slot: usize,
        block: &Block<B>,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding<B>,
        p: &TokenPattern<B>,
    ) -> Tensor<B, 3> {
        let seq = p.seq;
        let bound = self.plan.position_bounds(slot, seq);
        match self.plan.eliminate {
            Elimination::Layer => eliminate(block, x, rope, p, self.plan.keys, bound),
            Elimination::Backward => {
                let rest = eliminated(p, self.plan.segment, self.plan.keep[slot]);
                let rest_bound = self.plan.eliminated_position_bounds(slot, seq);
                let scale = self.plan.rescale_gradient.then(|| {
                    let v = self.plan.gradient_scale(slot, seq);
                    Tensor::<B, 1>::from_data(TensorData::new(v, [seq]), &x.device())
                        .cast(DType::F32)
                });
                eliminate_from_backward(
                    block,
                    x,
                    rope,
                    p,
                    bound,
                    &rest,
                    rest_bound,
                    scale,
                    self.plan.kv_graph,
                )
            }
        }
    }
}

fn exact_scores<B: Backend>(
    block: &Block<B>,
    x: Tensor<B, 3>,
    rope: &RotaryEmbedding<B>,
) -> Tensor<B, 2> {
    attention_received(&block.attn, block.attn_norm.forward(x.detach()), rope)
}

/// 1.0 where `p` keeps the token, else 0.0, `[batch, seq]` f32.
pub fn kept_mask<B: Backend>(p: &TokenPattern<B>) -> Tensor<B, 2> {
    let sentinel = (p.batch * p.kept) as i64;
    p.inv
        .clone()
        .lower_elem(sentinel)
        .float()
        .cast(DType::F32)
        .reshape([p.batch, p.seq])
}

/// Share of `truth`'s kept, non-forced tokens that `guess` also keeps.
fn overlap<B: Backend>(truth: &TokenPattern<B>, guess: &TokenPattern<B>, plan: &LemoPlan) -> f64 {
    let read = |p: &TokenPattern<B>| -> Vec<i64> {
        p.inv
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap_or_default()
    };
    let (t, g) = (read(truth), read(guess));
    let (st, sg) = (
        (truth.batch * truth.kept) as i64,
        (guess.batch * guess.kept) as i64,
    );
    let seq = truth.seq;
    let (mut both, mut total) = (0usize, 0usize);
    for (r, (&a, &b)) in t.iter().zip(&g).enumerate() {
        let j = r % seq.max(1);
        let forced = j < plan.sink || j + plan.recent >= seq;
        if a < st && !forced {
            total += 1;
            if b < sg {
                both += 1;
            }
        }
    }
    if total == 0 {
        1.0
    } else {
        both as f64 / total as f64
    }
}

/// One block on the kept tokens of `x` only: they attend causally, at their original
/// positions, to the keys `keys` names — the kept tokens' own, or every token's (`bound`:
/// upper bounds of the kept rows' positions, [`LemoPlan::position_bounds`]) — and go through
/// the FFN; eliminated tokens pass through unchanged. Queries, attention outputs and FFN
/// activations exist for the kept tokens alone (with [`KeyScope::All`], every token's norm
/// and K/V projections too).
pub fn eliminate<B: Backend>(
    block: &Block<B>,
    x: Tensor<B, 3>,
    rope: &RotaryEmbedding<B>,
    p: &TokenPattern<B>,
    keys: KeyScope,
    bound: Arc<Vec<usize>>,
) -> Tensor<B, 3> {
    let positions = kept_positions(p);
    let xc = gather(x.clone(), p);
    let att = match keys {
        KeyScope::Kept => {
            block
                .attn
                .forward_at(block.attn_norm.forward(xc.clone()), rope, positions)
        }
        KeyScope::All => {
            let xn = block.attn_norm.forward(x.clone());
            block.attn.forward_among(xn, rope, p, positions, bound)
        }
    };
    let hc = xc + att;
    let yc = hc.clone() + block.ffn.forward(block.ffn_norm.forward(hc));
    merge(x, yc, p)
}

/// The tokens `p` (kept `keep` of every `segment`) eliminates, as a pattern keeping
/// `segment − keep` per segment. Covers every eliminated token; where a ragged last segment
/// has fewer than `keep` tokens it also holds some kept ones (harmless where the kept
/// tokens' results are merged last, as in [`eliminate_from_backward`]).
pub fn eliminated<B: Backend>(p: &TokenPattern<B>, segment: usize, keep: usize) -> TokenPattern<B> {
    let scores = kept_mask(p).neg() + 1.0;
    select_tokens(scores, segment, segment - keep)
}

/// One block where the tokens `rest` names are eliminated from the *backward*: they are
/// computed in the forward without a graph, so the output equals the plain block's, but they
/// take no part in the layer's backward — none of their activations is stored, their
/// gradient passes the layer on the residual alone (`∂y/∂x = I` for them), and the kept
/// tokens `p` attend to their keys and values as constants. The kept tokens run with the
/// graph, attending to every token's keys (`bound`, `rest_bound`: the two patterns' position
/// bounds, [`LemoPlan::position_bounds`]). What the backward keeps of an eliminated token is
/// its key and value (the kept queries' attention reads them).
///
/// With `kv_graph` the eliminated tokens' keys and values stay in the graph instead: the
/// kept queries' attention gradient reaches them, their K/V projections (adapters included)
/// and, through the attention norm, their layer input; the backward then keeps every token's
/// norm input and normalised input (as the plain layer does for the attention's K/V side).
///
/// With `scale` (`[seq]`, per position; [`LemoPlan::gradient_scale`]) a kept token's output
/// is `x + s·f(x) − stop((s − 1)·f(x))`: the same value, with the gradient through the
/// layer's branch scaled by `s`.
#[allow(clippy::too_many_arguments)]
pub fn eliminate_from_backward<B: Backend>(
    block: &Block<B>,
    x: Tensor<B, 3>,
    rope: &RotaryEmbedding<B>,
    p: &TokenPattern<B>,
    bound: Arc<Vec<usize>>,
    rest: &TokenPattern<B>,
    rest_bound: Arc<Vec<usize>>,
    scale: Option<Tensor<B, 1>>,
    kv_graph: bool,
) -> Tensor<B, 3> {
    // The eliminated tokens run through a graph-free copy of the block (parameters not
    // tracked, inputs detached), so nothing of them is recorded; the kept tokens run with the
    // graph. Each token's keys and values are projected once, on its own side, and placed in
    // sequence order (the kept ones last: a ragged segment's `rest` may hold kept tokens).
    let frozen = block.clone().no_grad();
    let xr = gather(x.clone().detach(), rest);
    let xnr = frozen.attn_norm.forward(xr.clone());
    let xc = gather(x.clone(), p);
    let (xnc, k, v) = if kv_graph {
        let xn = block.attn_norm.forward(x.clone());
        let k = block.attn.wk.forward(xn.clone());
        let v = block.attn.wv.forward(xn.clone());
        (gather(xn, p), k, v)
    } else {
        let xnc = block.attn_norm.forward(xc.clone());
        let place = |eliminated: Tensor<B, 3>, kept: Tensor<B, 3>| {
            let [b, _, w] = kept.dims();
            let zeros = Tensor::<B, 3>::zeros([b, p.seq, w], (&kept.device(), kept.dtype()));
            merge(merge(zeros, eliminated, rest), kept, p)
        };
        let k = place(
            frozen.attn.wk.forward(xnr.clone()),
            block.attn.wk.forward(xnc.clone()),
        );
        let v = place(
            frozen.attn.wv.forward(xnr.clone()),
            block.attn.wv.forward(xnc.clone()),
        );
        (xnc, k, v)
    };
    // Keys rotated once for both query sets; the eliminated queries read them as constants.
    let (k, v) = block.attn.key_heads(k, v, rope);
    let delta = {
        let att = frozen.attn.attend_heads_at(
            xnr,
            k.clone().detach(),
            v.clone().detach(),
            rope,
            kept_positions(rest),
            rest_bound,
        );
        let hr = xr.clone() + att;
        let yr = hr.clone() + frozen.ffn.forward(frozen.ffn_norm.forward(hr));
        (yr - xr).detach()
    };
    let base = merge(x.clone(), gather(x, rest) + delta, rest);
    let att = block
        .attn
        .attend_heads_at(xnc, k, v, rope, kept_positions(p), bound);
    let hc = xc.clone() + att;
    let yc = hc.clone() + block.ffn.forward(block.ffn_norm.forward(hc));
    let yc = match scale {
        None => yc,
        Some(s) => {
            let positions = kept_positions(p);
            let [b, kept] = positions.dims();
            let s = s
                .cast(yc.dtype())
                .select(0, positions.reshape([b * kept]))
                .reshape([b, kept, 1]);
            let branch = yc - xc.clone();
            xc + branch.clone() * s.clone() - (branch * (s - 1.0)).detach()
        }
    };
    merge(base, yc, p)
}
