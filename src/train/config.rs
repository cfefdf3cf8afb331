//! [`TrainConfig`]: everything a fine-tuning run needs, read from TOML. Unknown keys and bad
//! values are errors that name the field; `--set key.path=value` overrides any field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterConfig, Layers};
use crate::backend::{BackendKind, FloatType};
use crate::data::{DataSource, SourceKind};

/// A fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The base model (GGUF).
    pub model: PathBuf,
    /// Training data and its split.
    pub data: DataConfig,
    /// The adapter to train.
    pub adapter: AdapterConfig,
    /// Which layers get it.
    #[serde(default)]
    pub layers: Layers,
    /// Optimizers and learning-rate schedule.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Steps between evaluations of the eval split's loss (dashboard "epochs").
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Where checkpoints, metrics and eval results go.
    pub output: PathBuf,
    /// Steps between checkpoints (one is always written at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Checkpoints kept (older ones are deleted once a newer one is durable).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Generation-based evaluation (EM / F1).
    #[serde(default)]
    pub eval: EvalConfig,
    /// Backend.
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// Float type of the base model and activations.
    #[serde(default = "default_dtype")]
    pub dtype: FloatType,
    /// Seed of the data order (adapter inits have their own seeds in `adapter`).
    #[serde(default)]
    pub seed: u64,
    /// Progress display: `auto` (dashboard on a terminal, log lines otherwise), `tui`, `plain`.
    #[serde(default)]
    pub display: Display,
    /// LeMo token elimination during training (absent: off).
    #[serde(default)]
    pub lemo: Option<crate::lemo::LemoConfig>,
    /// A step whose loss or a device gradient is NaN/infinite: `stop` the run (default) or
    /// `skip` the step's update and go on (at most 10 in a row).
    #[serde(default)]
    pub nonfinite: crate::train::guard::NonFinitePolicy,
    /// Fault injection for tests: poison the gradients of these steps with NaN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_nonfinite: Vec<usize>,
}

/// Data source, split and length limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The loader: `countryinfo`, `fanoutqa`, `jsonl` or `text`.
    pub source: SourceKind,
    /// Its file (fanoutqa, jsonl) or folder (countryinfo).
    pub path: PathBuf,
    /// Share of examples held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Longest example in tokens (prompt + answer); longer ones are an error. For `text`,
    /// the window length.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

impl DataConfig {
    /// The data source.
    pub fn source(&self) -> DataSource {
        DataSource {
            kind: self.source,
            path: self.path.clone(),
        }
    }
}

/// Optimizer settings: AdamW for the trainable parameters on the compute device, sparse AdamW
/// for the MEFT rows on the host; both follow one warm-up + cosine schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate of the device parameters (router, LoRA, dense adapter).
    pub lr: f64,
    /// Peak learning rate of the MEFT rows (default: `lr`).
    #[serde(default)]
    pub sparse_lr: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Linear warm-up steps from 0 to the peak.
    pub warmup_steps: usize,
    /// Floor of the cosine decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Clip each device parameter's gradient to this L2 norm (none if absent).
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            sparse_lr: None,
            weight_decay: 0.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            grad_clip: None,
        }
    }
}

/// Generation-based evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Eval examples scored (the first of the eval split); 0 = all.
    pub examples: usize,
    /// Longest generated answer in tokens.
    pub max_new_tokens: usize,
    /// Evaluate before training too.
    pub before: bool,
    /// Text sources: context lengths of the held-out perplexity (default: `data.max_len`).
    pub contexts: Vec<usize>,
    /// Text sources: held-out tokens scored at each context length.
    pub tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            examples: 100,
            max_new_tokens: 16,
            before: true,
            contexts: Vec::new(),
            tokens: 16384,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Display {
    /// The dashboard on a terminal, log lines otherwise.
    #[default]
    Auto,
    /// burn-train's terminal dashboard.
    Tui,
    /// One log line per step interval (CI, files, pipes).
    Plain,
}

