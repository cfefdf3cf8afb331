//! Long documents for language-model fine-tuning (e.g. the King James Bible): the text is
//! tokenized once and cut into windows of consecutive tokens, every token a target.
//!
//! The held-out part is the *tail* of the token stream (the last `eval_fraction` of it), not
//! a hash of windows: neighbouring windows share style and names, so a random split would
//! leak. Training windows come from the head, non-overlapping.

use std::path::Path;

use super::{read, DataError, TokenizedExample};
use crate::tokenizer::TextTokenizer;

/// A tokenized document split into a training head and a held-out tail.
#[derive(Debug, Clone)]
pub struct TextSplit {
    /// Training windows of `window + 1` tokens (inputs and shifted targets).
    pub train: Vec<TokenizedExample>,
    /// The held-out tail's tokens.
    pub eval_stream: Vec<u32>,
    /// Tokens in the whole document.
    pub total_tokens: usize,
}

/// Non-overlapping windows of `window + 1` tokens over `stream` (at most `limit`), ids
/// `{prefix}{i}`; every position after the first is a target.
pub fn windows(stream: &[u32], window: usize, limit: usize, prefix: &str) -> Vec<TokenizedExample> {
    stream
        .chunks_exact(window + 1)
        .take(limit)
        .enumerate()
        .map(|(i, w)| TokenizedExample {
            id: format!("{prefix}{i}"),
            ids: w.to_vec(),
            prompt_len: 1,
        })
        .collect()
}

/// Reads and tokenizes `path` (UTF-8 text) and splits it (see the module docs). Errors name
/// the file: unreadable, not UTF-8, empty, or too short for one training and one eval window.
pub fn load(
    path: &Path,
    tok: &TextTokenizer,
    window: usize,
    eval_fraction: f64,
) -> Result<TextSplit, DataError> {
    let fmt = |message: String| DataError::Format {
        path: path.display().to_string(),
        message,
    };
    if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
        return Err(DataError::Empty(format!(
            "eval_fraction must be in (0, 1), got {eval_fraction}"
        )));
    }
    if window == 0 {
        return Err(fmt(
            "the window (data.max_len) must be at least 1 token".into()
        ));
    }
    let bytes = read(path)?;
    let text = String::from_utf8(bytes).map_err(|e| fmt(format!("not UTF-8 text: {e}")))?;
    if text.trim().is_empty() {
        return Err(DataError::Empty(format!(
            "{} holds no text",
            path.display()
        )));
    }
    let stream = tok
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| fmt(format!("tokenizing: {e}")))?
        .get_ids()
        .to_vec();
    let total = stream.len();
    let cut = total - (total as f64 * eval_fraction) as usize;
    let (head, tail) = stream.split_at(cut);
    let train = windows(head, window, usize::MAX, "train-");
    if train.is_empty() || tail.len() < 2 {
        return Err(DataError::Empty(format!(
            "{}: {total} tokens do not give one {window}-token training window and an eval tail",
            path.display()
        )));
    }
    Ok(TextSplit {
        train,
        eval_stream: tail.to_vec(),
        total_tokens: total,
    })
}
