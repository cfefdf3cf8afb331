//! `meft bench train`: whole fine-tuning steps of a LLaMA-shaped model (random weights: speed
//! and memory do not depend on the values) with each adapter kind side by side — none, LoRA,
//! the dense parallel adapter and MEFT — through the same `AdaptedLm` train step and
//! `AdapterOptimizer` that `meft train` runs. Loss on every position (language modelling).
//!
//! Per row: median step time and tokens/s; GPU memory (CUDA, from cubecl's pool accounting)
//! split into frozen weights, trainable adapter parameters, optimizer state, activations, and
//! the step's peak; host bytes of the MEFT stores; host ↔ device bytes per step and the
//! transfer time not hidden behind CPU work. Sweeps over N, K and sequence length are lists of
//! kinds and lengths; [`largest_fit`] finds the largest adapter that fits a GPU memory budget.
//!
//! Memory is read on the last warm-up step (device synced, free pages released before it):
//! *activations* = pool bytes in use after a forward and loss (graph kept, then dropped
//! without a backward; run after the timed steps) minus before it;
//! *peak* = the pool's reserved bytes after the step, free pages released before it (its
//! high-water mark); *steady* = bytes in use between steps (weights, adapter, optimizer state).

mod budget;
mod report;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::TrainStep;
use serde::{Deserialize, Serialize};

pub use budget::{BudgetProbe, BudgetResult};

use super::model::{median, random_tokens, sync};
use crate::adapter::{wrap, AdapterConfig, DenseAdapterConfig, Layers, LoraConfig, MeftConfig};
use crate::backend::{cuda_memory, cuda_memory_cleanup, BackendTask};
use crate::data::QaBatch;
use crate::lemo::LemoMode;
use crate::model::{CausalLmBatch, Llama, LlamaConfig};
use crate::train::params::param_bytes;
use crate::train::{AdaptedLm, AdapterOptimizer};
use crate::{timeline, Error, Result};

/// One adapter setup: `none`, `lora:R`, `dense:N`, `meft:N` or `meft:N:K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdapterKind {
    /// The frozen base with only layer 0's attention-norm scale trainable (d parameters), so
    /// the step still runs the full backward through every layer: the floor of any adapter.
    None,
    /// LoRA of rank `rank` on q and v, α = 16.
    Lora {
        /// Rank r.
        rank: usize,
    },
    /// Dense parallel adapter of `neurons` neurons per layer on the device.
    Dense {
        /// Neurons per layer (N).
        neurons: usize,
    },
    /// MEFT of `neurons` neurons per layer in host stores, `top_k` active per token.
    Meft {
        /// Neurons per layer (N).
        neurons: usize,
        /// Active neurons per token (K).
        top_k: usize,
    },
}

impl FromStr for AdapterKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize, what: &str| -> std::result::Result<usize, String> {
            let p = parts
                .get(i)
                .ok_or_else(|| format!("'{s}': {what} is missing"))?;
            match p.parse::<usize>() {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(format!(
                    "'{s}': {what} must be a positive integer, not '{p}'"
                )),
            }
        };
        // At most `max` fields; missing ones are reported by `num`.
        let arity = |max: usize| {
            if parts.len() <= max {
                Ok(())
            } else {
                Err(format!("'{s}': too many ':' fields"))
            }
        };
        match parts[0] {
            "none" => arity(1).map(|()| AdapterKind::None),
            "lora" => arity(2).and_then(|()| {
                Ok(AdapterKind::Lora {
                    rank: num(1, "rank")?,
                })
            }),
            "dense" => arity(2).and_then(|()| {
                Ok(AdapterKind::Dense {
                    neurons: num(1, "N")?,
                })
            }),
            "meft" => arity(3).and_then(|()| {
                Ok(AdapterKind::Meft {
                    neurons: num(1, "N")?,
                    top_k: if parts.len() == 3 { num(2, "K")? } else { 64 },
                })
            }),
            other => Err(format!(
                "unknown adapter kind '{other}' (none, lora:R, dense:N, meft:N or meft:N:K)"
            )),
        }
    }
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterKind::None => write!(f, "none"),
            AdapterKind::Lora { rank } => write!(f, "lora:{rank}"),
            AdapterKind::Dense { neurons } => write!(f, "dense:{neurons}"),
            AdapterKind::Meft { neurons, top_k } => write!(f, "meft:{neurons}:{top_k}"),
        }
    }
}

