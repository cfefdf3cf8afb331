//! `meft train` / `meft eval` end to end: model, data, adapter, Learner, evaluation, outputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::train::metric::{LearningRateMetric, LossMetric};
use burn::train::{Learner, SupervisedTraining, TrainingStrategy};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::checkpoint::{self, TrainState, FORMAT};
use super::config::{Display, TrainConfig};
use super::export::export_adapter;
use super::metrics::{StepMetric, StepQuantity};
use super::model::{AdaptedLm, LemoSchedule};
use super::optim::AdapterOptimizer;
use super::params;
use super::renderer::PlainLog;
use super::schedule::WarmupCosine;
use super::strategy::{LoopConfig, StepLoop};
use crate::adapter::{Hybrid, Placement};
use crate::backend::BackendTask;
use crate::data::{text, tokenize, QaBatcher, QaExample, QaSplit, SourceKind, TokenizedExample};
use crate::eval::{evaluate, EvalReport};
use crate::gguf::GgufFile;
use crate::lemo::Lemo;
use crate::model::{Llama, LlamaConfig};
use crate::perplexity::{perplexity, PerplexityReport};
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// Examples of the eval split used for the validation loss each round.
pub const VALID_LOSS_EXAMPLES: usize = 128;

/// The training examples in the order the run consumes them: epoch e is a permutation of the
/// training set seeded by (seed, e), so the order is a function of the seed and the position
/// (which is what makes resuming exact).
pub struct StepOrder {
    items: Vec<TokenizedExample>,
    order: Vec<u32>,
}

