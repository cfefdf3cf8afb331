//! [`AdaptedLm`]: the wrapped causal LM as burn-train sees it, with its training and
//! validation steps and the per-step item the dashboard's metrics read.
//!
//! A training step runs forward and backward, then moves the MEFT rows' gradients (which are
//! not module parameters, so burn's `GradientsParams` would drop them) out of the gradients
//! into a slot shared with [`super::AdapterOptimizer`], which hands them to the host store's
//! sparse AdamW in the same optimizer step as the device parameters' AdamW.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, Transaction};
use burn::train::metric::{Adaptor, LossInput};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use cube_kernels::tokens::{kept_per_input, TokenPattern};

use crate::adapter::meft::RowGrad;
use crate::adapter::Adapters;
use crate::data::{HostIds, QaBatch};
use crate::lemo::select::{kept_share, select_kept};
use crate::lemo::{
    random_run_scores, random_scores, Lemo, LemoMode, PatternSource, TokenDifficulty,
};
use crate::model::Llama;
use crate::{Error, Result};

/// Row gradients taken in a training step, waiting for the optimizer step (one list per MEFT
/// layer), or the error that step hit.
#[derive(Default)]
pub struct StagedRows {
    /// Gradients per MEFT layer, in layer order.
    pub rows: Option<Vec<Vec<RowGrad>>>,
    /// The first error of a training or optimizer step (burn-train's step functions cannot
    /// return errors; the training loop checks this after each step).
    pub error: Option<Error>,
}

/// Shared handle to [`StagedRows`].
#[derive(Clone, Default)]
pub struct RowSlot(pub Arc<Mutex<StagedRows>>);

impl std::fmt::Debug for RowSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowSlot")
    }
}

impl RowSlot {
    /// Records `e` unless an earlier error is pending.
    pub fn fail(&self, e: Error) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.error.get_or_insert(e);
    }

    /// Takes the pending error, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .error
            .take()
    }

    /// Takes the staged row gradients.
    pub fn take_rows(&self) -> Option<Vec<Vec<RowGrad>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).rows.take()
    }
}

/// A causal LM with adapters, plus the host-side handles its steps need.
#[derive(Module, Debug)]
pub struct AdaptedLm<B: Backend> {
    /// The model (frozen base, trainable adapter parameters).
    pub model: Llama<B>,
    /// MEFT adapters' host side (empty for other adapter kinds).
    #[module(skip)]
    pub adapters: Adapters,
    /// Row gradients between the training step and the optimizer step.
    #[module(skip)]
    pub staged: RowSlot,
    /// LeMo's schedule, when the model has LeMo attached.
    #[module(skip)]
    pub lemo: Option<LemoSchedule>,
}

/// When LeMo eliminates during training: the first `warmup_steps` training steps calibrate
/// the predictors on the exact pattern without eliminating (random patterns: the plain
/// model), later ones eliminate with `source`'s pattern. Validation always runs the plain model.
#[derive(Debug, Clone)]
pub struct LemoSchedule {
    /// Calibration steps.
    pub warmup_steps: usize,
    /// Pattern used after warm-up.
    pub source: PatternSource,
    /// Training steps taken so far (shared by the Learner's clones of the model).
    pub steps: Arc<AtomicUsize>,
    /// Seed of random patterns (`lemo.seed`).
    pub seed: u64,
    /// Running per-token misses: what `difficulty` patterns choose by, and what the kept
    /// share of the step's miss reports for `random-shared`, `random-runs` and `difficulty`
    /// (None for other sources).
    pub difficulty: Option<Arc<Mutex<TokenDifficulty>>>,
}

/// Time constant of [`LemoSchedule::difficulty`]'s running averages, in observations of a
/// pair: long enough to average a pair over contexts, short enough to follow the model.
pub const DIFFICULTY_HORIZON: u64 = 16;

/// A step's host-chosen patterns ([`LemoMode::Given`]) and the kept rows that report the
/// kept share of the miss.
struct StepPattern<B: Backend> {
    given: Vec<(usize, TokenPattern<B>)>,
    /// The first eliminating layer's `inv` (compact slot per row; `sentinel` where eliminated).
    inv: Vec<i32>,
    sentinel: i32,
}