fn default_batch() -> usize {
    8
}
fn default_eval_every() -> usize {
    50
}
fn default_checkpoint_every() -> usize {
    100
}
fn default_keep() -> usize {
    2
}
fn default_backend() -> BackendKind {
    BackendKind::Cpu
}
fn default_dtype() -> FloatType {
    FloatType::F32
}
fn default_eval_fraction() -> f64 {
    0.2
}
fn default_max_len() -> usize {
    256
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a bad value.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl TrainConfig {
    /// Reads `path`, applies `overrides` (`a.b=value`, the value in TOML syntax or a bare
    /// string), and checks the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// [`TrainConfig::load`] on TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ConfigFileError> {
        let invalid = |message: String| ConfigFileError::Invalid {
            path: origin.to_string(),
            message,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for o in overrides {
            apply_override(&mut doc, o).map_err(invalid)?;
        }
        let cfg: TrainConfig = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e| invalid(format!("field `{}`: {}", e.path(), e.inner())))?;
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// Checks values serde cannot: sizes, ranges, the adapter against itself.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("steps", self.steps),
            ("batch", self.batch),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
            ("keep_checkpoints", self.keep_checkpoints),
            ("data.max_len", self.data.max_len),
            ("eval.max_new_tokens", self.eval.max_new_tokens),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("field `{name}` must be at least 1"));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= 1.0) {
            return Err(format!(
                "field `optimizer.lr` must be in (0, 1], got {}",
                o.lr
            ));
        }
        if let Some(s) = o
            .sparse_lr
            .filter(|s| !(s.is_finite() && *s > 0.0 && *s <= 1.0))
        {
            return Err(format!(
                "field `optimizer.sparse_lr` must be in (0, 1], got {s}"
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(format!(
                "field `optimizer.weight_decay` must be ≥ 0, got {}",
                o.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return Err(format!(
                "field `optimizer.min_lr_ratio` must be in [0, 1], got {}",
                o.min_lr_ratio
            ));
        }
        if let Some(c) = o.grad_clip.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(format!("field `optimizer.grad_clip` must be > 0, got {c}"));
        }
        let f = self.data.eval_fraction;
        if !(f > 0.0 && f < 1.0) {
            return Err(format!(
                "field `data.eval_fraction` must be in (0, 1), got {f}"
            ));
        }
        Ok(())
    }

    /// Whether the adapter has no MEFT part (so no host ↔ device row traffic).
    pub fn adapter_is_dense_only(&self) -> bool {
        !matches!(self.adapter, AdapterConfig::Meft(_))
    }

    /// The sparse rows' peak learning rate.
    pub fn sparse_lr(&self) -> f64 {
        self.optimizer.sparse_lr.unwrap_or(self.optimizer.lr)
    }
}

/// Sets `key.path = value` in `doc`; `value` is read as a TOML value if it parses as one, else
/// as a string.
fn apply_override(doc: &mut toml::Table, item: &str) -> Result<(), String> {
    let Some((key, raw)) = item.split_once('=') else {
        return Err(format!("override `{item}` is not key=value"));
    };
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("override `{item}`: bad key `{key}`"));
    }
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("override `{item}`: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
model = "m.gguf"
steps = 10
output = "out"
[data]
source = "jsonl"
path = "d.jsonl"
[adapter]
kind = "meft"
neurons = 1024
"#;

    #[test]
    fn parses_and_overrides() {
        let c = TrainConfig::parse(BASE, "t", &["steps=20".into(), "optimizer.lr=0.01".into()])
            .unwrap();
        assert_eq!(c.steps, 20);
        assert_eq!(c.optimizer.lr, 0.01);
        assert_eq!(c.batch, 8);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let e = TrainConfig::parse(&format!("{BASE}\nstepz = 3\n"), "t", &[]).unwrap_err();
        assert!(e.to_string().contains("stepz"), "{e}");
        let e = TrainConfig::parse(BASE, "t", &["adapter.neuronz=3".into()]).unwrap_err();
        assert!(e.to_string().contains("neuronz"), "{e}");
        let e = TrainConfig::parse(BASE, "t", &["batch=0".into()]).unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        let e = TrainConfig::parse(BASE, "t", &["steps=\"x\"".into()]).unwrap_err();
        assert!(e.to_string().contains("steps"), "{e}");
    }

    /// Every committed config (the main job's, the GPU runs', the quality study's) parses and
    /// passes validation, so a typo there fails CI rather than a device run.
    #[test]
    fn committed_configs_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut files = Vec::new();
        for dir in [root.clone(), root.join("quality")] {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "toml") {
                    files.push(p);
                }
            }
        }
        assert!(files.len() >= 18, "{files:?}");
        for p in files {
            let c = TrainConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            c.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
