//! `meft bench lemo`: long-context fine-tuning steps with and without LeMo's token
//! elimination, and with burn's activation checkpointing as the common alternative, side by
//! side in one process: step time and device memory per context length (random weights at a
//! real geometry, LoRA on q/v so the backward runs through every layer).
//!
//! Memory (CUDA only; cubecl's pool accounting): *activations* = bytes in use after the
//! decoder layers' forward minus before it (what the graph keeps for the backward, the LM
//! head excluded); *head* = the same for the LM head + loss; *peak* = the pool's reserved
//! bytes after the step, with free pages released before it (its high-water mark).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::model::{median, sync, Preset};
use crate::adapter::{wrap, AdapterConfig, Layers, LoraConfig};
use crate::backend::{cuda_memory, cuda_memory_cleanup, BackendTask};
use crate::lemo::{
    random_run_scores, Elimination, KeyScope, Lemo, LemoConfig, LemoMode, PatternSource,
};
use crate::model::{Llama, LlamaConfig};
use crate::{Error, Result};

/// One way of running the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LemoBenchMode {
    /// Every token in every layer (memory-efficient attention).
    Full,
    /// Full, under burn's balanced activation checkpointing.
    Checkpoint,
    /// LeMo as `[lemo]` says (by default eliminated tokens leave the backward only, kept
    /// tokens attend to all keys, and one random pattern per step is shared by every layer).
    Lemo,
    /// LeMo as `[lemo]` says with one random pattern per step shared by every layer
    /// (`pattern = "random-shared"`: scattered tokens, where the default keeps runs).
    LemoShared,
    /// LeMo as `[lemo]` says with random patterns instead of the predictors
    /// (`pattern = "random"`: no predictor forward; with backward elimination the same
    /// perplexity as predicted patterns, BENCHMARKS.md).
    LemoRandom,
    /// LeMo as `[lemo]` says with the eliminated tokens' keys and values in the graph
    /// (`kv_gradient = true`).
    LemoKvGradient,
    /// LeMo with the predicted pattern, eliminated tokens skipping the layer, kept tokens
    /// attending to all keys.
    LemoLayer,
    /// LeMo with the predicted pattern, eliminated tokens skipping the layer, kept tokens
    /// attending to kept keys only.
    LemoKept,
    /// LeMo with the exact pattern (attention received; costly).
    LemoExact,
    /// Full with burn's own attention (keeps `T × T` scores; shows why the chunked form is
    /// needed).
    BurnAttention,
    /// Full with every key/value head repeated for its query heads before the chunked
    /// attention (`MEFT_ATTENTION=repeat-kv`: the layout before grouped-query attention; shows
    /// what grouping saves in memory and time).
    FullRepeatedKv,
    /// Full with the plain LM head and log-softmax over every position (`MEFT_LOSS=dense`:
    /// the loss before the fused chunked cross-entropy; shows what fusing saves).
    FullDenseLoss,
    /// Full with the attention's softmax and its gradient in plain burn ops
    /// (`MEFT_ATTN_KERNELS=0`: before the row kernels; shows what they save).
    FullPlainSoftmax,
    /// LeMo as `[lemo]` says, with the plain-op softmax (`MEFT_ATTN_KERNELS=0`).
    LemoPlainSoftmax,
    /// Full with the fused loss's per-chunk rows (log-sum-exp, likelihood, argmax; softmax
    /// gradient) in plain burn ops (`MEFT_LOSS_KERNELS=0`: before the loss row kernels).
    FullPlainLossRows,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct LemoBench {
    /// Geometry.
    pub config: LlamaConfig,
    /// Geometry name.
    pub preset: Preset,
    /// Sequences per batch.
    pub batch: usize,
    /// Context lengths.
    pub seqs: Vec<usize>,
    /// Modes, in order (per context length).
    pub modes: Vec<LemoBenchMode>,
    /// LeMo settings for the `lemo*` modes.
    pub lemo: LemoConfig,
    /// LoRA rank on q and v.
    pub lora_rank: usize,
    /// Untimed steps.
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Backend and dtype label.
    pub label: String,
}

