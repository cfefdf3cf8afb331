//! `meft bench adapter`: one FFN layer with an adapter of N neurons, a full training step
//! (forward, backward, gradient hand-off, optimizer) — MEFT (store on the host, rows shipped
//! per step, sparse AdamW on the CPU) against the dense parallel adapter of the same N (all on
//! the compute device, burn's AdamW). Random weights: speed and memory do not depend on them.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::model::{median, sync};
use crate::adapter::dense::{DenseAdapterConfig, DenseAdapterFfn};
use crate::adapter::meft::{MeftConfig, MeftFfn, SparseAdamW};
use crate::backend::BackendTask;
use crate::model::FeedForward;
use crate::{Error, Result};

/// The adapter measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterMethod {
    /// MEFT: host store, routed top-K, sparse AdamW.
    Meft,
    /// Dense parallel adapter on the compute device.
    Dense,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct AdapterBench {
    /// Adapter kind.
    pub method: AdapterMethod,
    /// Model width d.
    pub d_model: usize,
    /// Base FFN hidden size.
    pub ffn_hidden: usize,
    /// MEFT settings (N and, for MEFT, routing); the dense adapter uses the same N.
    pub meft: MeftConfig,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Untimed steps.
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Whether the compute backend is CUDA (then GPU memory is read from its pool).
    pub cuda: bool,
    /// Row label.
    pub label: String,
}

/// Medians over the timed steps, traffic per step, memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterBenchResult {
    /// Row label.
    pub label: String,
    /// Adapter kind.
    pub method: AdapterMethod,
    /// Model width d.
    pub d_model: usize,
    /// Base FFN hidden size.
    pub ffn_hidden: usize,
    /// Adapter neurons N.
    pub neurons: usize,
    /// Experts E (MEFT).
    pub experts: usize,
    /// Experts probed per token (MEFT).
    pub experts_per_token: usize,
    /// Active neurons per token K (MEFT).
    pub top_k: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Whole training step, ms.
    pub step_ms: f64,
    /// Forward (MEFT: includes routing read-back, CPU selection, gather, row upload), ms.
    pub forward_ms: f64,
    /// Backward, ms.
    pub backward_ms: f64,
    /// Row-gradient read-back into the store (MEFT), ms.
    pub collect_ms: f64,
    /// Optimizer step(s), ms.
    pub optimizer_ms: f64,
    /// Of the optimizer: sparse AdamW over the touched rows on the CPU, ms (MEFT).
    pub sparse_adamw_ms: f64,
    /// Sparse AdamW cost per touched row (2·d floats), ns (MEFT).
    pub sparse_adamw_ns_per_row: f64,
    /// Of the forward: CPU scoring + top-K, ms (MEFT).
    pub select_ms: f64,
    /// Of the forward: CPU row gather, ms (MEFT).
    pub gather_ms: f64,
    /// Of the forward: reading hidden states and routing back, ms (MEFT; includes waiting for
    /// the router on the device).
    pub readback_ms: f64,
    /// Of the forward: creating rows and indices on the device, ms (MEFT).
    pub upload_ms: f64,
    /// Of the gradient hand-off: the read-back itself, ms (MEFT).
    pub grads_read_ms: f64,
    /// Of the gradient hand-off: adding into the store's pending gradients, ms (MEFT).
    pub accumulate_ms: f64,
    /// Distinct active rows per step (MEFT).
    pub active_rows: f64,
    /// Host → device bytes per step (MEFT).
    pub bytes_to_device: f64,
    /// Device → host bytes per step (MEFT).
    pub bytes_to_host: f64,
    /// Trainable parameters on the compute device.
    pub device_param_bytes: u64,
    /// Host bytes of the MEFT store (parameters + moments).
    pub host_store_bytes: u64,
    /// CUDA pool bytes in use right after the forward (activations + parameters + state).
    pub gpu_in_use_after_forward: Option<u64>,
    /// CUDA pool bytes reserved at the end (the process's high-water mark).
    pub gpu_reserved: Option<u64>,
    /// Every timed step, ms.
    pub step_runs_ms: Vec<f64>,
}

