//! [`StepLoop`]: burn-train's supervised learning strategy for fine-tuning runs measured in
//! optimizer steps rather than epochs. It drives the `Learner` (its train step, optimizer step
//! and learning-rate schedule) and burn-train's event processor (dashboard, metric logs), and
//! adds what long unattended runs need: a resumable data position, checkpoints every N steps
//! (atomic, see [`super::checkpoint`]), validation every `eval_every` steps (one dashboard
//! "epoch" per validation round), and an error report instead of a panic.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::Progress;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::train::InferenceStep;
use burn::train::{
    EventProcessorTraining, Learner, LearnerEvent, LearningComponentsMarker,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents,
    TrainingItem, ValidLoader,
};

use super::checkpoint::{self, TrainState};
use super::guard::{first_nonfinite_grad, NonFinitePolicy};
use super::model::{AdaptedLm, StepStats};
use super::optim::AdapterOptimizer;
use super::schedule::WarmupCosine;
use crate::{Error, Result};

/// The components this loop trains.
pub type Components<B> =
    LearningComponentsMarker<B, WarmupCosine, AdaptedLm<B>, AdapterOptimizer<B>>;

/// What the loop leaves behind.
#[derive(Debug, Default)]
pub struct LoopReport {
    /// Training loss of every step (including those before a resume).
    pub losses: Vec<f64>,
    /// Steps completed.
    pub steps_done: usize,
    /// Checkpoints written, in order.
    pub checkpoints: Vec<PathBuf>,
    /// Total tokens and wall seconds of the steps run in this process.
    pub tokens: usize,
    /// Wall seconds of the steps run in this process.
    pub secs: f64,
    /// Highest device memory in use seen after a step (CUDA).
    pub peak_device_bytes: Option<f64>,
    /// Why the loop stopped early, if it did.
    pub error: Option<Error>,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped: Vec<usize>,
    /// LeMo: the share of each step's miss kept in the backward, for the steps of this
    /// process that measured it.
    pub kept_miss_shares: Vec<f64>,
}

/// Settings of a [`StepLoop`].
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Total optimizer steps of the run.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Steps per validation round.
    pub eval_every: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep: usize,
    /// Checkpoint folder.
    pub dir: PathBuf,
    /// Stop (with a checkpoint) after this step, simulating an interruption; for tests.
    pub stop_after: Option<usize>,
    /// What a step with a non-finite loss or gradient does.
    pub nonfinite: NonFinitePolicy,
    /// Steps whose gradients are poisoned with a NaN after the backward (fault injection for
    /// tests of the guard; empty in real runs).
    pub inject_nonfinite: Vec<usize>,
}

/// With [`NonFinitePolicy::Skip`], the run still stops after this many skipped steps in a row.
pub const MAX_SKIPPED_IN_A_ROW: usize = 10;

/// Step-based training with checkpoints (see the module docs).
pub struct StepLoop<B: AutodiffBackend> {
    config: LoopConfig,
    start: TrainState,
    optim: AdapterOptimizer<B>,
    device_memory: fn() -> Option<f64>,
    report: Arc<Mutex<LoopReport>>,
}

impl<B: AutodiffBackend> StepLoop<B> {
    /// A loop that starts after `start` (step 0 for a fresh run) and checkpoints through
    /// `optim` (a clone of the learner's optimizer). `device_memory` samples the device's
    /// memory in use after each step.
    pub fn new(
        config: LoopConfig,
        start: TrainState,
        optim: AdapterOptimizer<B>,
        device_memory: fn() -> Option<f64>,
    ) -> (Self, Arc<Mutex<LoopReport>>) {
        let report = Arc::new(Mutex::new(LoopReport::default()));
        (
            Self {
                config,
                start,
                optim,
                device_memory,
                report: report.clone(),
            },
            report,
        )
    }

