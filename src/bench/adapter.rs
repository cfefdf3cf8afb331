//! `meft bench adapter`: a stack of L FFN layers (`h ← h + FFN_l(h) + adapter_l(h)`), each with
//! an adapter of N neurons, and a full training step (forward, backward, gradient hand-off,
//! optimizer) — MEFT (store on the host, rows shipped per step, sparse AdamW on the CPU;
//! overlapped through the host worker, or serial) against the dense parallel adapter of the
//! same N (all on the compute device, burn's AdamW). Random weights: speed and memory do not
//! depend on them.
//!
//! MEFT's stages are recorded on the [`crate::timeline`] during the timed steps: exposed
//! transfer time comes from it, and `--timeline` writes it out for plotting.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::model::{median, sync};
use crate::adapter::dense::{DenseAdapterConfig, DenseAdapterFfn};
use crate::adapter::meft::{HostWorker, MeftConfig, MeftFfn, SparseAdamW};
use crate::adapter::transfer::raw_pinned_h2d_secs;
use crate::adapter::Adapters;
use crate::backend::BackendTask;
use crate::model::FeedForward;
use crate::timeline::{self, Span, SpanKind};
use crate::{Error, Result};

/// The adapter measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterMethod {
    /// MEFT: host store, routed top-K, sparse AdamW; row gradients and the sparse optimizer
    /// handed off to the host worker, overlapping the next step.
    Meft,
    /// MEFT with every stage in sequence on the calling thread (no hand-off): the baseline the
    /// overlap is measured against.
    MeftSerial,
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
    /// Stacked layers, each with its own FFN and adapter.
    pub layers: usize,
    /// MEFT settings (N and, for MEFT, routing); the dense adapter uses the same N.
    pub meft: MeftConfig,
    /// Keep the timed steps' timeline spans in the result.
    pub keep_timeline: bool,
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
    /// Stacked layers.
    pub layers: usize,
    /// Adapter neurons N (per layer).
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
    /// Whole training step, ms: wall time of the timed steps / steps (the overlapped method's
    /// work that spills into the next step is counted where it runs; the last step's is
    /// waited for).
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
    /// Every timed step (start to next start), ms.
    pub step_runs_ms: Vec<f64>,
    /// Of the forward: waiting for a layer's handed-off update, ms per step (MEFT).
    pub wait_update_ms: f64,
    /// Row copies host → device, ms per step (device-timed on the pinned path) (MEFT).
    pub h2d_copy_ms: f64,
    /// Achieved bandwidth of the row copies, GB/s (MEFT).
    pub h2d_gbps: Option<f64>,
    /// Pinned host → device ceiling measured in the same process at the same size, GB/s.
    pub raw_pinned_gbps: Option<f64>,
    /// `h2d_gbps / raw_pinned_gbps`.
    pub h2d_share_of_raw: Option<f64>,
    /// Transfer time per step from the timeline (union of copies and read-backs), ms (MEFT).
    pub transfer_ms: f64,
    /// Of it, not overlapped by any CPU work, ms per step (MEFT; an upper bound: device
    /// computation is not on the timeline).
    pub exposed_transfer_ms: f64,
    /// `exposed_transfer_ms / step_ms`.
    pub exposed_share: f64,
    /// The timed steps' spans (with `--timeline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Span>,
    /// When each timed step started, on the timeline's clock (with `--timeline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_starts: Vec<f64>,
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