impl LemoSchedule {
    /// A schedule for `source` after `warmup_steps`, random draws from `seed`.
    pub fn new(warmup_steps: usize, source: PatternSource, seed: u64) -> Self {
        let tracked = matches!(
            source,
            PatternSource::Difficulty
                | PatternSource::RandomShared
                | PatternSource::RandomRuns
                | PatternSource::Auto
        );
        Self {
            warmup_steps,
            source,
            steps: Default::default(),
            seed,
            difficulty: tracked
                .then(|| Arc::new(Mutex::new(TokenDifficulty::new(DIFFICULTY_HORIZON)))),
        }
    }

    /// The mode of the next training step (and counts it).
    fn next_mode(&self) -> LemoMode {
        let step = self.steps.fetch_add(1, Ordering::SeqCst);
        match (step < self.warmup_steps, self.source) {
            // Random and difficulty patterns have no predictor to calibrate: warm-up runs the
            // plain model (and fills the difficulty table).
            (
                true,
                PatternSource::Random
                | PatternSource::RandomShared
                | PatternSource::Auto
                | PatternSource::Difficulty
                | PatternSource::RandomRuns,
            ) => LemoMode::Off,
            (true, _) => LemoMode::Calibrate,
            (false, source) => LemoMode::eliminating(source, self.seed, step),
        }
    }

    /// The patterns of a step in `mode` chosen on the host: `difficulty`'s from the table,
    /// `random-runs`' from the step's draw, and `random-shared`'s replica (the device draws
    /// the same one) for the report. None for other modes or a batch without host ids.
    fn host_pattern<B: Backend>(
        &self,
        lemo: &Lemo<B>,
        host: &HostIds,
        batch: usize,
        seq: usize,
        mode: LemoMode,
        device: &B::Device,
    ) -> Option<StepPattern<B>> {
        let table = self.difficulty.as_ref()?;
        if host.inputs.len() != batch * seq || lemo.plan.keep.is_empty() {
            return None;
        }
        let scores = match mode {
            LemoMode::Given(seed)
                if matches!(self.source, PatternSource::RandomRuns | PatternSource::Auto) =>
            {
                random_run_scores(seed, batch, seq, lemo.plan.segment)
            }
            LemoMode::Given(seed) => {
                let t = table.lock().unwrap_or_else(|p| p.into_inner());
                t.scores(&host.inputs, &host.targets, &host.in_loss, seed)
            }
            LemoMode::RandomShared(seed) => random_scores(seed, batch * seq),
            _ => return None,
        };
        let p = &lemo.plan;
        // Only `Given` patterns go to the device; the replica is for the report alone.
        let (given, inv) = match mode {
            LemoMode::Given(_) => lemo.patterns_from_scores(&scores, batch, seq, device),
            _ => {
                let (_, inv) =
                    select_kept(&scores, batch, seq, p.segment, p.keep[0], p.sink, p.recent);
                (Vec::new(), inv)
            }
        };
        let sentinel = (batch * kept_per_input(seq, p.segment, p.keep[0])) as i32;
        Some(StepPattern {
            given,
            inv,
            sentinel,
        })
    }

    /// Feeds a step's per-target losses `nll` (in the order of `host`'s in-loss positions)
    /// to the table (`difficulty` only); returns the share of the step's miss at the positions `pattern` kept.
    fn observe<B: Backend>(
        &self,
        host: &HostIds,
        nll: &[f64],
        pattern: Option<&StepPattern<B>>,
    ) -> Option<f64> {
        let table = self.difficulty.as_ref()?;
        let mut miss = vec![0.0f64; host.inputs.len()];
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        // Only `difficulty` reads the table; the random sources need the misses for the
        // report alone.
        let learn = self.source == PatternSource::Difficulty;
        let rows = (0..host.in_loss.len()).filter(|&r| host.in_loss[r]);
        for (r, &l) in rows.zip(nll) {
            let m = 1.0 - (-l).exp();
            miss[r] = m;
            if learn {
                t.observe(host.inputs[r] as u32, host.targets[r] as u32, m);
            }
        }
        pattern.map(|p| kept_share(&p.inv, p.sentinel, &miss))
    }
}