impl AdapterKind {
    /// The same kind with `neurons` neurons (dense and MEFT; others unchanged).
    pub fn with_neurons(self, n: usize) -> Self {
        match self {
            AdapterKind::Dense { .. } => AdapterKind::Dense { neurons: n },
            AdapterKind::Meft { top_k, .. } => AdapterKind::Meft { neurons: n, top_k },
            k => k,
        }
    }

    /// Adapter neurons per layer (dense, MEFT).
    pub fn neurons(&self) -> Option<usize> {
        match self {
            AdapterKind::Dense { neurons } | AdapterKind::Meft { neurons, .. } => Some(*neurons),
            _ => None,
        }
    }

    /// The family name: none, lora, dense, meft.
    pub fn family(&self) -> &'static str {
        match self {
            AdapterKind::None => "none",
            AdapterKind::Lora { .. } => "lora",
            AdapterKind::Dense { .. } => "dense",
            AdapterKind::Meft { .. } => "meft",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Geometry.
    pub config: LlamaConfig,
    /// Geometry name for the report (a preset or a GGUF path).
    pub model: String,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence; one set of rows per length.
    pub seqs: Vec<usize>,
    /// Adapters, in order.
    pub kinds: Vec<AdapterKind>,
    /// Experts probed per token (MEFT).
    pub experts_per_token: usize,
    /// Untimed steps (at least 1: the last one reads memory).
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Backend and dtype label.
    pub label: String,
    /// GPU memory budget (GiB) for [`TrainBench::largest_fit`], if asked.
    pub budget_gib: Option<f64>,
    /// Whether the backend is CUDA (then GPU memory is read from its pool).
    pub cuda: bool,
}

/// One measured (kind, sequence length).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBenchRow {
    /// Backend and dtype (`burn cuda bf16`, `torch eager bf16`).
    pub label: String,
    /// Geometry name.
    pub model: String,
    /// Layers.
    pub layers: usize,
    /// Model width d.
    pub d_model: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// The adapter, as given (`meft:65536:64`).
    pub adapter: String,
    /// none, lora, dense, meft.
    pub family: String,
    /// Adapter neurons per layer (dense, MEFT).
    pub neurons: Option<usize>,
    /// Median step (forward, loss, backward, optimizer) in ms.
    pub step_ms: Option<f64>,
    /// Tokens per second at the median step.
    pub tokens_per_s: Option<f64>,
    /// Every timed step, ms.
    pub runs_ms: Vec<f64>,
    /// Frozen parameters on the device, bytes.
    pub weights_bytes: Option<u64>,
    /// Trainable parameters on the device, bytes.
    pub adapter_bytes: Option<u64>,
    /// Device bytes kept between steps beyond the parameters (optimizer state), bytes.
    pub optimizer_bytes: Option<u64>,
    /// Device bytes the forward keeps for the backward (see module docs).
    pub activation_bytes: Option<u64>,
    /// Device bytes in use between steps.
    pub steady_bytes: Option<u64>,
    /// High-water mark of device memory over a step.
    pub peak_bytes: Option<u64>,
    /// Host bytes of the MEFT stores (parameters, moments, pending gradients).
    pub host_store_bytes: u64,
    /// Host → device bytes per step.
    pub h2d_bytes: f64,
    /// Device → host bytes per step.
    pub d2h_bytes: f64,
    /// Transfer time per step not overlapped by CPU work, ms (MEFT; an upper bound: device
    /// kernels are not on the timeline).
    pub exposed_transfer_ms: f64,
    /// Distinct active adapter rows per step, all layers (MEFT).
    pub active_rows: f64,
    /// Where a MEFT step's host-side time goes, ms per step summed over layers (some of it
    /// overlaps device work or other stages; see [`MeftStages`]).
    pub meft_stages: Option<MeftStages>,
    /// Why the row has no figures (e.g. out of memory).
    pub error: Option<String>,
}

