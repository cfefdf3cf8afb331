//! Fine-tuning with burn-train: a wrapped model ([`AdaptedLm`]) trained by burn-train's
//! `Learner` with [`AdapterOptimizer`] (device AdamW + the MEFT stores' sparse AdamW) on a
//! warm-up + cosine schedule, driven step by step by [`StepLoop`] with atomic checkpoints,
//! the dashboard (or [`PlainLog`] lines), and EM/F1 evaluation before and after.
//!
//! - [`config`]: the run's TOML config ([`TrainConfig`]).
//! - [`model`]: [`AdaptedLm`] and its train/validation steps.
//! - [`optim`]: the optimizer, [`AdapterOptimizer`].
//! - [`schedule`]: the schedule, [`WarmupCosine`].
//! - [`strategy`]: the step loop, [`StepLoop`].
//! - [`checkpoint`], [`export`]: saving and loading state; [`params`]: trainable parameters
//!   by path; [`tensors_file`]: safetensors I/O.
//! - [`metrics`], [`renderer`]: dashboard metrics and the plain-log renderer.
//! - [`run`]: the whole run ([`TrainTask`]).

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod preflight;
pub mod renderer;
pub mod run;
pub mod schedule;
pub mod strategy;
pub mod tensors_file;

pub use config::TrainConfig;
pub use export::{export_adapter, load_adapter};
pub use model::{AdaptedLm, LmStepOutput};
pub use optim::AdapterOptimizer;
pub use renderer::PlainLog;
pub use run::{TrainOutcome, TrainTask};
pub use schedule::WarmupCosine;
pub use strategy::StepLoop;