#[derive(Default)]
struct Phases {
    forward: Vec<f64>,
    backward: Vec<f64>,
    collect: Vec<f64>,
    optimizer: Vec<f64>,
    sparse: Vec<f64>,
    sparse_rows: usize,
    step: Vec<f64>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs `f`, waits for the device, returns its result and the milliseconds taken.
fn synced<B: Backend, T>(device: &B::Device, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    sync::<B>(device)?;
    Ok((out, ms(start)))
}

impl Phases {
    /// Records one step's phases (ms) if it is timed, else reports the warm-up step.
    fn record(&mut self, method: &str, step: usize, timed: bool, phases: [f64; 4], total: f64) {
        if timed {
            let [f, b, c, o] = phases;
            self.forward.push(f);
            self.backward.push(b);
            self.collect.push(c);
            self.optimizer.push(o);
            self.step.push(total);
        } else {
            eprintln!("{method}: warm-up step {step} took {total:.0} ms");
        }
    }
}

impl BackendTask for AdapterBench {
    type Output = AdapterBenchResult;

    fn run<B: Backend>(self, device: B::Device) -> Result<AdapterBenchResult> {
        type AB<B> = Autodiff<B>;
        if self.batch == 0 || self.seq == 0 || self.iters == 0 {
            return Err(Error::Other("batch, seq and iters must be positive".into()));
        }
        self.meft.validate(self.d_model)?;
        let (b, t, d) = (self.batch, self.seq, self.d_model);
        let base = FeedForward::<AB<B>>::init_random(d, self.ffn_hidden, &device);
        let x = Tensor::<AB<B>, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let mut ph = Phases::default();
        let mut gpu_after_forward = None;
        let n = self.meft.neurons;
        let mut result = AdapterBenchResult {
            label: self.label.clone(),
            method: self.method,
            d_model: d,
            ffn_hidden: self.ffn_hidden,
            neurons: n,
            experts: self.meft.expert_count(),
            experts_per_token: self.meft.experts_per_token,
            top_k: self.meft.top_k,
            batch: b,
            seq: t,
            step_ms: 0.0,
            forward_ms: 0.0,
            backward_ms: 0.0,
            collect_ms: 0.0,
            optimizer_ms: 0.0,
            sparse_adamw_ms: 0.0,
            sparse_adamw_ns_per_row: 0.0,
            select_ms: 0.0,
            gather_ms: 0.0,
            readback_ms: 0.0,
            upload_ms: 0.0,
            grads_read_ms: 0.0,
            accumulate_ms: 0.0,
            active_rows: 0.0,
            bytes_to_device: 0.0,
            bytes_to_host: 0.0,
            device_param_bytes: 0,
            host_store_bytes: 0,
            gpu_in_use_after_forward: None,
            gpu_reserved: None,
            step_runs_ms: Vec::new(),
        };
        let memory = |cuda: bool| {
            if cuda {
                crate::backend::cuda_memory()
            } else {
                None
            }
        };

        match self.method {
            AdapterMethod::Meft => {
                let t0 = Instant::now();
                let mut layer = MeftFfn::new(base, &self.meft, 0)?;
                eprintln!(
                    "meft: store of {n} neurons built in {:.1}s",
                    t0.elapsed().as_secs_f64()
                );
                let adapter = layer.adapter.clone();
                result.host_store_bytes = adapter.with_store(|s| s.host_bytes())? as u64;
                result.device_param_bytes = (d * result.experts * 4) as u64;
                let mut router_opt = AdamWConfig::new().init::<AB<B>, MeftFfn<AB<B>>>();
                let sparse = SparseAdamW::default();
                for i in 0..self.warmup + self.iters {
                    let timed = i >= self.warmup;
                    if i == self.warmup {
                        adapter.reset_stats();
                    }
                    let s0 = Instant::now();
                    let (y, f) = synced::<AB<B>, _>(&device, || Ok(layer.forward(x.clone())))?;
                    if gpu_after_forward.is_none() {
                        gpu_after_forward = memory(self.cuda).map(|m| m.0);
                    }
                    let (mut grads, bw) = synced::<AB<B>, _>(&device, || Ok(y.sum().backward()))?;
                    let s2 = Instant::now();
                    adapter.collect_grads::<AB<B>>(&mut grads)?;
                    let c = ms(s2);
                    let (sp, o) = synced::<AB<B>, _>(&device, || {
                        let gp = GradientsParams::from_grads(grads, &layer);
                        layer = router_opt.step(1e-4, layer.clone(), gp);
                        sparse.step(std::slice::from_ref(&adapter))
                    })?;
                    ph.record("meft", i, timed, [f, bw, c, o], ms(s0));
                    if timed {
                        ph.sparse.push(sp.secs * 1e3);
                        ph.sparse_rows += sp.rows;
                    }
                }
                let st = adapter.stats();
                let k = self.iters as f64;
                result.select_ms = st.select_secs * 1e3 / k;
                result.gather_ms = st.gather_secs * 1e3 / k;
                result.readback_ms = st.readback_secs * 1e3 / k;
                result.upload_ms = st.upload_secs * 1e3 / k;
                result.grads_read_ms = st.grads_secs * 1e3 / k;
                result.accumulate_ms = st.accumulate_secs * 1e3 / k;
                result.active_rows = st.active_rows as f64 / k;
                result.sparse_adamw_ms = median(&ph.sparse);
                let total_ms: f64 = ph.sparse.iter().sum();
                result.sparse_adamw_ns_per_row = total_ms * 1e6 / ph.sparse_rows.max(1) as f64;
                result.bytes_to_device = st.to_device() as f64 / k;
                result.bytes_to_host = st.to_host() as f64 / k;
            }
            AdapterMethod::Dense => {
                let cfg = DenseAdapterConfig {
                    neurons: n,
                    key_init_std: self.meft.key_init_std,
                    value_init_std: self.meft.value_init_std,
                    seed: self.meft.seed,
                };
                let mut layer = DenseAdapterFfn::new(base, &cfg, 0)?;
                result.device_param_bytes = (2 * n * d * 4) as u64;
                let mut opt = AdamWConfig::new().init::<AB<B>, DenseAdapterFfn<AB<B>>>();
                for i in 0..self.warmup + self.iters {
                    let s0 = Instant::now();
                    let (y, f) = synced::<AB<B>, _>(&device, || Ok(layer.forward(x.clone())))?;
                    if gpu_after_forward.is_none() {
                        gpu_after_forward = memory(self.cuda).map(|m| m.0);
                    }
                    let (grads, bw) = synced::<AB<B>, _>(&device, || Ok(y.sum().backward()))?;
                    let ((), o) = synced::<AB<B>, _>(&device, || {
                        let gp = GradientsParams::from_grads(grads, &layer);
                        layer = opt.step(1e-4, layer.clone(), gp);
                        Ok(())
                    })?;
                    ph.record("dense", i, i >= self.warmup, [f, bw, 0.0, o], ms(s0));
                }
            }
        }
        result.step_ms = median(&ph.step);
        result.forward_ms = median(&ph.forward);
        result.backward_ms = median(&ph.backward);
        result.collect_ms = median(&ph.collect);
        result.optimizer_ms = median(&ph.optimizer);
        result.gpu_in_use_after_forward = gpu_after_forward;
        result.gpu_reserved = memory(self.cuda).map(|m| m.1);
        result.step_runs_ms = ph.step;
        Ok(result)
    }
}

fn gib(b: Option<u64>) -> String {
    b.map_or("–".into(), |b| {
        format!("{:.2}", b as f64 / (1u64 << 30) as f64)
    })
}

impl AdapterBenchResult {
    /// A Markdown table of results, one row each.
    pub fn table(results: &[AdapterBenchResult]) -> String {
        let mut s = String::from(
            "| run | method | d / ffn | N (E, P, K) | batch×seq | step ms | fwd ms | bwd ms | \
             grads→host ms | optim ms | read-back ms | select ms | gather ms | upload ms | \
             active rows | H→D MB | D→H MB | \
             GPU after fwd GiB | GPU reserved GiB | host store GiB |\n",
        );
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in results {
            s += &format!(
                "| {} | {:?} | {} / {} | {} ({}, {}, {}) | {}×{} | {:.1} | {:.1} | {:.1} | {:.1} | \
                 {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {:.2} |\n",
                r.label,
                r.method,
                r.d_model,
                r.ffn_hidden,
                r.neurons,
                r.experts,
                r.experts_per_token,
                r.top_k,
                r.batch,
                r.seq,
                r.step_ms,
                r.forward_ms,
                r.backward_ms,
                r.collect_ms,
                r.optimizer_ms,
                r.readback_ms,
                r.select_ms,
                r.gather_ms,
                r.upload_ms,
                r.active_rows,
                r.bytes_to_device / 1e6,
                r.bytes_to_host / 1e6,
                gib(r.gpu_in_use_after_forward),
                gib(r.gpu_reserved),
                r.host_store_bytes as f64 / (1u64 << 30) as f64,
            );
        }
        s
    }
}