impl<B: Backend> AdaptedLm<B> {
    /// Wraps an already adapted model.
    pub fn new(model: Llama<B>, adapters: Adapters) -> Self {
        Self {
            model,
            adapters,
            staged: RowSlot::default(),
            lemo: None,
        }
    }

    /// Loss and greedy-correct count of a batch, read back to the host in one transaction;
    /// with LeMo, the loss to differentiate also holds the predictors' calibration loss.
    /// `given`: the patterns of [`LemoMode::Given`]. With `per_target`, the per-target losses
    /// are read back too (third value; empty otherwise).
    fn measure(
        &self,
        batch: &QaBatch<B>,
        mode: LemoMode,
        given: &[(usize, TokenPattern<B>)],
        per_target: bool,
    ) -> (Tensor<B, 1>, LmStepOutput, Vec<f64>) {
        let (hidden, aux) = self
            .model
            .forward_hidden_lemo(batch.lm.inputs.clone(), mode, given);
        let (nll, correct) = self.model.selected_nll_on_hidden(
            hidden,
            batch.positions.clone(),
            batch.answer_targets.clone(),
        );
        let n = nll.dims()[0].max(1) as f64;
        let loss = nll.clone().sum() / n;
        let mut read = Transaction::default()
            .register(loss.clone().detach())
            .register(correct);
        if per_target {
            read = read.register(nll.detach());
        }
        let mut read = read.execute().into_iter();
        let (l, c) = match (read.next(), read.next()) {
            (Some(l), Some(c)) => (l, c),
            _ => unreachable!("two tensors registered"),
        };
        let nll = read
            .next()
            .and_then(|d| d.convert::<f64>().into_vec::<f64>().ok())
            .unwrap_or_default();
        let scalar = |d: burn::tensor::TensorData| {
            d.convert::<f64>()
                .into_vec::<f64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(f64::NAN)
        };
        let out = LmStepOutput {
            loss: scalar(l),
            correct: scalar(c),
            targets: batch.targets,
            tokens: batch.tokens,
            stats: StepStats::default(),
            predictor_overlap: match aux.overlap.is_empty() {
                true => None,
                false => Some(aux.overlap.iter().sum::<f64>() / aux.overlap.len() as f64),
            },
            kept_miss_share: None,
        };
        let loss = match aux.predictor_loss {
            Some(p) => loss + p,
            None => loss,
        };
        (loss, out, nll)
    }
}

impl<B: AutodiffBackend> TrainStep for AdaptedLm<B> {
    type Input = QaBatch<B>;
    type Output = LmStepOutput;

    fn step(&self, batch: QaBatch<B>) -> TrainOutput<LmStepOutput> {
        let mode = self
            .lemo
            .as_ref()
            .map_or(LemoMode::Off, LemoSchedule::next_mode);
        let [b, seq] = batch.lm.inputs.dims();
        let device = batch.lm.inputs.device();
        let pattern = match (&self.lemo, &self.model.lemo) {
            (Some(s), Some(lemo)) => s.host_pattern(lemo, &batch.host, b, seq, mode, &device),
            _ => None,
        };
        let given = pattern.as_ref().map_or(&[][..], |p| &p.given[..]);
        let tracked = self.lemo.as_ref().is_some_and(|s| s.difficulty.is_some());
        let (loss, mut out, nll) = self.measure(&batch, mode, given, tracked);
        if let Some(s) = &self.lemo {
            out.kept_miss_share = s.observe(&batch.host, &nll, pattern.as_ref());
        }
        let mut grads = loss.backward();
        if !self.adapters.sparse.is_empty() {
            // The worker reads the row gradients back on its own thread: the backward must
            // have finished on the device first.
            let device = batch.lm.inputs.device();
            let taken = B::sync(&device)
                .map_err(|e| Error::Other(format!("device sync failed: {e:?}")))
                .and_then(|()| {
                    self.adapters
                        .sparse
                        .iter()
                        .map(|a| a.take_grads::<B>(&mut grads))
                        .collect::<Result<Vec<_>>>()
                });
            match taken {
                Ok(rows) => {
                    self.staged.0.lock().unwrap_or_else(|p| p.into_inner()).rows = Some(rows)
                }
                Err(e) => self.staged.fail(e),
            }
        }
        TrainOutput::new(self, grads, out)
    }
}