/// `h ← h + layer(h)` through the stack.
fn stack_forward<B: Backend, L>(
    layers: &[L],
    x: Tensor<B, 3>,
    f: impl Fn(&L, Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 3> {
    let mut h = x;
    for l in layers {
        let y = f(l, h.clone());
        let t = Instant::now();
        h = h + y;
        timeline::record("residual (queue)", SpanKind::Wait, t);
    }
    h
}

impl AdapterBench {
    fn empty_result(&self) -> AdapterBenchResult {
        AdapterBenchResult {
            label: self.label.clone(),
            method: self.method,
            d_model: self.d_model,
            ffn_hidden: self.ffn_hidden,
            layers: self.layers,
            neurons: self.meft.neurons,
            experts: self.meft.expert_count(),
            experts_per_token: self.meft.experts_per_token,
            top_k: self.meft.top_k,
            batch: self.batch,
            seq: self.seq,
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
            wait_update_ms: 0.0,
            h2d_copy_ms: 0.0,
            h2d_gbps: None,
            raw_pinned_gbps: None,
            h2d_share_of_raw: None,
            transfer_ms: 0.0,
            exposed_transfer_ms: 0.0,
            exposed_share: 0.0,
            timeline: Vec::new(),
            step_starts: Vec::new(),
        }
    }

    fn memory(&self) -> Option<(u64, u64)> {
        if self.cuda {
            crate::backend::cuda_memory()
        } else {
            None
        }
    }

    /// MEFT on every layer; `overlap`: hand-off to the host worker, else all in sequence.
    fn run_meft<B: Backend>(
        &self,
        device: &B::Device,
        x: Tensor<Autodiff<B>, 3>,
        overlap: bool,
        result: &mut AdapterBenchResult,
    ) -> Result<Phases> {
        type AB<B> = Autodiff<B>;
        let (d, n) = (self.d_model, self.meft.neurons);
        let t0 = Instant::now();
        let mut stack = (0..self.layers)
            .map(|l| {
                let base = FeedForward::<AB<B>>::init_random(d, self.ffn_hidden, device);
                MeftFfn::new(base, &self.meft, l)
            })
            .collect::<Result<Vec<_>>>()?;
        eprintln!(
            "meft: {} stores of {n} neurons built in {:.1}s",
            self.layers,
            t0.elapsed().as_secs_f64()
        );
        let adapters = Adapters {
            sparse: stack.iter().map(|f| f.adapter.clone()).collect(),
        };
        result.host_store_bytes = adapters.host_bytes() as u64;
        result.device_param_bytes = (self.layers * d * result.experts * 4) as u64;
        let mut router_opt = AdamWConfig::new().init::<AB<B>, Vec<MeftFfn<AB<B>>>>();
        let sparse = SparseAdamW::default();
        let worker = HostWorker::new()?;
        let mut ph = Phases::default();
        let mut gpu_after_forward = None;
        let total = self.warmup + self.iters;
        let mut starts = Vec::new();
        for i in 0..total {
            let timed = i >= self.warmup;
            if i == self.warmup {
                adapters.wait_updates()?;
                sync::<AB<B>>(device)?;
                adapters.reset_stats();
                timeline::start();
            }
            let s0 = Instant::now();
            starts.push(s0);
            if timed {
                result.step_starts.push(timeline::now());
            }
            if overlap {
                // No synchronisation beyond what the stages need: forward, backward and the
                // router step are queued; row gradients and sparse AdamW go to the worker.
                let y = stack_forward(&stack, x.clone(), |f, h| f.forward(h));
                let t = Instant::now();
                let mut grads = y.sum().backward();
                timeline::record("backward (queue)", SpanKind::Wait, t);
                adapters.hand_off::<AB<B>>(&mut grads, Some(sparse), &worker, device)?;
                let t = Instant::now();
                let gp = GradientsParams::from_grads(grads, &stack);
                stack = router_opt.step(1e-4, stack, gp);
                timeline::record("router AdamW (queue)", SpanKind::Wait, t);
                if !timed {
                    adapters.wait_updates()?;
                    sync::<AB<B>>(device)?;
                    eprintln!("meft: warm-up step {i} took {:.0} ms", ms(s0));
                }
            } else {
                let (y, f) = synced::<AB<B>, _>(device, || {
                    Ok(stack_forward(&stack, x.clone(), |f, h| f.forward(h)))
                })?;
                if gpu_after_forward.is_none() {
                    gpu_after_forward = self.memory().map(|m| m.0);
                }
                let (mut grads, bw) = synced::<AB<B>, _>(device, || Ok(y.sum().backward()))?;
                let s2 = Instant::now();
                adapters.collect_grads::<AB<B>>(&mut grads)?;
                let c = ms(s2);
                let (sp, o) = synced::<AB<B>, _>(device, || {
                    let gp = GradientsParams::from_grads(grads, &stack);
                    stack = router_opt.step(1e-4, stack.clone(), gp);
                    let t = Instant::now();
                    let r = sparse.step(&adapters.sparse);
                    timeline::record("sparse AdamW", SpanKind::Work, t);
                    r
                })?;
                ph.record("meft-serial", i, timed, [f, bw, c, o], ms(s0));
                if timed {
                    ph.sparse.push(sp.secs * 1e3);
                    ph.sparse_rows += sp.rows;
                }
            }
        }
        adapters.wait_updates()?;
        sync::<AB<B>>(device)?;
        let end = Instant::now();
        let spans = timeline::stop();
        let timed_starts = &starts[self.warmup..];
        let k = self.iters as f64;
        let wall = end.duration_since(timed_starts[0]).as_secs_f64() * 1e3;
        result.step_ms = wall / k;
        ph.step = timed_starts
            .iter()
            .zip(timed_starts.iter().skip(1).copied().chain([end]))
            .map(|(a, b)| b.duration_since(*a).as_secs_f64() * 1e3)
            .collect();
        // (Not sampled in the overlapped run: nothing synchronises right after its forward.)
        result.gpu_in_use_after_forward = gpu_after_forward;

        let st = adapters.transfer_stats();
        result.select_ms = st.select_secs * 1e3 / k;
        result.gather_ms = st.gather_secs * 1e3 / k;
        result.readback_ms = st.readback_secs * 1e3 / k;
        result.upload_ms = st.upload_secs * 1e3 / k;
        result.grads_read_ms = st.grads_secs * 1e3 / k;
        result.accumulate_ms = st.accumulate_secs * 1e3 / k;
        result.wait_update_ms = st.wait_update_secs * 1e3 / k;
        result.active_rows = st.active_rows as f64 / k;
        result.bytes_to_device = st.to_device() as f64 / k;
        result.bytes_to_host = st.to_host() as f64 / k;
        result.h2d_copy_ms = st.copy_secs * 1e3 / k;
        if st.copy_secs > 0.0 {
            result.h2d_gbps = Some(st.rows_to_device as f64 / st.copy_secs / 1e9);
        }
        if overlap {
            result.sparse_adamw_ms = st.optimizer_secs * 1e3 / k;
            let rows = st.active_rows.max(1) as f64;
            result.sparse_adamw_ns_per_row = st.optimizer_secs * 1e9 / rows;
        } else {
            result.sparse_adamw_ms = median(&ph.sparse);
            let total_ms: f64 = ph.sparse.iter().sum();
            result.sparse_adamw_ns_per_row = total_ms * 1e6 / ph.sparse_rows.max(1) as f64;
        }
        // The pinned ceiling at one layer's row bytes, in this process.
        let per_layer = (st.rows_to_device as f64 / k / self.layers as f64) as usize;
        let raw: Vec<f64> = (0..3)
            .filter_map(|_| raw_pinned_h2d_secs::<B>(device, per_layer))
            .collect();
        if raw.len() == 3 {
            let raw_gbps = per_layer as f64 / median(&raw[1..]) / 1e9;
            result.raw_pinned_gbps = Some(raw_gbps);
            result.h2d_share_of_raw = result.h2d_gbps.map(|g| g / raw_gbps);
        }
        let (transfer, exposed) = timeline::exposed(&spans, f64::NEG_INFINITY, f64::INFINITY);
        result.transfer_ms = transfer * 1e3 / k;
        result.exposed_transfer_ms = exposed * 1e3 / k;
        result.exposed_share = result.exposed_transfer_ms / result.step_ms;
        if self.keep_timeline {
            result.timeline = spans;
            result
                .step_starts
                .push(timeline::now() - end.elapsed().as_secs_f64());
        } else {
            result.step_starts.clear();
        }
        Ok(ph)
    }

    fn run_dense<B: Backend>(
        &self,
        device: &B::Device,
        x: Tensor<Autodiff<B>, 3>,
        result: &mut AdapterBenchResult,
    ) -> Result<Phases> {
        type AB<B> = Autodiff<B>;
        let (d, n) = (self.d_model, self.meft.neurons);
        let cfg = DenseAdapterConfig {
            neurons: n,
            key_init_std: self.meft.key_init_std,
            value_init_std: self.meft.value_init_std,
            seed: self.meft.seed,
        };
        let mut stack = (0..self.layers)
            .map(|l| {
                let base = FeedForward::<AB<B>>::init_random(d, self.ffn_hidden, device);
                DenseAdapterFfn::new(base, &cfg, l)
            })
            .collect::<Result<Vec<_>>>()?;
        result.device_param_bytes = (self.layers * 2 * n * d * 4) as u64;
        let mut opt = AdamWConfig::new().init::<AB<B>, Vec<DenseAdapterFfn<AB<B>>>>();
        let mut ph = Phases::default();
        for i in 0..self.warmup + self.iters {
            let s0 = Instant::now();
            let (y, f) = synced::<AB<B>, _>(device, || {
                Ok(stack_forward(&stack, x.clone(), |f, h| f.forward(h)))
            })?;
            if result.gpu_in_use_after_forward.is_none() {
                result.gpu_in_use_after_forward = self.memory().map(|m| m.0);
            }
            let (grads, bw) = synced::<AB<B>, _>(device, || Ok(y.sum().backward()))?;
            let ((), o) = synced::<AB<B>, _>(device, || {
                let gp = GradientsParams::from_grads(grads, &stack);
                stack = opt.step(1e-4, stack.clone(), gp);
                Ok(())
            })?;
            ph.record("dense", i, i >= self.warmup, [f, bw, 0.0, o], ms(s0));
        }
        result.step_ms = median(&ph.step);
        Ok(ph)
    }
}

impl BackendTask for AdapterBench {
    type Output = AdapterBenchResult;

    fn run<B: Backend>(self, device: B::Device) -> Result<AdapterBenchResult> {
        if self.batch == 0 || self.seq == 0 || self.iters == 0 || self.layers == 0 {
            return Err(Error::Other(
                "batch, seq, layers and iters must be positive".into(),
            ));
        }
        self.meft.validate(self.d_model)?;
        let (b, t, d) = (self.batch, self.seq, self.d_model);
        let x =
            Tensor::<Autodiff<B>, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
        let mut result = self.empty_result();
        let ph = match self.method {
            AdapterMethod::Meft => self.run_meft::<B>(&device, x, true, &mut result)?,
            AdapterMethod::MeftSerial => self.run_meft::<B>(&device, x, false, &mut result)?,
            AdapterMethod::Dense => self.run_dense::<B>(&device, x, &mut result)?,
        };
        result.forward_ms = median(&ph.forward);
        result.backward_ms = median(&ph.backward);
        result.collect_ms = median(&ph.collect);
        result.optimizer_ms = median(&ph.optimizer);
        result.gpu_reserved = self.memory().map(|m| m.1);
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
        let f = |v: f64| {
            if v.is_finite() {
                format!("{v:.1}")
            } else {
                "–".into()
            }
        };
        let o = |v: Option<f64>, p: usize| v.map_or("–".into(), |v| format!("{v:.p$}"));
        let mut s = String::from(
            "| run | method | layers × d / ffn | N (E, P, K) | batch×seq | step ms | fwd ms | bwd ms | \
             grads→host ms | optim ms | select ms | gather ms | wait update ms | sparse AdamW ms | \
             active rows | H→D MB | D→H MB | H→D GB/s (of pinned peak) | transfer ms | exposed ms (share) | \
             GPU after fwd GiB | GPU reserved GiB | host store GiB |\n",
        );
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in results {
            s += &format!(
                "| {} | {:?} | {} × {} / {} | {} ({}, {}, {}) | {}×{} | {:.1} | {} | {} | {} | {} | \
                 {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {} ({}) | {:.1} | {:.1} ({:.2}) | \
                 {} | {} | {:.2} |\n",
                r.label,
                r.method,
                r.layers,
                r.d_model,
                r.ffn_hidden,
                r.neurons,
                r.experts,
                r.experts_per_token,
                r.top_k,
                r.batch,
                r.seq,
                r.step_ms,
                f(r.forward_ms),
                f(r.backward_ms),
                f(r.collect_ms),
                f(r.optimizer_ms),
                r.select_ms,
                r.gather_ms,
                r.wait_update_ms,
                r.sparse_adamw_ms,
                r.active_rows,
                r.bytes_to_device / 1e6,
                r.bytes_to_host / 1e6,
                o(r.h2d_gbps, 1),
                o(r.h2d_share_of_raw, 2),
                r.transfer_ms,
                r.exposed_transfer_ms,
                r.exposed_share,
                gib(r.gpu_in_use_after_forward),
                gib(r.gpu_reserved),
                r.host_store_bytes as f64 / (1u64 << 30) as f64,
            );
        }
        s
    }
}
