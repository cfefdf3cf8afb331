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

use crate::adapter::meft::RowGrad;
use crate::adapter::Adapters;
use crate::data::QaBatch;
use crate::lemo::{LemoMode, PatternSource};
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
}

impl LemoSchedule {
    /// The mode of the next training step (and counts it).
    fn next_mode(&self) -> LemoMode {
        let step = self.steps.fetch_add(1, Ordering::SeqCst);
        match (step < self.warmup_steps, self.source) {
            // Random patterns have no predictor to calibrate: warm-up runs the plain model.
            (true, PatternSource::Random | PatternSource::RandomShared | PatternSource::Auto) => {
                LemoMode::Off
            }
            (true, _) => LemoMode::Calibrate,
            (false, source) => LemoMode::eliminating(source, self.seed, step),
        }
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
    fn measure(&self, batch: &QaBatch<B>, mode: LemoMode) -> (Tensor<B, 1>, LmStepOutput) {
        let (hidden, aux) = self
            .model
            .forward_hidden_lemo(batch.lm.inputs.clone(), mode);
        let (loss, correct) = self.model.selected_loss_on_hidden(
            hidden,
            batch.positions.clone(),
            batch.answer_targets.clone(),
        );
        let [l, c] = Transaction::default()
            .register(loss.clone().detach())
            .register(correct)
            .execute()
            .try_into()
            .unwrap_or_else(|_| unreachable!("two tensors registered"));
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
        };
        let loss = match aux.predictor_loss {
            Some(p) => loss + p,
            None => loss,
        };
        (loss, out)
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
        let (loss, out) = self.measure(&batch, mode);
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
        self.measure(&batch, LemoMode::Off).1
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
