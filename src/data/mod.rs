//! Question-answering data for fine-tuning: loaders, a deterministic train/eval split, and the
//! batcher that turns (prompt, answer) pairs into causal-LM batches with answer-only loss.
//!
//! - [`countryinfo`]: templated factoid questions from the `countryinfo` country JSONs.
//! - [`fanoutqa`]: fanoutqa's dev set, its sub-questions flattened into (question, answer).
//! - [`jsonl`]: `{"prompt": …, "answer": …}` lines, for users' own data.
//! - [`text`]: long documents cut into language-model windows (every token a target).
//! - [`batch`]: ChatML tokenization ([`tokenize`]) and the burn [`QaBatcher`].

pub mod batch;
pub mod countryinfo;
pub mod fanoutqa;
pub mod jsonl;
pub mod text;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batch::{tokenize, HostIds, QaBatch, QaBatcher, TokenizedExample};

/// Why data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("{path}: {message}")]
    Format {
        /// The file (with `:line` for line-based formats).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The dataset (or one of its splits) has no examples.
    #[error("empty dataset: {0}")]
    Empty(String),
    /// An example does not fit the context.
    #[error("example {id}: {tokens} tokens (prompt + answer) do not fit the {max}-token context")]
    TooLong {
        /// The example's id.
        id: String,
        /// Its length in tokens.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// Tokenization failed.
    #[error("tokenizing example {id}: {message}")]
    Tokenize {
        /// The example's id.
        id: String,
        /// The cause.
        message: String,
    },
}

/// One question with its reference answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaExample {
    /// A stable id (the split is a function of it).
    pub id: String,
    /// The question, as the user turn.
    pub prompt: String,
    /// Accepted answers; the first is the training target, evaluation takes the best match.
    pub answers: Vec<String>,
}

/// Which loader reads the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Country facts → templated questions; the path is the folder of country JSONs.
    Countryinfo,
    /// fanoutqa dev set (`fanout-final-dev.json`), sub-questions flattened.
    Fanoutqa,
    /// One `{"prompt": …, "answer": …}` object per line (`"answers": [...]` also accepted).
    Jsonl,
    /// Plain UTF-8 text (e.g. the King James Bible) for language-model fine-tuning: windows
    /// of `max_len` tokens, the held-out split the text's tail, perplexity as the eval.
    Text,
}

/// Where examples come from: a loader and its file or folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// The loader.
    pub kind: SourceKind,
    /// Its file or folder.
    pub path: PathBuf,
}

impl DataSource {
    /// Loads every example (before the split); errors if there are none.
    pub fn load(&self) -> Result<Vec<QaExample>, DataError> {
        let v =
            match self.kind {
                SourceKind::Countryinfo => countryinfo::load(&self.path)?,
                SourceKind::Fanoutqa => fanoutqa::load(&self.path)?,
                SourceKind::Jsonl => jsonl::load(&self.path)?,
                SourceKind::Text => return Err(DataError::Format {
                    path: self.path.display().to_string(),
                    message:
                        "text sources are language-model windows, not QA examples (see data::text)"
                            .into(),
                }),
            };
        if v.is_empty() {
            return Err(DataError::Empty(format!(
                "{} yields no examples",
                self.path.display()
            )));
        }
        Ok(v)
    }
}

/// A deterministic train/eval split.
#[derive(Debug, Clone, Serialize)]
pub struct QaSplit {
    /// Training examples, in load order.
    pub train: Vec<QaExample>,
    /// Held-out examples, in load order.
    pub eval: Vec<QaExample>,
}

impl QaSplit {
    /// Puts an example in eval when a hash of (`seed`, its id) falls in the first
    /// `eval_fraction` of the range, so the split does not depend on load order or count.
    /// Errors if either side is empty.
    pub fn by_id(
        examples: Vec<QaExample>,
        eval_fraction: f64,
        seed: u64,
    ) -> Result<Self, DataError> {
        if !(0.0..1.0).contains(&eval_fraction) || eval_fraction == 0.0 {
            return Err(DataError::Empty(format!(
                "eval_fraction must be in (0, 1), got {eval_fraction}"
            )));
        }
        let cut = (eval_fraction * u64::MAX as f64) as u64;
        let (eval, train): (Vec<_>, Vec<_>) = examples
            .into_iter()
            .partition(|e| stable_hash(seed, &e.id) < cut);
        if train.is_empty() || eval.is_empty() {
            return Err(DataError::Empty(format!(
                "the split leaves {} training and {} eval examples",
                train.len(),
                eval.len()
            )));
        }
        Ok(Self { train, eval })
    }

    /// The split as a record (ids per side), for writing next to a run's outputs.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({
            "train": self.train.iter().map(|e| &e.id).collect::<Vec<_>>(),
            "eval": self.eval.iter().map(|e| &e.id).collect::<Vec<_>>(),
        })
    }
}

/// FNV-1a over the seed and the text: stable across platforms and releases (unlike std's
/// `DefaultHasher`), then a SplitMix64 finaliser to spread the bits.
pub fn stable_hash(seed: u64, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
