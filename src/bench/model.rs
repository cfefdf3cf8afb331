//! `meft bench model`: forward and forward+backward throughput of the base model at a given
//! geometry with random weights (speed does not depend on the values).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::ValueEnum;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::BackendTask;
use crate::model::{CausalLmBatch, Llama, LlamaConfig};
use crate::{Error, Result};

/// Model geometries to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// SmolLM2-135M (30 layers, d 576).
    Smollm2_135m,
    /// LLaMA-7B layer shapes (d 4096, FFN 11008); the layer count is a separate option.
    Llama7b,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ModelBench {
    /// Geometry.
    pub config: LlamaConfig,
    /// Geometry name for the report.
    pub preset: Preset,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Label for the backend and dtype (for the report).
    pub label: String,
}

/// One benchmark's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelBenchResult {
    /// Backend and dtype.
    pub label: String,
    /// Geometry name.
    pub preset: Preset,
    /// Layers.
    pub n_layers: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Median forward time (ms), logits included.
    pub forward_ms: f64,
    /// Forward tokens per second.
    pub forward_tokens_per_s: f64,
    /// Median forward + loss + backward time (ms), gradients for every weight.
    pub train_step_ms: f64,
    /// Forward+backward tokens per second.
    pub train_tokens_per_s: f64,
    /// Every timed forward (ms).
    pub forward_runs_ms: Vec<f64>,
    /// Every timed forward+backward (ms).
    pub train_runs_ms: Vec<f64>,
}

/// The median; NaN for no values (serialised as `null`).
pub(crate) fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What a caught device panic (e.g. out of memory) said, for a result row: its message,
/// cut to 300 characters.
pub(crate) fn device_failure(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    let msg: String = msg.chars().take(300).collect();
    format!("failed (device out of memory?): {msg}")
}

pub(crate) fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| Error::Other(format!("device sync failed: {e:?}")))
}

pub(crate) fn random_tokens<B: Backend>(
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<i32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as i32))
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

/// Times `step` `warmup + iters` times, syncing the device around each timed call.
/// Warm-up times go to stderr: on GPU backends they show kernel compilation and autotuning.
pub(crate) fn time<B: Backend>(
    device: &B::Device,
    what: &str,
    warmup: usize,
    iters: usize,
    mut step: impl FnMut(),
) -> Result<Vec<f64>> {
    for i in 0..warmup {
        let t = Instant::now();
        step();
        sync::<B>(device)?;
        eprintln!("{what}: warm-up {i} took {:.2}s", t.elapsed().as_secs_f64());
    }
    let mut runs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        step();
        sync::<B>(device)?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(runs)
}

impl BackendTask for ModelBench {
    type Output = ModelBenchResult;

    fn run<B: Backend>(self, device: B::Device) -> Result<ModelBenchResult> {
        if self.batch == 0 || self.seq == 0 || self.iters == 0 {
            return Err(Error::Other("batch, seq and iters must be positive".into()));
        }
        self.config.validate()?;
        if self.seq > self.config.max_seq_len {
            return Err(Error::ContextTooLong {
                tokens: self.seq,
                max: self.config.max_seq_len,
            });
        }
        let tokens = (self.batch * self.seq) as f64;
        let vocab = self.config.vocab_size;

        let forward_runs = {
            let model = Llama::<B>::init_random(&self.config, &device);
            let inputs = random_tokens::<B>(self.batch, self.seq, vocab, 1, &device);
            time::<B>(&device, "forward", self.warmup, self.iters, || {
                let _ = model.forward(inputs.clone(), None);
            })?
        };

        let train_runs = {
            let model = Llama::<Autodiff<B>>::init_random(&self.config, &device);
            let batch = CausalLmBatch {
                inputs: random_tokens(self.batch, self.seq, vocab, 2, &device),
                targets: random_tokens(self.batch, self.seq, vocab, 3, &device),
                target_mask: Tensor::ones([self.batch, self.seq], &device),
            };
            time::<Autodiff<B>>(&device, "forward+backward", self.warmup, self.iters, || {
                let _grads = model.loss(&batch).backward();
            })?
        };

        let (f, t) = (median(&forward_runs), median(&train_runs));
        Ok(ModelBenchResult {
            label: self.label,
            preset: self.preset,
            n_layers: self.config.n_layers,
            batch: self.batch,
            seq: self.seq,
            forward_ms: f,
            forward_tokens_per_s: tokens / (f / 1e3),
            train_step_ms: t,
            train_tokens_per_s: tokens / (t / 1e3),
            forward_runs_ms: forward_runs,
            train_runs_ms: train_runs,
        })
    }
}

impl ModelBenchResult {
    /// A Markdown table of results.
    pub fn table(results: &[ModelBenchResult]) -> String {
        let mut s = String::from(
            "| backend | model | layers | batch×seq | forward ms | forward tok/s | fwd+bwd ms | fwd+bwd tok/s |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in results {
            s += &format!(
                "| {} | {:?} | {} | {}×{} | {:.1} | {:.0} | {:.1} | {:.0} |\n",
                r.label,
                r.preset,
                r.n_layers,
                r.batch,
                r.seq,
                r.forward_ms,
                r.forward_tokens_per_s,
                r.train_step_ms,
                r.train_tokens_per_s
            );
        }
        s
    }
}
