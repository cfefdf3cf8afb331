//! Pattern predictors: a small MLP per layer that scores tokens from the layer's input, so
//! the exact informativeness (which needs the layer's full attention) is not computed at run
//! time. Trained with binary cross-entropy against the exact pattern (keep = 1).

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `score(x) = w₂ · relu(W₁ · x / rms(x) + b₁) + b₂` per token.
#[derive(Module, Debug)]
pub struct PatternPredictor<B: Backend> {
    /// `[d, hidden]`.
    pub hidden: Linear<B>,
    /// `[hidden, 1]`.
    pub out: Linear<B>,
}

impl<B: Backend> PatternPredictor<B> {
    /// A fresh predictor for width `d`: weights and biases ~ U(±1/sqrt(fan_in)) drawn from
    /// `seed` (not from the backend's shared generator, so runs are reproducible).
    pub fn new(d: usize, hidden: usize, seed: u64, device: &B::Device) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut linear = |fan_in: usize, fan_out: usize| {
            let k = (1.0 / fan_in as f64).sqrt() as f32;
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-k..k)).collect() };
            let mut l = LinearConfig::new(fan_in, fan_out).init(device);
            let w = draw(fan_in * fan_out);
            let b = draw(fan_out);
            l.weight = Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [fan_in, fan_out]),
                device,
            ));
            l.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [fan_out]),
                device,
            )));
            l
        };
        Self {
            hidden: linear(d, hidden),
            out: linear(hidden, 1),
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