    fn checkpoint(&self, state: &TrainState, lm: &AdaptedLm<B>) -> Result<PathBuf> {
        checkpoint::save(&self.config.dir, state, lm, &self.optim, self.config.keep)
    }

    fn validate(
        &self,
        learner: &Learner<Components<B>>,
        loader: &ValidLoader<Components<B>>,
        round: &Progress,
        processor: &mut SupervisedTrainingEventProcessor<Components<B>>,
    ) {
        let model = learner.model().valid();
        let mut it = loader.iter();
        let mut i = 0;
        while let Some(batch) = it.next() {
            i += 1;
            let out = InferenceStep::step(&model, batch);
            let item = TrainingItem::new(out, it.progress(), round.clone(), Some(i), None);
            processor.process_valid(LearnerEvent::ProcessedItem(item));
        }
        processor.process_valid(LearnerEvent::EndEpoch(round.items_processed));
    }

    fn run(
        &self,
        learner: &mut Learner<Components<B>>,
        train: &TrainLoader<Components<B>>,
        valid: &ValidLoader<Components<B>>,
        components: &mut TrainingComponents<Components<B>>,
    ) -> Result<()> {
        let c = &self.config;
        let mut state = self.start.clone();
        let first = state.step;
        // The schedule is a function of the step count: replay it up to the resume point.
        for _ in 0..first {
            learner.lr_step();
        }
        let rounds = c.steps.div_ceil(c.eval_every);
        let data = train.slice(first * c.batch, c.steps * c.batch);
        let mut batches = data.iter();
        let processor = &mut components.event_processor;
        let mut skipped_in_a_row = 0;
        for step in first + 1..=c.steps {
            let Some(batch) = batches.next() else {
                return Err(Error::Other(format!(
                    "the data loader ran out at step {step}"
                )));
            };
            let model = learner.model();
            let before = model.adapters.transfer_stats();
            let t0 = Instant::now();
            learner.lr_step();
            let mut out = learner.train_step(batch);
            if let Some(e) = model.staged.take_error() {
                return Err(e);
            }
            if c.inject_nonfinite.contains(&step) {
                out.grads = poison_first_grad(&model, out.grads);
            }
            let bad = if !out.item.loss.is_finite() {
                Some(format!("the training loss is {}", out.item.loss))
            } else {
                first_nonfinite_grad::<B, _>(&model, &out.grads).map(|(param, n)| {
                    format!("the gradient of {param} holds {n} NaN/infinite values")
                })
            };
            let applied = bad.is_none();
            if let Some(what) = bad {
                skipped_in_a_row += 1;
                if c.nonfinite == NonFinitePolicy::Stop || skipped_in_a_row > MAX_SKIPPED_IN_A_ROW {
                    return Err(Error::NonFinite(format!(
                        "{what} at step {step}{}; the last checkpoint is kept, lower the learning rate or check the data",
                        if c.nonfinite == NonFinitePolicy::Skip {
                            format!(" ({skipped_in_a_row} steps in a row)")
                        } else {
                            String::new()
                        }
                    )));
                }
                // Skip: no update (the MEFT rows' staged gradients are dropped too); the data
                // position and the schedule advance as for any step.
                drop(model.staged.take_rows());
                eprintln!("meft: step {step} skipped: {what}");
                state.step = step;
                state.examples = step * c.batch;
                state.skipped.push(step);
                let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
                r.skipped.push(step);
                r.steps_done = step;
            }
            let round = (step - 1) / c.eval_every + 1;
            let in_round = (step - 1) % c.eval_every + 1;
            let round_len = c.eval_every.min(c.steps - (round - 1) * c.eval_every);
            if applied {
                skipped_in_a_row = 0;
                learner.optimizer_step(out.grads);
                let model = learner.model();
                if let Some(e) = model.staged.take_error() {
                    return Err(e);
                }
                let secs = t0.elapsed().as_secs_f64();
                let moved = model.adapters.transfer_stats().since(&before);
                let (touched, total) =
                    model
                        .adapters
                        .sparse
                        .iter()
                        .fold((0usize, 0usize), |(t, n), a| {
                            let active = a.last_active().map_or(0, |x| x.rows.len());
                            (t + active, n + a.config().neurons)
                        });
                let device_bytes = (self.device_memory)();
                out.item.stats = StepStats {
                    secs,
                    pcie_bytes: (moved.to_device() + moved.to_host()) as f64,
                    touched_share: if total > 0 {
                        touched as f64 / total as f64
                    } else {
                        0.0
                    },
                    device_bytes,
                };
                state.step = step;
                state.examples = step * c.batch;
                state.losses.push(out.item.loss);
                {
                    let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
                    r.losses = state.losses.clone();
                    r.steps_done = step;
                    r.tokens += out.item.tokens;
                    r.secs += secs;
                    r.kept_miss_shares.extend(out.item.kept_miss_share);
                    if let Some(b) = device_bytes {
                        r.peak_device_bytes =
                            Some(r.peak_device_bytes.map_or(b, |p: f64| p.max(b)));
                    }
                }
                let item = TrainingItem::new(
                    out.item,
                    Progress::new(in_round, round_len),
                    Progress::new(round, rounds),
                    Some(step),
                    Some(learner.lr_current()),
                );
                processor.process_train(LearnerEvent::ProcessedItem(item));
            }
            let stop = c.stop_after == Some(step) || components.interrupter.should_stop();
            if step % c.checkpoint_every == 0 || step == c.steps || stop {
                let path = self.checkpoint(&state, &learner.model())?;
                self.report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .checkpoints
                    .push(path);
            }
            if in_round == round_len {
                processor.process_train(LearnerEvent::EndEpoch(round));
                self.validate(learner, valid, &Progress::new(round, rounds), processor);
            }
            if stop {
                break;
            }
        }
        learner.model().adapters.wait_updates()
    }
}