/// MEFT's host-side stages, ms per step (all layers). The forward-side stages (read-back,
/// select, gather, copy) are on the critical path unless overlapped by the base FFN; the
/// gradient read-back and sparse AdamW run on the host worker, overlapping the next step
/// until a layer's forward waits for its update (`wait_update`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MeftStages {
    /// Reading hidden states and router scores back (includes waiting for the router).
    pub readback_ms: f64,
    /// CPU scoring of the probed experts' neurons and per-token top-K.
    pub select_ms: f64,
    /// Gathering the active rows into the staging buffer.
    pub gather_ms: f64,
    /// Host → device row copies (device-timed on the pinned path).
    pub copy_ms: f64,
    /// Reading the row gradients back (worker).
    pub grads_read_ms: f64,
    /// Sparse AdamW over the touched rows (worker).
    pub sparse_adamw_ms: f64,
    /// Forwards waiting for their layer's handed-off update.
    pub wait_update_ms: f64,
}

/// All results of one `meft bench train` call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBenchResult {
    /// The measured rows.
    pub rows: Vec<TrainBenchRow>,
    /// Budget searches (with `--budget-gib`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budget: Vec<BudgetResult>,
}

fn adapter_config(kind: AdapterKind, experts_per_token: usize) -> Option<AdapterConfig> {
    match kind {
        AdapterKind::None => None,
        AdapterKind::Lora { rank } => Some(AdapterConfig::Lora(LoraConfig::new(rank))),
        AdapterKind::Dense { neurons } => {
            Some(AdapterConfig::Dense(DenseAdapterConfig::new(neurons)))
        }
        AdapterKind::Meft { neurons, top_k } => {
            let mut c = MeftConfig::new(neurons);
            c.top_k = top_k;
            c.experts_per_token = experts_per_token;
            Some(AdapterConfig::Meft(c))
        }
    }
}

/// Host bytes the MEFT stores of `kind` would take on `layers` layers of width `d` (parameters
/// and both moments; pending gradients grow with use and are not counted).
pub fn store_bytes(kind: AdapterKind, layers: usize, d: usize) -> u64 {
    match kind {
        AdapterKind::Meft { neurons, .. } => (3 * neurons * 2 * d * 4 * layers) as u64,
        _ => 0,
    }
}

pub use crate::train::preflight::host_available;

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// A batch of random tokens with every position in the loss.
fn lm_batch<B: Backend>(
    cfg: &LlamaConfig,
    batch: usize,
    seq: usize,
    dev: &B::Device,
) -> QaBatch<B> {
    let tokens = random_tokens::<B>(batch, seq + 1, cfg.vocab_size, 7, dev);
    let inputs = tokens.clone().narrow(1, 0, seq);
    let targets = tokens.narrow(1, 1, seq);
    let n = batch * seq;
    let positions = Tensor::<B, 1, Int>::from_data(
        TensorData::new((0..n as i64).collect::<Vec<_>>(), [n]),
        dev,
    );
    QaBatch {
        answer_targets: targets.clone().reshape([n]),
        lm: CausalLmBatch {
            inputs,
            targets,
            target_mask: Tensor::ones([batch, seq], dev),
        },
        positions,
        tokens: n,
        targets: n,
        host: Default::default(),
    }
}

/// The wrapped model, ready to train, and its host-side adapters.
fn build<B: AutodiffBackend>(
    cfg: &LlamaConfig,
    kind: AdapterKind,
    experts_per_token: usize,
    dev: &B::Device,
) -> Result<AdaptedLm<B>> {
    let model = Llama::<B>::init_random(cfg, dev);
    let (mut model, adapters) = match adapter_config(kind, experts_per_token) {
        Some(c) => wrap(model, &c, &Layers::All)?,
        None => (model.no_grad(), Default::default()),
    };
    if kind == AdapterKind::None {
        let norm = &mut model.blocks[0].attn_norm;
        norm.gamma = norm.gamma.clone().set_require_grad(true);
    }
    Ok(AdaptedLm::new(model, adapters))
}

/// The CUDA memory pool, read only on CUDA runs (reading it initialises the device).
#[derive(Debug, Clone, Copy)]
struct Pool {
    cuda: bool,
}