/// One (context length, mode) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LemoBenchRow {
    /// Backend and dtype.
    pub label: String,
    /// Geometry.
    pub preset: Preset,
    /// Layers.
    pub n_layers: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Mode.
    pub mode: LemoBenchMode,
    /// Share of tokens the LeMo layers keep (1 for the other modes).
    pub kept_share: f64,
    /// Median step (forward + loss + backward) in ms.
    pub step_ms: Option<f64>,
    /// Tokens per second.
    pub tokens_per_s: Option<f64>,
    /// Decoder-layer activation bytes (see module docs).
    pub activation_bytes: Option<u64>,
    /// LM head + loss activation bytes.
    pub head_bytes: Option<u64>,
    /// Pool high-water mark over the step, bytes.
    pub peak_reserved_bytes: Option<u64>,
    /// Median time of the decoder's forward, the head + loss forward, and the backward
    /// within the timed steps (ms; each phase ends with a device sync).
    pub phases_ms: Option<[f64; 3]>,
    /// Every timed step (ms).
    pub runs_ms: Vec<f64>,
    /// Why the row has no figures (e.g. out of memory).
    pub error: Option<String>,
}

/// Mean next-token cross-entropy of `hidden` `[batch, seq, d]` over every position.
fn lm_loss<B: Backend>(
    model: &Llama<B>,
    hidden: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [b, t, d] = hidden.dims();
    let (nll, _) = model.token_nll(hidden.reshape([b * t, d]), targets.reshape([b * t]));
    nll.mean()
}

fn used() -> Option<u64> {
    cuda_memory().map(|(u, _)| u)
}