impl StepOrder {
    /// The first `len` positions of the order over `items`.
    pub fn new(items: Vec<TokenizedExample>, len: usize, seed: u64) -> Self {
        let n = items.len();
        let mut order = Vec::with_capacity(len);
        let mut epoch = 0u64;
        while order.len() < len {
            let mut perm: Vec<u32> = (0..n as u32).collect();
            perm.shuffle(&mut StdRng::seed_from_u64(
                seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            order.extend(perm.into_iter().take(len - order.len()));
            epoch += 1;
        }
        Self { items, order }
    }
}

impl Dataset<TokenizedExample> for StepOrder {
    fn get(&self, index: usize) -> Option<TokenizedExample> {
        self.order
            .get(index)
            .map(|&i| self.items[i as usize].clone())
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

struct InMemory(Vec<TokenizedExample>);

impl Dataset<TokenizedExample> for InMemory {
    fn get(&self, index: usize) -> Option<TokenizedExample> {
        self.0.get(index).cloned()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    /// Eval before training (fresh runs with `eval.before`).
    pub before: Option<EvalReport>,
    /// Eval after training.
    pub after: Option<EvalReport>,
    /// Held-out perplexity before training (text sources).
    pub perplexity_before: Option<PerplexityReport>,
    /// Held-out perplexity after training (text sources).
    pub perplexity_after: Option<PerplexityReport>,
    /// Training loss of every applied step.
    pub losses: Vec<f64>,
    /// Steps skipped for a non-finite loss or gradient (`nonfinite = "skip"`), this process.
    pub skipped: Vec<usize>,
    /// Steps completed.
    pub steps: usize,
    /// Step the run started from (0, or the resumed checkpoint's).
    pub resumed_from: usize,
    /// Training tokens per second over the steps run in this process.
    pub tokens_per_sec: f64,
    /// Highest device memory in use after a step, bytes (CUDA).
    pub peak_device_bytes: Option<f64>,
    /// LeMo with `random-shared`, `random-runs` or `difficulty` patterns: the mean over this
    /// process's eliminating steps of the share of the step's miss (`Σ 1 − p(target)`) at the
    /// tokens the first eliminating layer keeps in the backward.
    pub kept_miss_share: Option<f64>,
    /// Examples in the train and eval splits (text: training and validation windows).
    pub split_sizes: (usize, usize),
    /// The adapter export.
    pub adapter: Option<PathBuf>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
}

/// A training run to start on a backend chosen at run time.
pub struct TrainTask {
    /// The run's config.
    pub config: TrainConfig,
    /// Continue from the newest checkpoint in the output folder.
    pub resume: bool,
    /// Stop (after checkpointing) at this step: an interruption, for tests.
    pub stop_after: Option<usize>,
    /// Skip generation-based evaluation (both before and after).
    pub skip_eval: bool,
}

fn device_memory() -> Option<f64> {
    #[cfg(feature = "cuda")]
    if RUNNING_ON_CUDA.load(std::sync::atomic::Ordering::Relaxed) {
        return crate::backend::cuda_memory().map(|(used, _)| used as f64);
    }
    None
}

#[cfg(feature = "cuda")]
static RUNNING_ON_CUDA: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Refuses a GGUF whose tokenizer can produce ids the model's embedding has no row for.
fn check_vocab(tok: &TextTokenizer, model: &LlamaConfig) -> Result<()> {
    if tok.vocab_size > model.vocab_size {
        return Err(Error::Other(format!(
            "the tokenizer has {} tokens but the model's embedding only {} rows: token ids {} and up would be out of range",
            tok.vocab_size, model.vocab_size, model.vocab_size
        )));
    }
    Ok(())
}

/// Fails before anything large is allocated when the run cannot fit in host or GPU memory
/// (see [`super::preflight`]).
fn preflight(c: &TrainConfig, model: &LlamaConfig) -> Result<()> {
    use super::preflight::{check, estimate, host_available, Residence};
    use crate::backend::{BackendKind, FloatType};
    let layers = c.layers.indices(model.n_layers)?.len();
    let weight_bytes = match c.dtype {
        FloatType::F32 => 4,
        FloatType::Bf16 => 2,
    };
    let needs = estimate(model, &c.adapter, layers, weight_bytes);
    let residence = match c.backend {
        BackendKind::Cpu => Residence::Host,
        BackendKind::Cuda => Residence::Gpu(crate::backend::cuda_free_memory().map(|(f, _)| f)),
        BackendKind::Wgpu => Residence::Gpu(None),
    };
    check(&needs, residence, host_available())
}

/// A run's data: tokenized training and validation examples, and what evaluation needs.
struct RunData {
    /// What the split holds (written to `split.json`).
    record: serde_json::Value,
    /// Training examples.
    train: Vec<TokenizedExample>,
    /// Validation-loss examples.
    valid: Vec<TokenizedExample>,
    /// QA sources: the split (generation eval reads its eval side).
    qa: Option<QaSplit>,
    /// Text sources: the held-out token stream (perplexity eval).
    eval_stream: Option<Vec<u32>>,
}

/// Loads the split and tokenizes it, checking lengths against the model's context.
fn load_data(config: &TrainConfig, tok: &TextTokenizer, max_seq: usize) -> Result<RunData> {
    let data = |e: crate::data::DataError| Error::Other(e.to_string());
    let max_len = config.data.max_len.min(max_seq);
    if config.data.source == SourceKind::Text {
        if config.data.max_len > max_seq {
            return Err(Error::ContextTooLong {
                tokens: config.data.max_len,
                max: max_seq,
            });
        }
        let split =
            text::load(&config.data.path, tok, max_len, config.data.eval_fraction).map_err(data)?;
        let valid = text::windows(&split.eval_stream, max_len, VALID_LOSS_EXAMPLES, "eval-");
        if valid.is_empty() {
            return Err(Error::Other(format!(
                "{}: the held-out tail ({} tokens) is shorter than one {max_len}-token window",
                config.data.path.display(),
                split.eval_stream.len()
            )));
        }
        let record = serde_json::json!({
            "source": "text",
            "total_tokens": split.total_tokens,
            "window": max_len,
            "train_windows": split.train.len(),
            "eval_tokens": split.eval_stream.len(),
            "eval": "the last eval_fraction of the token stream",
        });
        return Ok(RunData {
            record,
            train: split.train,
            valid,
            qa: None,
            eval_stream: Some(split.eval_stream),
        });
    }
    let examples = config.data.source().load().map_err(data)?;
    let split = QaSplit::by_id(examples, config.data.eval_fraction, config.seed).map_err(data)?;
    let train = tokenize(&split.train, tok, max_len).map_err(data)?;
    let eval = tokenize(&split.eval, tok, max_len).map_err(data)?;
    let valid_n = eval.len().min(VALID_LOSS_EXAMPLES);
    Ok(RunData {
        record: split.record(),
        train,
        valid: eval[..valid_n].to_vec(),
        qa: Some(split),
        eval_stream: None,
    })
}

/// What an evaluation produced: QA scores or held-out perplexity.
enum Evaluation {
    Qa(EvalReport),
    Perplexity(PerplexityReport),
}

fn eval_set(config: &TrainConfig, split: &QaSplit) -> Vec<QaExample> {
    let n = match config.eval.examples {
        0 => split.eval.len(),
        n => n.min(split.eval.len()),
    };
    split.eval[..n].to_vec()
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::write_atomic(path, &bytes)
}

impl BackendTask for TrainTask {
    type Output = TrainOutcome;

    fn run<B: Backend>(self, device: B::Device) -> Result<TrainOutcome> {
        #[cfg(feature = "cuda")]
        RUNNING_ON_CUDA.store(
            self.config.backend == crate::backend::BackendKind::Cuda,
            std::sync::atomic::Ordering::Relaxed,
        );
        let c = &self.config;
        let out_dir = &c.output;
        std::fs::create_dir_all(out_dir)
            .map_err(|e| Error::Other(format!("creating {}: {e}", out_dir.display())))?;
        let ckpt_dir = out_dir.join("checkpoints");
        let existing = checkpoint::latest(&ckpt_dir)?;
        if existing.is_some() && !self.resume {
            return Err(Error::Other(format!(
                "{} already holds checkpoints: pass --resume to continue that run, or choose another output folder",
                ckpt_dir.display()
            )));
        }

        let gguf = GgufFile::open(&c.model)?;
        let tok = TextTokenizer::from_gguf(&gguf)?;
        let model_cfg = LlamaConfig::from_gguf(&gguf)?;
        check_vocab(&tok, &model_cfg)?;
        preflight(c, &model_cfg)?;
        let data = load_data(c, &tok, model_cfg.max_seq_len)?;
        write_json(&out_dir.join("split.json"), &data.record)?;
        eprintln!(
            "data: {} training and {} validation examples from {}",
            data.train.len(),
            data.valid.len(),
            c.data.path.display()
        );

        let (model, _) = Llama::<Autodiff<B>>::from_gguf(&gguf, &device)?;
        drop(gguf);
        let (model, adapters) =
            Hybrid::<Autodiff<B>>::new(device.clone()).wrap(model, &c.adapter, &c.layers)?;
        let mut model = model;
        if let Some(lc) = &c.lemo {
            model.lemo = Some(Lemo::new(lc, &model, &device)?);
            let plan = &model.lemo.as_ref().expect("just attached").plan;
            eprintln!(
                "lemo: layers {:?} keep {:?} of {} tokens per segment; {} warm-up steps, then {:?} patterns",
                plan.layers, plan.keep, plan.segment, lc.warmup_steps, lc.pattern_source()
            );
        }
        let model = params::stable_ids(model);
        let trainable_paths = params::trainable_paths(&model)?;
        let trainable: usize = params::trainable(&model)?
            .values()
            .map(|t| t.values.len())
            .sum();
        let host: usize = adapters
            .sparse
            .iter()
            .map(|a| a.config().neurons * 2 * model_cfg.d_model)
            .sum();
        eprintln!("adapter: {trainable} trainable parameters on the device, {host} in host stores");
        let mut lm = AdaptedLm::new(model, adapters);
        lm.lemo = c
            .lemo
            .as_ref()
            .map(|lc| LemoSchedule::new(lc.warmup_steps, lc.pattern_source(), lc.seed));
        // Before the first step: a run whose checkpoints cannot fit on the disk stops now,
        // not at its first checkpoint hours later.
        checkpoint::check_disk(&ckpt_dir, &lm)?;
        let optim = AdapterOptimizer::<Autodiff<B>>::new(
            c.optimizer.weight_decay,
            c.optimizer.grad_clip,
            c.sparse_lr() / c.optimizer.lr,
        )?;
        let mut fingerprint = checkpoint::fingerprint(
            &serde_json::to_value(&model_cfg).map_err(|e| Error::Other(e.to_string()))?,
            &serde_json::to_value(&c.adapter).map_err(|e| Error::Other(e.to_string()))?,
            &serde_json::to_value(&c.layers).map_err(|e| Error::Other(e.to_string()))?,
        );
        if let Some(lc) = &c.lemo {
            // The predictors are trainable state: a checkpoint only fits the same LeMo setup.
            fingerprint["lemo"] =
                serde_json::to_value(lc).map_err(|e| Error::Other(e.to_string()))?;
        }
        let start = match (&existing, self.resume) {
            (Some(path), true) => {
                let state = checkpoint::read_state(path, &fingerprint)?;
                if state.seed != c.seed {
                    return Err(Error::Other(format!(
                        "checkpoint {} used seed {}, the config {}",
                        path.display(),
                        state.seed,
                        c.seed
                    )));
                }
                lm = checkpoint::restore(path, lm, &optim, &device)?;
                eprintln!("resuming from {} (step {})", path.display(), state.step);
                state
            }
            _ => TrainState {
                format: FORMAT,
                step: 0,
                examples: 0,
                seed: c.seed,
                fingerprint,
                losses: Vec::new(),
                skipped: Vec::new(),
            },
        };
        if start.step > c.steps {
            return Err(Error::Other(format!(
                "the checkpoint is at step {}, past the config's {} steps",
                start.step, c.steps
            )));
        }

        let eval_examples = data.qa.as_ref().map(|q| eval_set(c, q)).unwrap_or_default();
        let contexts = match c.eval.contexts.is_empty() {
            true => vec![c.data.max_len],
            false => c.eval.contexts.clone(),
        };
        let inner_device = device.clone();
        let run_eval = |lm: &AdaptedLm<B>, label: &str| -> Result<Evaluation> {
            if let Some(stream) = &data.eval_stream {
                eprintln!("perplexity {label} training at contexts {contexts:?}...");
                let r = perplexity(&lm.model, stream, &contexts, c.eval.tokens, &inner_device)?;
                eprintln!("perplexity {label} training: {}", r.summary());
                return Ok(Evaluation::Perplexity(r));
            }
            eprintln!(
                "evaluating {label} training on {} examples...",
                eval_examples.len()
            );
            let r = evaluate(
                &lm.model,
                &tok,
                &eval_examples,
                c.eval.max_new_tokens,
                &inner_device,
            )?;
            eprintln!("eval {label} training: {}", r.summary());
            Ok(Evaluation::Qa(r))
        };
        let record =
            |e: Evaluation, name: &str| -> Result<(Option<EvalReport>, Option<PerplexityReport>)> {
                match e {
                    Evaluation::Qa(r) => {
                        write_json(&out_dir.join(format!("eval-{name}.json")), &r)?;
                        Ok((Some(r), None))
                    }
                    Evaluation::Perplexity(r) => {
                        write_json(&out_dir.join(format!("perplexity-{name}.json")), &r)?;
                        Ok((None, Some(r)))
                    }
                }
            };
        let (before, ppl_before) = match c.eval.before && start.step == 0 && !self.skip_eval {
            true => record(run_eval(&lm.valid(), "before")?, "before")?,
            false => (None, None),
        };

        let pad = tok.eos_id.unwrap_or(0);
        let train_loader = DataLoaderBuilder::new(QaBatcher { pad_id: pad })
            .batch_size(c.batch)
            .set_device(device.clone())
            .build(StepOrder::new(
                data.train.clone(),
                c.steps * c.batch,
                c.seed,
            ));
        let valid_loader = DataLoaderBuilder::new(QaBatcher { pad_id: pad })
            .batch_size(c.batch)
            .set_device(device.clone())
            .build(InMemory(data.valid.clone()));

        let loop_config = LoopConfig {
            steps: c.steps,
            batch: c.batch,
            eval_every: c.eval_every,
            checkpoint_every: c.checkpoint_every,
            keep: c.keep_checkpoints,
            dir: ckpt_dir.clone(),
            stop_after: self.stop_after,
            nonfinite: c.nonfinite,
            inject_nonfinite: c.inject_nonfinite.clone(),
        };
        let resumed_from = start.step;
        let (step_loop, report) = StepLoop::new(loop_config, start, optim.clone(), device_memory);
        let schedule = WarmupCosine::new(
            c.optimizer.lr,
            c.optimizer.warmup_steps,
            c.steps,
            c.optimizer.min_lr_ratio,
        );
        let learner = Learner::new(lm, optim, schedule);
        let mut training = SupervisedTraining::new(out_dir, train_loader, valid_loader)
            .with_training_strategy(TrainingStrategy::Custom(Arc::new(step_loop)))
            .metric_train_numeric(LossMetric::<NdArray>::new())
            .metric_valid_numeric(LossMetric::<NdArray>::new())
            .metric_train_numeric(StepMetric::new(StepQuantity::TokenAccuracy))
            .metric_valid_numeric(StepMetric::new(StepQuantity::TokenAccuracy))
            .metric_train_numeric(LearningRateMetric::new())
            .metric_train_numeric(StepMetric::new(StepQuantity::TokensPerSec));
        if !c.adapter_is_dense_only() {
            training = training
                .metric_train_numeric(StepMetric::new(StepQuantity::PcieMb))
                .metric_train_numeric(StepMetric::new(StepQuantity::NeuronsTouched));
        }
        if device_memory().is_some() {
            training = training.metric_train_numeric(StepMetric::new(StepQuantity::DeviceMemory));
        }
        if c.lemo.is_some() {
            training = training
                .metric_train_numeric(StepMetric::new(StepQuantity::PredictorOverlap))
                .metric_train_numeric(StepMetric::new(StepQuantity::KeptMissShare));
        }
        let plain = match c.display {
            Display::Plain => true,
            Display::Tui => false,
            Display::Auto => !std::io::IsTerminal::is_terminal(&std::io::stdout()),
        };
        if plain {
            training = training.renderer(PlainLog::new(
                (c.steps / 50).clamp(1, c.eval_every),
                c.steps,
            ));
        }
        let result = training.launch(learner);
        let mut report = std::mem::take(&mut *report.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(e) = report.error.take() {
            return Err(e);
        }
        let trained = result.model;
        let adapter_path = out_dir.join("adapter.safetensors");
        // LeMo's predictors are a training aid: the export is the adapter alone.
        let adapter_paths = trainable_paths
            .iter()
            .filter(|p| !p.starts_with("lemo."))
            .cloned()
            .collect();
        export_adapter(
            &adapter_path,
            &trained.model,
            &adapter_paths,
            &trained.adapters,
            &c.adapter,
            &c.layers,
        )?;
        let finished = report.steps_done == c.steps;
        let (after, ppl_after) = match finished && !self.skip_eval {
            true => record(run_eval(&trained, "after")?, "after")?,
            false => (None, None),
        };
        let outcome = TrainOutcome {
            before,
            after,
            losses: report.losses,
            skipped: report.skipped,
            steps: report.steps_done,
            resumed_from,
            tokens_per_sec: if report.secs > 0.0 {
                report.tokens as f64 / report.secs
            } else {
                0.0
            },
            peak_device_bytes: report.peak_device_bytes,
            kept_miss_share: match report.kept_miss_shares.len() {
                0 => None,
                n => Some(report.kept_miss_shares.iter().sum::<f64>() / n as f64),
            },
            perplexity_before: ppl_before,
            perplexity_after: ppl_after,
            split_sizes: data
                .qa
                .as_ref()
                .map_or((data.train.len(), data.valid.len()), |q| {
                    (q.train.len(), q.eval.len())
                }),
            adapter: Some(adapter_path),
            checkpoints: report.checkpoints,
        };
        write_json(&out_dir.join("results.json"), &outcome)?;
        Ok(outcome)
    }
}

/// `meft eval`: the config's eval split (its first `eval.examples`) scored on the base model,
/// or on the base model plus a trained adapter.
pub struct EvalTask {
    /// The run config (model, data, split, eval settings).
    pub config: TrainConfig,
    /// A trained adapter export.
    pub adapter: Option<PathBuf>,
}

/// What `meft eval` reports: QA scores, or held-out perplexity for text sources.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EvalOutput {
    /// Exact match / F1 (QA sources).
    Qa(EvalReport),
    /// Perplexity per context length (text sources).
    Perplexity(PerplexityReport),
}

impl EvalOutput {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        match self {
            EvalOutput::Qa(r) => r.summary(),
            EvalOutput::Perplexity(r) => r.summary(),
        }
    }
}

impl BackendTask for EvalTask {
    type Output = EvalOutput;

    fn run<B: Backend>(self, device: B::Device) -> Result<EvalOutput> {
        let c = &self.config;
        let gguf = GgufFile::open(&c.model)?;
        let tok = TextTokenizer::from_gguf(&gguf)?;
        let (model, model_cfg) = Llama::<B>::from_gguf(&gguf, &device)?;
        check_vocab(&tok, &model_cfg)?;
        drop(gguf);
        let model = match &self.adapter {
            Some(path) => super::export::load_adapter(model, path)?.0,
            None => model,
        };
        let data = |e: crate::data::DataError| Error::Other(e.to_string());
        if c.data.source == SourceKind::Text {
            let max_len = c.data.max_len.min(model.max_seq_len);
            let split =
                text::load(&c.data.path, &tok, max_len, c.data.eval_fraction).map_err(data)?;
            let contexts = match c.eval.contexts.is_empty() {
                true => vec![c.data.max_len],
                false => c.eval.contexts.clone(),
            };
            return perplexity(
                &model,
                &split.eval_stream,
                &contexts,
                c.eval.tokens,
                &device,
            )
            .map(EvalOutput::Perplexity);
        }
        let split = QaSplit::by_id(
            c.data.source().load().map_err(data)?,
            c.data.eval_fraction,
            c.seed,
        )
        .map_err(data)?;
        evaluate(
            &model,
            &tok,
            &eval_set(c, &split),
            c.eval.max_new_tokens,
            &device,
        )
        .map(EvalOutput::Qa)
    }
}