impl Pool {
    fn used(self) -> Option<u64> {
        self.cuda.then(cuda_memory).flatten().map(|(u, _)| u)
    }

    fn reserved(self) -> Option<u64> {
        self.cuda.then(cuda_memory).flatten().map(|(_, r)| r)
    }

    fn cleanup(self) {
        if self.cuda {
            cuda_memory_cleanup();
        }
    }
}

/// Memory figures read on one instrumented step.
struct Memory {
    pool: Pool,
    steady: Option<u64>,
    peak: Option<u64>,
}

/// One training step: the train step, then both optimizers (the MEFT rows' sparse AdamW is
/// handed to the host worker and overlaps the next step). With `memory`, syncs between
/// phases and reads the pool.
fn step<B: AutodiffBackend>(
    lm: AdaptedLm<B>,
    opt: &mut AdapterOptimizer<B>,
    batch: &QaBatch<B>,
    dev: &B::Device,
    memory: Option<&mut Memory>,
) -> Result<AdaptedLm<B>>
where
    AdaptedLm<B>: AutodiffModule<B>,
{
    let out = if let Some(mem) = memory {
        sync::<B>(dev)?;
        lm.adapters.wait_updates()?;
        mem.pool.cleanup();
        let before = mem.pool.used();
        mem.steady = before;
        TrainStep::step(&lm, batch.clone())
    } else {
        TrainStep::step(&lm, batch.clone())
    };
    if let Some(e) = lm.staged.take_error() {
        return Err(e);
    }
    if !out.item.loss.is_finite() {
        return Err(Error::NonFinite(format!("loss {}", out.item.loss)));
    }
    let lm = opt.step(1e-4, lm, out.grads);
    if let Some(e) = lm.staged.take_error() {
        return Err(e);
    }
    sync::<B>(dev)?;
    Ok(lm)
}

/// Device bytes a forward and loss keep for the backward: run one with its graph kept, read
/// the pool, then drop it unused (MEFT's shipped rows are forgotten). Run apart from the step
/// whose peak is read, since the pool does not give every freed page back.
fn activation_bytes<B: AutodiffBackend>(
    lm: &AdaptedLm<B>,
    batch: &QaBatch<B>,
    dev: &B::Device,
    pool: Pool,
) -> Result<Option<u64>> {
    sync::<B>(dev)?;
    lm.adapters.wait_updates()?;
    pool.cleanup();
    let before = pool.used();
    let (hidden, _) = lm
        .model
        .forward_hidden_lemo(batch.lm.inputs.clone(), LemoMode::Off, &[]);
    let (loss, _) = lm.model.selected_loss_on_hidden(
        hidden,
        batch.positions.clone(),
        batch.answer_targets.clone(),
    );
    sync::<B>(dev)?;
    let bytes = pool.used().zip(before).map(|(a, b)| a.saturating_sub(b));
    drop(loss);
    lm.adapters.sparse.iter().for_each(|a| a.clear_tape());
    sync::<B>(dev)?;
    Ok(bytes)
}

impl TrainBench {
    fn empty_row(&self, seq: usize, kind: AdapterKind) -> TrainBenchRow {
        TrainBenchRow {
            label: self.label.clone(),
            model: self.model.clone(),
            layers: self.config.n_layers,
            d_model: self.config.d_model,
            batch: self.batch,
            seq,
            adapter: kind.to_string(),
            family: kind.family().into(),
            neurons: kind.neurons(),
            step_ms: None,
            tokens_per_s: None,
            runs_ms: Vec::new(),
            weights_bytes: None,
            adapter_bytes: None,
            optimizer_bytes: None,
            activation_bytes: None,
            steady_bytes: None,
            peak_bytes: None,
            host_store_bytes: 0,
            h2d_bytes: 0.0,
            d2h_bytes: 0.0,
            exposed_transfer_ms: 0.0,
            active_rows: 0.0,
            meft_stages: None,
            error: None,
        }
    }

