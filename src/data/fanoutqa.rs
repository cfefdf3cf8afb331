//! fanoutqa (PyPI `fanoutqa==1.1.1`), closed book: every question in the dev set's
//! decomposition trees whose answer is a short fact (a string, a number, or a list of at most
//! [`MAX_LIST`] strings) becomes one (question, answer) pair. Top-level questions, whose answers
//! are aggregates (dicts, long lists), are mostly skipped by that rule.

use std::path::Path;

use serde_json::Value;

use super::{read, DataError, QaExample};

/// Longest list answer kept (joined with ", ").
pub const MAX_LIST: usize = 3;

/// Loads the dev JSON (a list of questions with `id`, `question`, `answer`, `decomposition`).
pub fn load(path: &Path) -> Result<Vec<QaExample>, DataError> {
    let root: Value = serde_json::from_slice(&read(path)?).map_err(|e| DataError::Format {
        path: path.display().to_string(),
        message: format!("not JSON: {e}"),
    })?;
    let Some(items) = root.as_array() else {
        return Err(DataError::Format {
            path: path.display().to_string(),
            message: "expected a list of questions".into(),
        });
    };
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for q in items {
        walk(q, &mut out, &mut seen);
    }
    Ok(out)
}

fn walk(q: &Value, out: &mut Vec<QaExample>, seen: &mut std::collections::HashSet<String>) {
    let id = q.get("id").and_then(Value::as_str);
    let question = q.get("question").and_then(Value::as_str).map(str::trim);
    if let (Some(id), Some(question), Some(answer)) =
        (id, question, q.get("answer").and_then(short_answer))
    {
        if !question.is_empty() && seen.insert(id.to_string()) {
            out.push(QaExample {
                id: id.to_string(),
                prompt: question.to_string(),
                answers: vec![answer],
            });
        }
    }
    if let Some(children) = q.get("decomposition").and_then(Value::as_array) {
        for c in children {
            walk(c, out, seen);
        }
    }
}

fn short_answer(a: &Value) -> Option<String> {
    let s = match a {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::Array(v) if !v.is_empty() && v.len() <= MAX_LIST => {
            let parts: Option<Vec<&str>> = v.iter().map(Value::as_str).collect();
            parts?.join(", ")
        }
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}
