//! Pattern predictors: a small MLP per layer that scores tokens from the layer's input, so
//! the exact informativeness (which needs the layer's full attention) is not computed at run
//! time. Trained with binary cross-entropy against the exact pattern (keep = 1).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `score(x) = w₂ · relu(W₁ · x / rms(x) + b₁) + b₂` per token.
#[derive(Module, Debug)]
pub struct PatternPredictor<B: Backend> {
    /// `[d, hidden]`.
    pub hidden: Linear<B>,
    /// `[hidden, 1]`.
    pub out: Linear<B>,
}

impl<B: Backend> PatternPredictor<B> {
    /// A fresh predictor for width `d` (burn's default Linear init).
    pub fn new(d: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            hidden: LinearConfig::new(d, hidden).init(device),
            out: LinearConfig::new(hidden, 1).init(device),
        }
    }

    /// Keep logits `[batch, seq]` for layer inputs `x` `[batch, seq, d]` (computed in the
    /// predictor's own dtype, f32 for its parameters).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let dtype = self.hidden.weight.val().dtype();
        let x = x.cast(dtype);
        let rms = (x.clone().square().mean_dim(2) + 1e-6).sqrt();
        let h = relu(self.hidden.forward(x / rms));
        self.out.forward(h).squeeze_dim::<2>(2)
    }
}

/// Mean binary cross-entropy of `logits` against `labels` (0/1), in the stable form
/// `max(z, 0) − z·y + log(1 + exp(−|z|))`.
pub fn bce_with_logits<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 2>) -> Tensor<B, 1> {
    let z = logits;
    let loss = z.clone().clamp_min(0.0) - z.clone() * labels + (z.abs().neg().exp() + 1.0).log();
    loss.mean()
}