    /// Fails early, naming sizes, when the MEFT stores would not fit in host memory.
    fn check_host(&self, kind: AdapterKind) -> Result<()> {
        let need = store_bytes(kind, self.config.n_layers, self.config.d_model);
        if let Some(avail) = host_available() {
            if need > avail / 10 * 9 {
                return Err(Error::Other(format!(
                    "host memory: the MEFT stores of {kind} need {:.1} GiB, {:.1} GiB available",
                    gib(need),
                    gib(avail)
                )));
            }
        }
        Ok(())
    }

    fn measure<B: AutodiffBackend>(
        &self,
        seq: usize,
        kind: AdapterKind,
        dev: &B::Device,
    ) -> Result<TrainBenchRow>
    where
        AdaptedLm<B>: AutodiffModule<B>,
    {
        self.check_host(kind)?;
        let mut row = self.empty_row(seq, kind);
        let mut cfg = self.config.clone();
        cfg.max_seq_len = cfg.max_seq_len.max(seq + 1);
        sync::<B>(dev)?;
        let pool = Pool { cuda: self.cuda };
        pool.cleanup();
        let m0 = pool.used();
        let t = Instant::now();
        let mut lm = build::<B>(&cfg, kind, self.experts_per_token, dev)?;
        sync::<B>(dev)?;
        eprintln!(
            "{kind} seq {seq}: model built in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let (trainable, frozen) = param_bytes(&lm);
        let m1 = pool.used();
        if m0.is_some() {
            row.weights_bytes = Some(frozen);
            row.adapter_bytes = Some(trainable);
        }
        row.host_store_bytes = lm.adapters.host_bytes() as u64;
        let batch = lm_batch::<B>(&cfg, self.batch, seq, dev);
        let mut opt = AdapterOptimizer::<B>::new(0.0, None, 1.0)?;
        let mut mem = Memory {
            pool,
            steady: None,
            peak: None,
        };
        for i in 0..self.warmup {
            let t = Instant::now();
            let last = i + 1 == self.warmup;
            lm = step(lm, &mut opt, &batch, dev, last.then_some(&mut mem))?;
            if last {
                mem.peak = pool.reserved();
            }
            eprintln!(
                "{kind} seq {seq}: warm-up {i} took {:.2}s",
                t.elapsed().as_secs_f64()
            );
        }
        row.peak_bytes = mem.peak;
        row.steady_bytes = mem.steady;
        row.optimizer_bytes = mem.steady.zip(m1).map(|(s, m)| s.saturating_sub(m));

        lm.adapters.wait_updates()?;
        lm.adapters.reset_stats();
        timeline::start();
        let mut starts = Vec::with_capacity(self.iters);
        for _ in 0..self.iters {
            starts.push(Instant::now());
            lm = step(lm, &mut opt, &batch, dev, None)?;
        }
        lm.adapters.wait_updates()?;
        sync::<B>(dev)?;
        let end = Instant::now();
        let spans = timeline::stop();
        row.runs_ms = starts
            .iter()
            .zip(starts.iter().skip(1).copied().chain([end]))
            .map(|(a, b)| b.duration_since(*a).as_secs_f64() * 1e3)
            .collect();
        let ms = median(&row.runs_ms);
        row.step_ms = Some(ms);
        row.tokens_per_s = Some((self.batch * seq) as f64 / (ms / 1e3));
        let k = self.iters as f64;
        let st = lm.adapters.transfer_stats();
        row.h2d_bytes = st.to_device() as f64 / k;
        row.d2h_bytes = st.to_host() as f64 / k;
        row.active_rows = st.active_rows as f64 / k;
        if matches!(kind, AdapterKind::Meft { .. }) {
            let per = |secs: f64| secs * 1e3 / k;
            row.meft_stages = Some(MeftStages {
                readback_ms: per(st.readback_secs),
                select_ms: per(st.select_secs),
                gather_ms: per(st.gather_secs),
                copy_ms: per(st.copy_secs),
                grads_read_ms: per(st.grads_secs),
                sparse_adamw_ms: per(st.optimizer_secs),
                wait_update_ms: per(st.wait_update_secs),
            });
        }
        let (_, exposed) = timeline::exposed(&spans, f64::NEG_INFINITY, f64::INFINITY);
        row.exposed_transfer_ms = exposed * 1e3 / k;
        // Last, so that neither the peak, the timed steps nor their traffic see it.
        row.activation_bytes = activation_bytes(&lm, &batch, dev, pool)?;
        Ok(row)
    }

    /// Measures one row; a failure (error or device panic, e.g. out of memory) becomes a row
    /// that says why.
    fn row<B: Backend>(&self, seq: usize, kind: AdapterKind, dev: &B::Device) -> TrainBenchRow {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.measure::<Autodiff<B>>(seq, kind, dev)
        }));
        let why = match outcome {
            Ok(Ok(r)) => return r,
            Ok(Err(e)) => e.to_string(),
            Err(p) => super::model::device_failure(&*p),
        };
        eprintln!("{kind} seq {seq}: {why}");
        let mut row = self.empty_row(seq, kind);
        row.error = Some(why);
        row
    }
}