impl<B: AutodiffBackend> SupervisedLearningStrategy<Components<B>> for StepLoop<B> {
    fn fit(
        &self,
        mut components: TrainingComponents<Components<B>>,
        mut learner: Learner<Components<B>>,
        train: TrainLoader<Components<B>>,
        valid: ValidLoader<Components<B>>,
        _starting_epoch: usize,
    ) -> (
        AdaptedLm<B>,
        SupervisedTrainingEventProcessor<Components<B>>,
    ) {
        if let Err(e) = self.run(&mut learner, &train, &valid, &mut components) {
            self.report.lock().unwrap_or_else(|p| p.into_inner()).error = Some(e);
        }
        (learner.model(), components.event_processor)
    }
}

/// `grads` with the first registered device-parameter gradient of `model` replaced by NaNs
/// (fault injection, see [`LoopConfig::inject_nonfinite`]).
fn poison_first_grad<B: AutodiffBackend>(
    model: &AdaptedLm<B>,
    mut grads: burn::optim::GradientsParams,
) -> burn::optim::GradientsParams {
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    use burn::tensor::Tensor;
    struct First(Option<(ParamId, usize)>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for First {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.0.is_none() && param.is_require_grad() {
                self.0 = Some((param.id, D));
            }
        }
    }
    let mut first = First(None);
    model.visit(&mut first);
    fn poison<B: AutodiffBackend, const D: usize>(
        grads: &mut burn::optim::GradientsParams,
        id: ParamId,
    ) {
        if let Some(g) = grads.remove::<B::InnerBackend, D>(id) {
            grads.register::<B::InnerBackend, D>(id, g * f32::NAN);
        }
    }
    match first.0 {
        Some((id, 1)) => poison::<B, 1>(&mut grads, id),
        Some((id, 2)) => poison::<B, 2>(&mut grads, id),
        Some((id, 3)) => poison::<B, 3>(&mut grads, id),
        _ => {}
    }
    grads
}
