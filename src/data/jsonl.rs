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
    parse(&read(path)?, &path.display().to_string())
}

/// Parses JSONL bytes (`origin` and the line number name a bad line).
pub fn parse(bytes: &[u8], origin: &str) -> Result<Vec<QaExample>, DataError> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let bad = |message: String| DataError::Format {
            path: format!("{origin}:{n}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        parse(bytes, "d.jsonl").unwrap_err().to_string()
    }

    #[test]
    fn blank_lines_are_skipped_and_bad_lines_are_named() {
        let ok = parse(
            b"\n{\"prompt\": \"q\", \"answer\": \"a\"}\n\n  \n",
            "d.jsonl",
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].id, "line2");
        assert!(parse(b"", "d.jsonl").unwrap().is_empty());
        let e = err(b"{\"prompt\": \"q\", \"answer\": \"a\"}\n{\"prompt\": \"q\", \"answer\": \"\xff\xfe\"}\n");
        assert!(e.contains("d.jsonl:2") && e.contains("UTF-8"), "{e}");
        let e = err(b"{\"prompt\": \"q\"}");
        assert!(
            e.contains("d.jsonl:1") && e.contains("no \"answer\""),
            "{e}"
        );
        let e = err(b"{\"prompt\": \" \", \"answer\": \"a\"}");
        assert!(e.contains("empty prompt"), "{e}");
        let e = err(b"{\"prompt\": \"q\", \"answer\": \"a\", \"extra\": 1}");
        assert!(e.contains("extra"), "{e}");
        let e = err(b"[1, 2]");
        assert!(e.contains("not a prompt/answer object"), "{e}");
    }

    #[test]
    fn a_huge_line_is_an_error_not_an_allocation() {
        let mut big = b"{\"prompt\": \"".to_vec();
        big.resize(MAX_LINE + 10, b'x');
        big.extend(b"\", \"answer\": \"a\"}");
        let mut bytes = b"{\"prompt\": \"q\", \"answer\": \"a\"}\n".to_vec();
        bytes.extend(&big);
        let e = err(&bytes);
        assert!(e.contains("d.jsonl:2") && e.contains("limit"), "{e}");
    }
}