impl BackendTask for TrainBench {
    type Output = TrainBenchResult;

    fn run<B: Backend>(self, device: B::Device) -> Result<TrainBenchResult> {
        if self.batch == 0 || self.seqs.is_empty() || self.seqs.contains(&0) || self.iters == 0 {
            return Err(Error::Other(
                "batch, seqs and iters must be given and positive".into(),
            ));
        }
        if self.warmup == 0 {
            return Err(Error::Other(
                "warmup must be at least 1 (the last warm-up step reads memory)".into(),
            ));
        }
        if self.kinds.is_empty() {
            return Err(Error::Other("no adapter kinds to measure".into()));
        }
        self.config.validate()?;
        for kind in &self.kinds {
            if let Some(c) = adapter_config(*kind, self.experts_per_token) {
                match c {
                    AdapterConfig::Meft(m) => m.validate(self.config.d_model)?,
                    AdapterConfig::Lora(l) => l.validate()?,
                    AdapterConfig::Dense(_) => {}
                }
            }
        }
        let mut rows = Vec::new();
        for &seq in &self.seqs {
            for &kind in &self.kinds {
                let row = self.row::<B>(seq, kind, &device);
                eprintln!(
                    "{}",
                    TrainBenchRow::table(std::slice::from_ref(&row))
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                rows.push(row);
            }
        }
        let mut budget = Vec::new();
        if let Some(b) = self.budget_gib {
            let mut seen = Vec::new();
            for &kind in &self.kinds {
                if kind.neurons().is_some() && !seen.contains(&kind.family()) {
                    seen.push(kind.family());
                    budget.push(self.largest_fit::<B>(kind, b, &device));
                }
            }
        }
        Ok(TrainBenchResult { rows, budget })
    }
}

#[cfg(test)]
mod tests {
    use super::AdapterKind;

    #[test]
    fn adapter_kinds_parse_and_print() {
        for (s, want) in [
            ("none", AdapterKind::None),
            ("lora:8", AdapterKind::Lora { rank: 8 }),
            ("dense:4096", AdapterKind::Dense { neurons: 4096 }),
            (
                "meft:65536",
                AdapterKind::Meft {
                    neurons: 65536,
                    top_k: 64,
                },
            ),
            (
                "meft:65536:256",
                AdapterKind::Meft {
                    neurons: 65536,
                    top_k: 256,
                },
            ),
        ] {
            let k: AdapterKind = s.parse().unwrap();
            assert_eq!(k, want, "{s}");
            assert_eq!(k.to_string().parse::<AdapterKind>().unwrap(), k, "{s}");
        }
        for (bad, says) in [
            ("lora", "rank is missing"),
            ("lora:0", "rank must be a positive integer"),
            ("dense:x", "N must be a positive integer, not 'x'"),
            ("meft:4096:64:1", "too many"),
            ("none:3", "too many"),
            ("moe:8", "unknown adapter kind 'moe'"),
        ] {
            let e = bad.parse::<AdapterKind>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn sweeps_keep_the_kind() {
        let k = AdapterKind::Meft {
            neurons: 4096,
            top_k: 128,
        };
        assert_eq!(k.with_neurons(8192).to_string(), "meft:8192:128");
        assert_eq!(
            AdapterKind::Lora { rank: 8 }.with_neurons(9).neurons(),
            None
        );
    }
}