impl<B: Backend> InferenceStep for AdaptedLm<B> {
    type Input = QaBatch<B>;
    type Output = LmStepOutput;

    fn step(&self, batch: QaBatch<B>) -> LmStepOutput {
        self.measure(&batch, LemoMode::Off, &[], false).1
    }
}

/// Host-side measurements of one step, filled in by the training loop.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Wall time of the step (forward, backward, both optimizers' queuing), seconds.
    pub secs: f64,
    /// Bytes between host and device for the MEFT adapters in this step.
    pub pcie_bytes: f64,
    /// Distinct adapter neurons active in this step / all adapter neurons (MEFT).
    pub touched_share: f64,
    /// Device memory in use after the step, bytes (CUDA only).
    pub device_bytes: Option<f64>,
}

/// What one training or validation step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmStepOutput {
    /// Mean loss over the answer tokens.
    pub loss: f64,
    /// Answer tokens predicted right by argmax.
    pub correct: f64,
    /// Answer tokens in the loss.
    pub targets: usize,
    /// Real input tokens.
    pub tokens: usize,
    /// Timing and traffic (training steps only).
    pub stats: StepStats,
    /// LeMo calibration steps: mean share of the exact pattern the predictors matched.
    pub predictor_overlap: Option<f64>,
    /// LeMo steps with `random-shared`, `random-runs` or `difficulty` patterns: share of the
    /// step's miss (`Σ 1 − p(target)`) at the tokens the first eliminating layer keeps in the
    /// backward.
    pub kept_miss_share: Option<f64>,
}

impl ItemLazy for LmStepOutput {
    type ItemSync = LmStepOutput;

    fn sync(self) -> LmStepOutput {
        self
    }
}

impl Adaptor<LossInput<NdArray>> for LmStepOutput {
    fn adapt(&self) -> LossInput<NdArray> {
        LossInput::new(Tensor::from_floats([self.loss as f32], &NdArrayDevice::Cpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// `observe` reads the per-target losses in the order of the in-loss positions, feeds the
    /// table by (input, target) and measures the miss at the rows the pattern kept.
    #[test]
    fn observe_maps_losses_to_their_rows() {
        let s = LemoSchedule::new(0, PatternSource::Difficulty, 0);
        let host = HostIds {
            inputs: vec![1, 2, 3, 4],
            targets: vec![2, 3, 4, 0],
            in_loss: vec![false, true, true, false],
        };
        // Rows 1 and 2 are in the loss; 1 is kept, 2 eliminated.
        let (l1, l2) = (0.1f64, 2.0f64);
        let pattern = StepPattern::<NdArray> {
            given: Vec::new(),
            inv: vec![0, 1, 2, 2],
            sentinel: 2,
        };
        let share = s.observe(&host, &[l1, l2], Some(&pattern)).unwrap();
        let (m1, m2) = (1.0 - (-l1).exp(), 1.0 - (-l2).exp());
        assert!((share - m1 / (m1 + m2)).abs() < 1e-12, "{share}");
        let t = s.difficulty.as_ref().unwrap().lock().unwrap();
        assert_eq!(t.observed(), 2);
        assert!((t.expected_miss(2, 3) - m1).abs() < 1e-12);
        assert!((t.expected_miss(3, 4) - m2).abs() < 1e-12);
        // Row 0 (pair 1 → 2) was out of the loss and target 2 never seen: the overall average.
        assert!((t.expected_miss(1, 2) - (m1 + m2) / 2.0).abs() < 1e-12);
        drop(t);
        // Sources without a table measure nothing.
        let p = LemoSchedule::new(0, PatternSource::Predicted, 0);
        assert_eq!(p.observe(&host, &[l1, l2], Some(&pattern)), None);
    }
}
