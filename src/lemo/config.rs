//! [`LemoConfig`]: what LeMo eliminates, where, and how the pattern is found.

use serde::{Deserialize, Serialize};

use crate::adapter::Layers;
use crate::{Error, Result};

/// What drives the elimination pattern once warm-up is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PatternSource {
    /// The default: `random-runs` with [`Elimination::Backward`], `predicted` with
    /// [`Elimination::Layer`] ([`LemoConfig::pattern_source`]). Backward elimination keeps the
    /// forward exact, so the pattern only routes the gradient, and one shared random draw of
    /// contiguous runs per step gave the best perplexity of the sources measured
    /// (BENCHMARKS.md, issue 6); where eliminated tokens skip the layer, the predicted
    /// informativeness decides the outputs.
    #[default]
    Auto,
    /// The layer's trained predictor (cheap).
    Predicted,
    /// The exact informativeness scores (attention received; costly, for reference runs).
    Exact,
    /// A uniformly random choice in every segment (forced tokens aside), drawn afresh per
    /// step and layer from `seed`: no scoring and no predictor. Meant for
    /// [`Elimination::Backward`], where the forward is exact whatever is chosen and the pattern
    /// only decides which tokens' gradient goes through the layer (with
    /// [`LemoConfig::rescale_gradient`], an unbiased estimate of the gradient except for the
    /// eliminated tokens' keys and values, which stay constants).
    /// Warm-up steps run the plain model (there is nothing to calibrate).
    Random,
    /// Like `Random`, but one draw per step is shared by every eliminating layer: a token is
    /// kept in all of them or eliminated from all of them. With [`Elimination::Backward`] a
    /// kept token's gradient then crosses every layer through the layer's Jacobian and an
    /// eliminated token's through none, instead of a mix of the two (measured against
    /// per-layer draws in BENCHMARKS.md).
    #[serde(rename = "random-shared")]
    RandomShared,
    /// Shared by every eliminating layer like `RandomShared`, but chosen: each segment keeps
    /// the tokens whose targets the model has recently missed most (running `1 − p(target)`
    /// per previous-token/target pair, from the losses of the steps before; see
    /// [`super::difficulty`]), i.e. the tokens whose loss gradient is largest. Needs
    /// [`Elimination::Backward`] (the pattern routes the gradient; the forward stays exact).
    /// Warm-up steps run the plain model and fill the table.
    Difficulty,
    /// Shared by every eliminating layer like `RandomShared`, but each segment keeps one
    /// contiguous run of tokens (from a random offset, wrapping at the segment's end) instead
    /// of scattered ones: a kept token's neighbours, which its attention weighs most, are
    /// then mostly kept too, so less of its attention gradient meets constant keys and values.
    #[serde(rename = "random-runs")]
    RandomRuns,
}

/// Which keys a kept token attends to in an eliminating layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    /// Every token's key and value at that layer (from its current hidden state): eliminated
    /// tokens skip the layer's queries, output and FFN but stay visible as context. Costs the
    /// K/V projections of every token (and keeps them for the backward).
    #[default]
    All,
    /// The kept tokens' keys only: eliminated tokens vanish from the layer entirely (least
    /// memory and compute; the context each kept token sees shrinks with the budget).
    Kept,
}

/// What an eliminating layer does with the tokens it eliminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Elimination {
    /// Eliminated tokens are computed in the forward without a graph (their hidden states are
    /// exactly the plain model's) and are left out of the layer's backward: of their
    /// activations only their keys and values are kept (the kept queries read them, as
    /// constants), and their gradient passes the layer on the residual only. The forward is
    /// the plain model's; what is saved is backward compute and activation memory.
    #[default]
    Backward,
    /// Eliminated tokens skip the layer entirely and pass through on the residual stream
    /// unchanged (saves forward compute too, but changes the model's outputs).
    Layer,
}

/// LeMo's token elimination (arXiv 2501.09767), as configured for `meft train` (`[lemo]`)
/// and the library. Each applicable layer keeps, in every segment of `segment` tokens, the
/// `keep_ratio` share of tokens with the highest informativeness; the first `sink` and the
/// last `recent` tokens of each input are always kept. Eliminated tokens leave the layer's
/// backward (only their keys and values are stored) or, with [`Elimination::Layer`], skip it entirely and
/// pass through on the residual stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LemoConfig {
    /// Share of each segment's tokens a layer keeps, in (0, 1]. 1 keeps everything.
    pub keep_ratio: f64,
    /// Per-layer override of `keep_ratio`, one value per selected layer (in layer order).
    pub keep_ratios: Option<Vec<f64>>,
    /// Tokens per segment (the unit of selection and compaction), 16 … 1024.
    pub segment: usize,
    /// Leading tokens always kept (attention sinks).
    pub sink: usize,
    /// Trailing tokens always kept (the most recent window).
    pub recent: usize,
    /// Hidden width of each layer's pattern predictor (a 2-layer MLP).
    pub predictor_hidden: usize,
    /// Optimizer steps without elimination at the start, during which the predictors learn
    /// the exact pattern.
    pub warmup_steps: usize,
    /// What drives elimination after warm-up.
    pub pattern: PatternSource,
    /// Which keys kept tokens attend to (`"all"` or `"kept"`).
    pub keys: KeyScope,
    /// What eliminated tokens do: `"backward"` (computed in the forward only, the default) or
    /// `"layer"` (skip the layer; needs no forward compute but changes the outputs).
    pub eliminate: Elimination,
    /// With `eliminate = "backward"`: scale the gradient that goes through the layer's
    /// branch (attention + FFN) of each kept token by the inverse of its chance of being kept
    /// in its segment (forced tokens 1; with `keep` of `n` tokens kept, `(n − forced) /
    /// (keep − forced)` for the rest). The forward is unchanged. With random patterns the
    /// parameter and input gradients are then unbiased estimates of the plain model's (up to
    /// the eliminated tokens' keys and values, which stay constants).
    pub rescale_gradient: bool,
    /// With `eliminate = "backward"`: keep the eliminated tokens' keys and values in the
    /// graph, so the kept queries' attention gradient reaches them (their K/V projections,
    /// adapters included, and their layer input through the attention norm). Costs every
    /// token's attention-norm input and output in the backward's memory; default false
    /// (their keys and values are constants).
    pub kv_gradient: bool,
    /// Layers that eliminate tokens (default: all but the first two).
    pub layers: Option<Layers>,
    /// Seed of the predictors' init (layer l uses seed + l) and of random patterns.
    pub seed: u64,
}