impl LemoBench {
    fn measure<AB: AutodiffBackend>(
        &self,
        seq: usize,
        mode: LemoBenchMode,
        device: &AB::Device,
    ) -> Result<LemoBenchRow> {
        let mut cfg = self.config.clone();
        cfg.max_seq_len = cfg.max_seq_len.max(seq + 1);
        let model = Llama::<AB>::init_random(&cfg, device);
        let lora = AdapterConfig::Lora(LoraConfig::new(self.lora_rank));
        let (model, _) = wrap(model, &lora, &Layers::All)?;
        let mut lemo_cfg = self.lemo.clone();
        match mode {
            LemoBenchMode::LemoRandom => lemo_cfg.pattern = PatternSource::Random,
            LemoBenchMode::LemoShared => lemo_cfg.pattern = PatternSource::RandomShared,
            LemoBenchMode::LemoKvGradient => {
                lemo_cfg.eliminate = Elimination::Backward;
                lemo_cfg.kv_gradient = true;
            }
            LemoBenchMode::LemoLayer => {
                lemo_cfg.eliminate = Elimination::Layer;
                lemo_cfg.keys = KeyScope::All;
            }
            LemoBenchMode::LemoKept => {
                lemo_cfg.eliminate = Elimination::Layer;
                lemo_cfg.keys = KeyScope::Kept;
            }
            _ => {}
        }
        let lemo = Lemo::new(&lemo_cfg, &model, device)?;
        let lemo_mode = match mode {
            LemoBenchMode::Lemo
            | LemoBenchMode::LemoRandom
            | LemoBenchMode::LemoShared
            | LemoBenchMode::LemoPlainSoftmax
            | LemoBenchMode::LemoKvGradient
            | LemoBenchMode::LemoLayer
            | LemoBenchMode::LemoKept => match lemo_cfg.pattern_source() {
                PatternSource::Random => LemoMode::Random(lemo_cfg.seed),
                PatternSource::RandomShared => LemoMode::RandomShared(lemo_cfg.seed),
                PatternSource::RandomRuns => LemoMode::Given(lemo_cfg.seed),
                _ => LemoMode::Predicted,
            },
            LemoBenchMode::LemoExact => LemoMode::Exact,
            _ => LemoMode::Off,
        };
        let kept_share = match lemo_mode {
            LemoMode::Off => 1.0,
            _ => {
                let n = model.blocks.len() as f64;
                let plan = &lemo.plan;
                let dense = n - plan.layers.len() as f64;
                (dense
                    + (0..plan.layers.len())
                        .map(|i| plan.kept_share(i, seq))
                        .sum::<f64>())
                    / n
            }
        };
        let tokens =
            super::model::random_tokens::<AB>(self.batch, seq + 1, cfg.vocab_size, 5, device);
        let inputs = tokens.clone().narrow(1, 0, seq);
        let targets = tokens.narrow(1, 1, seq);

        let mut mem = (None, None, None);
        let mut phases: Vec<[f64; 3]> = Vec::new();
        let mut step = |record: bool| -> Result<()> {
            sync::<AB>(device)?;
            if record {
                cuda_memory_cleanup();
            }
            let m0 = used();
            let t0 = Instant::now();
            // Host-chosen patterns (`random-runs`) are chosen and uploaded inside the step.
            let given = match lemo_mode {
                LemoMode::Given(seed) => {
                    let scores = random_run_scores(seed, self.batch, seq, lemo.plan.segment);
                    lemo.patterns_from_scores(&scores, self.batch, seq, device)
                        .0
                }
                _ => Vec::new(),
            };
            let (hidden, _) = lemo.forward_hidden_given(&model, inputs.clone(), lemo_mode, &given);
            sync::<AB>(device)?;
            let t1 = Instant::now();
            let m1 = used();
            let loss = lm_loss(&model, hidden, targets.clone());
            sync::<AB>(device)?;
            let t2 = Instant::now();
            let m2 = used();
            let grads = loss.backward();
            sync::<AB>(device)?;
            let t3 = Instant::now();
            drop(grads);
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            phases.push([ms(t0, t1), ms(t1, t2), ms(t2, t3)]);
            if record {
                let peak = cuda_memory().map(|(_, r)| r);
                mem = (
                    m1.zip(m0).map(|(a, b)| a.saturating_sub(b)),
                    m2.zip(m1).map(|(a, b)| a.saturating_sub(b)),
                    peak,
                );
            }
            Ok(())
        };
        for i in 0..self.warmup {
            let t = Instant::now();
            step(i == 0)?;
            eprintln!(
                "lemo bench {mode:?} seq {seq}: warm-up {i} took {:.2}s",
                t.elapsed().as_secs_f64()
            );
        }
        let mut runs = Vec::new();
        for i in 0..self.iters {
            let t = Instant::now();
            step(self.warmup == 0 && i == 0)?;
            runs.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let timed = &phases[phases.len() - runs.len()..];
        let phase = |i: usize| median(&timed.iter().map(|p| p[i]).collect::<Vec<_>>());
        let phases_ms = Some([phase(0), phase(1), phase(2)]);
        let ms = median(&runs);
        Ok(LemoBenchRow {
            label: self.label.clone(),
            preset: self.preset,
            n_layers: cfg.n_layers,
            batch: self.batch,
            seq,
            mode,
            kept_share,
            step_ms: Some(ms),
            tokens_per_s: Some((self.batch * seq) as f64 / (ms / 1e3)),
            activation_bytes: mem.0,
            head_bytes: mem.1,
            peak_reserved_bytes: mem.2,
            phases_ms,
            runs_ms: runs,
            error: None,
        })
    }

    fn failed(&self, seq: usize, mode: LemoBenchMode, why: String) -> LemoBenchRow {
        LemoBenchRow {
            label: self.label.clone(),
            preset: self.preset,
            n_layers: self.config.n_layers,
            batch: self.batch,
            seq,
            mode,
            kept_share: f64::NAN,
            step_ms: None,
            tokens_per_s: None,
            activation_bytes: None,
            head_bytes: None,
            peak_reserved_bytes: None,
            phases_ms: None,
            runs_ms: Vec::new(),
            error: Some(why),
        }
    }
}

impl BackendTask for LemoBench {
    type Output = Vec<LemoBenchRow>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<LemoBenchRow>> {
        if self.batch == 0 || self.seqs.is_empty() || self.iters == 0 {
            return Err(Error::Other(
                "batch, seqs and iters must be given and positive".into(),
            ));
        }
        self.config.validate()?;
        let mut rows = Vec::new();
        for &seq in &self.seqs {
            for &mode in &self.modes {
                // burn's attention is chosen by the environment switch the model reads.
                let attention_switch = match mode {
                    LemoBenchMode::BurnAttention => Some("burn"),
                    LemoBenchMode::FullRepeatedKv => Some("repeat-kv"),
                    _ => None,
                };
                if let Some(v) = attention_switch {
                    std::env::set_var("MEFT_ATTENTION", v);
                }
                let loss_switch = mode == LemoBenchMode::FullDenseLoss;
                if loss_switch {
                    std::env::set_var("MEFT_LOSS", "dense");
                }
                let rows_switch = mode == LemoBenchMode::FullPlainLossRows;
                if rows_switch {
                    std::env::set_var("MEFT_LOSS_KERNELS", "0");
                }
                let softmax_switch = matches!(
                    mode,
                    LemoBenchMode::FullPlainSoftmax | LemoBenchMode::LemoPlainSoftmax
                );
                if softmax_switch {
                    std::env::set_var("MEFT_ATTN_KERNELS", "0");
                }
                let outcome = catch_unwind(AssertUnwindSafe(|| match mode {
                    LemoBenchMode::Checkpoint => {
                        self.measure::<Autodiff<B, BalancedCheckpointing>>(seq, mode, &device)
                    }
                    _ => self.measure::<Autodiff<B>>(seq, mode, &device),
                }));
                if attention_switch.is_some() {
                    std::env::remove_var("MEFT_ATTENTION");
                }
                if loss_switch {
                    std::env::remove_var("MEFT_LOSS");
                }
                if rows_switch {
                    std::env::remove_var("MEFT_LOSS_KERNELS");
                }
                if softmax_switch {
                    std::env::remove_var("MEFT_ATTN_KERNELS");
                }
                let row = match outcome {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => self.failed(seq, mode, e.to_string()),
                    Err(p) => self.failed(seq, mode, super::model::device_failure(&*p)),
                };
                eprintln!(
                    "{}",
                    LemoBenchRow::table(std::slice::from_ref(&row))
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

impl LemoBenchRow {
    /// A Markdown table, with each row's ratios against the `full` row of its context length.
    pub fn table(rows: &[LemoBenchRow]) -> String {
        let gib = |b: Option<u64>| {
            b.map_or("–".into(), |b| {
                format!("{:.2}", b as f64 / (1u64 << 30) as f64)
            })
        };
        let mut s = String::from(
            "| model | layers | batch×seq | mode | kept | step ms | fwd / loss / bwd ms | tok/s | act GiB | head GiB | peak GiB | act vs full | speed vs full |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows {
            let full = rows
                .iter()
                .find(|f| f.seq == r.seq && f.mode == LemoBenchMode::Full && f.preset == r.preset);
            let act_ratio = full
                .and_then(|f| f.activation_bytes.zip(r.activation_bytes))
                .map_or("–".into(), |(f, x)| {
                    format!("{:.2}× less", f as f64 / x.max(1) as f64)
                });
            let speed = full
                .and_then(|f| f.step_ms.zip(r.step_ms))
                .map_or("–".into(), |(f, x)| format!("{:.2}×", f / x));
            let cell = |v: Option<f64>, p: usize| v.map_or("–".into(), |v| format!("{v:.p$}"));
            s +=
                &format!(
                "| {:?} | {} | {}×{} | {:?} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.preset,
                r.n_layers,
                r.batch,
                r.seq,
                r.mode,
                r.kept_share,
                r.error.as_ref().map_or(cell(r.step_ms, 1), |e| format!(
                    "failed: {}",
                    e.chars().take(60).collect::<String>()
                )),
                r.phases_ms.map_or("–".into(), |[f, l, b]| format!("{f:.1} / {l:.1} / {b:.1}")),
                cell(r.tokens_per_s, 0),
                gib(r.activation_bytes),
                gib(r.head_bytes),
                gib(r.peak_reserved_bytes),
                act_ratio,
                speed
            );
        }
        s
    }
}
