//! Users' own data: one JSON object per line, `{"prompt": "...", "answer": "..."}` (or
//! `"answers": ["...", ...]`, the first being the training target), optional `"id"`. Blank
//! lines are skipped; anything else that is not such an object is an error naming the line.

use std::path::Path;

use serde::Deserialize;

use super::{read, DataError, QaExample};

/// Longest line accepted (bytes); a longer one is an error, not an allocation.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    id: Option<String>,
    prompt: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    answers: Option<Vec<String>>,
}

/// Loads a JSONL file.
pub fn load(path: &Path) -> Result<Vec<QaExample>, DataError> {
    let bytes = read(path)?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let bad = |message: String| DataError::Format {
            path: format!("{}:{n}", path.display()),
            message,
        };
        if line.len() > MAX_LINE {
            return Err(bad(format!(
                "line is {} bytes, over the {MAX_LINE}-byte limit",
                line.len()
            )));
        }
        let text = std::str::from_utf8(line).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a prompt/answer object: {e}")))?;
        let answers = match (l.answer, l.answers) {
            (Some(a), None) => vec![a],
            (None, Some(v)) => v,
            (Some(_), Some(_)) => return Err(bad("has both \"answer\" and \"answers\"".into())),
            (None, None) => return Err(bad("has no \"answer\"".into())),
        };
        if l.prompt.trim().is_empty()
            || answers.is_empty()
            || answers.iter().any(|a| a.trim().is_empty())
        {
            return Err(bad("empty prompt or answer".into()));
        }
        out.push(QaExample {
            id: l.id.unwrap_or_else(|| format!("line{n}")),
            prompt: l.prompt,
            answers,
        });
    }
    Ok(out)
}