impl Default for LemoConfig {
    fn default() -> Self {
        Self {
            keep_ratio: 0.5,
            keep_ratios: None,
            segment: 256,
            sink: 4,
            recent: 64,
            predictor_hidden: 64,
            warmup_steps: 20,
            pattern: PatternSource::Auto,
            keys: KeyScope::All,
            eliminate: Elimination::Backward,
            rescale_gradient: false,
            kv_gradient: false,
            layers: None,
            seed: 0,
        }
    }
}

impl LemoConfig {
    /// The pattern source in effect: `pattern`, with `auto` resolved for `eliminate`.
    pub fn pattern_source(&self) -> PatternSource {
        match (self.pattern, self.eliminate) {
            (PatternSource::Auto, Elimination::Backward) => PatternSource::RandomRuns,
            (PatternSource::Auto, Elimination::Layer) => PatternSource::Predicted,
            (p, _) => p,
        }
    }

    /// The layers that eliminate tokens in a model of `n` layers.
    pub fn layer_indices(&self, n: usize) -> Result<Vec<usize>> {
        match &self.layers {
            Some(l) => l.indices(n),
            None => Ok((2.min(n.saturating_sub(1))..n).collect()),
        }
    }

    /// Tokens kept per segment at the `i`-th selected layer.
    pub fn keep_per_segment(&self, i: usize) -> usize {
        let r = self
            .keep_ratios
            .as_ref()
            .and_then(|v| v.get(i).copied())
            .unwrap_or(self.keep_ratio);
        ((r * self.segment as f64).ceil() as usize).clamp(1, self.segment)
    }

    /// Checks every field for a model of `n_layers` layers; errors name the field.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        let bad = |field: &str, why: String| Error::LemoConfig(format!("lemo.{field}: {why}"));
        let ratio_ok = |r: f64| r > 0.0 && r <= 1.0;
        if !ratio_ok(self.keep_ratio) {
            return Err(bad(
                "keep_ratio",
                format!("{} is not in (0, 1]", self.keep_ratio),
            ));
        }
        if !(16..=1024).contains(&self.segment) {
            return Err(bad(
                "segment",
                format!("{} is not in 16 … 1024", self.segment),
            ));
        }
        if self.eliminate == Elimination::Backward && self.keys == KeyScope::Kept {
            return Err(bad(
                "eliminate",
                "\"backward\" computes eliminated tokens exactly, which needs every key: \
                 use keys = \"all\" with it, or eliminate = \"layer\""
                    .into(),
            ));
        }
        if self.rescale_gradient && self.eliminate != Elimination::Backward {
            return Err(bad(
                "rescale_gradient",
                "scales the gradient of a forward that stays exact: it needs \
                 eliminate = \"backward\""
                    .into(),
            ));
        }
        if self.kv_gradient && self.eliminate != Elimination::Backward {
            return Err(bad(
                "kv_gradient",
                "applies to eliminated tokens computed in the forward: it needs \
                 eliminate = \"backward\""
                    .into(),
            ));
        }
        if self.pattern == PatternSource::Difficulty && self.eliminate != Elimination::Backward {
            return Err(bad(
                "pattern",
                "\"difficulty\" chooses which tokens' gradient to keep and needs a forward \
                 that stays exact: use it with eliminate = \"backward\""
                    .into(),
            ));
        }
        if self.predictor_hidden == 0 {
            return Err(bad("predictor_hidden", "must be at least 1".into()));
        }
        let layers = self
            .layer_indices(n_layers)
            .map_err(|e| bad("layers", e.to_string()))?;
        if let Some(v) = &self.keep_ratios {
            if v.len() != layers.len() {
                return Err(bad(
                    "keep_ratios",
                    format!("{} values for {} selected layers", v.len(), layers.len()),
                ));
            }
            if let Some(r) = v.iter().find(|&&r| !ratio_ok(r)) {
                return Err(bad("keep_ratios", format!("{r} is not in (0, 1]")));
            }
        }
        Ok(())
    }
}
