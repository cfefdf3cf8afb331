//! LoRA baseline: a rank-r update `(α/r)·x·A·B` beside chosen projections.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A projection LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// FFN gate.
    Gate,
    /// FFN up.
    Up,
    /// FFN down.
    Down,
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Scale numerator α (the update is scaled by α/r).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Projections to adapt.
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraTarget>,
    /// Seed of the A matrices' init (layer i, target j draws from seed, i, j), so an init
    /// does not depend on the backend's shared generator.
    #[serde(default)]
    pub seed: u64,
}

fn default_alpha() -> f64 {
    16.0
}

fn default_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::Q, LoraTarget::V]
}

impl LoraConfig {
    /// Rank `rank` on q and v (PEFT's default targets for LLaMA), α = 16.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: default_alpha(),
            targets: default_targets(),
            seed: 0,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::AdapterConfig("lora: rank must be >= 1".into()));
        }
        if self.targets.is_empty() {
            return Err(Error::AdapterConfig("lora: no target projections".into()));
        }
        if !self.alpha.is_finite() {
            return Err(Error::AdapterConfig("lora: alpha must be finite".into()));
        }
        Ok(())
    }
}

/// The low-rank pair: `A [d_in, r]` ~ N(0, 1/d_in) (PEFT uses Kaiming-uniform of the same
/// scale), `B [r, d_out]` = 0, so the update starts at zero.
#[derive(Module, Debug)]
pub struct LoraDelta<B: Backend> {
    /// Down projection `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// Up projection `[r, d_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// α / r.
    pub scale: f64,
}

/// A linear projection with an optional LoRA update beside it.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// The base projection (frozen when adapted).
    pub linear: Linear<B>,
    /// The low-rank update, if this projection is adapted.
    pub lora: Option<LoraDelta<B>>,
}

impl<B: Backend> Projection<B> {
    /// A plain projection.
    pub fn new(linear: Linear<B>) -> Self {
        Self { linear, lora: None }
    }

    /// Adds a fresh rank-`rank` update: A ~ N(0, 1/d_in) drawn from `seed`, B = 0 (so the
    /// adapted projection starts equal to the base).
    pub fn with_lora(mut self, rank: usize, alpha: f64, seed: u64) -> Self {
        use rand::SeedableRng;
        use rand_distr::Distribution as _;
        let [d_in, d_out] = self.linear.weight.dims();
        let device = self.linear.weight.device();
        let dtype = super::adapter_dtype(self.linear.weight.dtype());
        let std = (1.0 / d_in as f64).sqrt() as f32;
        let normal = rand_distr::Normal::new(0.0f32, std).expect("finite std");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..d_in * rank).map(|_| normal.sample(&mut rng)).collect();
        let a = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(a, [d_in, rank]), &device)
            .cast(dtype);
        self.lora = Some(LoraDelta {
            a: Param::from_tensor(a),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], (&device, dtype))),
            scale: alpha / rank as f64,
        });
        self
    }

    /// Applies the projection to `[.., d_in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => self.linear.forward(x),
            Some(l) => {
                let a = l.a.val();
                let base_dtype = x.dtype();
                let delta = super::to_dtype(x.clone(), a.dtype())
                    .matmul(a.unsqueeze())
                    .matmul(l.b.val().unsqueeze())
                    * l.scale;
                self.linear.forward(x) + super::to_dtype(delta, base_dtype)
            }
        }
    }
}

/// Adds LoRA updates to the targeted projections of one block (errors if one already has one).
pub(crate) fn apply<B: Backend>(
    mut block: crate::model::Block<B>,
    config: &LoraConfig,
    layer: usize,
) -> Result<crate::model::Block<B>> {
    use crate::model::Ffn;
    let Ffn::Base(mut ffn) = block.ffn else {
        return Err(Error::AdapterConfig(
            "lora: this layer's FFN already has an adapter".into(),
        ));
    };
    let attn = &mut block.attn;
    for (j, t) in config.targets.iter().enumerate() {
        let slot = match t {
            LoraTarget::Q => &mut attn.wq,
            LoraTarget::K => &mut attn.wk,
            LoraTarget::V => &mut attn.wv,
            LoraTarget::O => &mut attn.wo,
            LoraTarget::Gate => &mut ffn.gate,
            LoraTarget::Up => &mut ffn.up,
            LoraTarget::Down => &mut ffn.down,
        };
        if slot.lora.is_some() {
            return Err(Error::AdapterConfig(format!("lora: {t:?} is listed twice")));
        }
        let p = std::mem::replace(slot, Projection::new(placeholder(&slot.linear)));
        let seed = config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((layer as u64) << 8 | j as u64);
        *slot = p.with_lora(config.rank, config.alpha, seed);
    }
    block.ffn = Ffn::Base(ffn);
    Ok(block)
}

/// A cheap stand-in used while a projection is moved out and back.
fn placeholder<B: Backend>(l: &Linear<B>) -> Linear<B> {
    Linear {
        weight: l.weight.clone(),
        bias: None,
    }
}
