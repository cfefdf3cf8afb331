//! Question-answering evaluation: greedy answers scored by exact match and token F1 against
//! the reference answers, with SQuAD's normalisation (lower case, no punctuation, no articles
//! "a/an/the", single spaces); an example's score is its best over the accepted answers.

use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::data::batch::{end_token, prompt_ids};
use crate::data::QaExample;
use crate::generate::{generate_until, Sampling};
use crate::model::Llama;
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// SQuAD-style answer normalisation.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| if c.is_ascii_punctuation() { ' ' } else { c })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1.0 if the normalised strings are equal, else 0.0.
pub fn exact_match(prediction: &str, answer: &str) -> f64 {
    f64::from(u8::from(normalize(prediction) == normalize(answer)))
}

/// Harmonic mean of token precision and recall over normalised tokens (bag of words).
pub fn token_f1(prediction: &str, answer: &str) -> f64 {
    let p = normalize(prediction);
    let a = normalize(answer);
    let (p, a): (Vec<&str>, Vec<&str>) = (
        p.split(' ').filter(|w| !w.is_empty()).collect(),
        a.split(' ').filter(|w| !w.is_empty()).collect(),
    );
    if p.is_empty() || a.is_empty() {
        return f64::from(u8::from(p.is_empty() && a.is_empty()));
    }
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in &a {
        *left.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &p {
        if let Some(n) = left.get_mut(w).filter(|n| **n > 0) {
            *n -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / a.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// One evaluated example.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// Example id.
    pub id: String,
    /// The question.
    pub prompt: String,
    /// What the model answered (up to its end token or first newline, trimmed).
    pub prediction: String,
    /// Accepted answers.
    pub answers: Vec<String>,
    /// Best exact match over the answers.
    pub em: f64,
    /// Best token F1 over the answers.
    pub f1: f64,
}

/// Scores over an eval set (EM and F1 in percent).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Examples evaluated.
    pub examples: usize,
    /// Mean exact match, percent.
    pub em: f64,
    /// Mean token F1, percent.
    pub f1: f64,
    /// Wall time in seconds.
    pub secs: f64,
    /// Every prediction.
    pub predictions: Vec<Prediction>,
}

impl EvalReport {
    /// One line: `EM 12.0  F1 30.5  (n = 100, 42.1 s)`.
    pub fn summary(&self) -> String {
        format!(
            "EM {:.1}  F1 {:.1}  (n = {}, {:.1} s)",
            self.em, self.f1, self.examples, self.secs
        )
    }
}

/// Answers each example greedily (at most `max_new` tokens) and scores it.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    tok: &TextTokenizer,
    examples: &[QaExample],
    max_new: usize,
    device: &B::Device,
) -> Result<EvalReport> {
    if examples.is_empty() {
        return Err(Error::Other("empty eval set: nothing to evaluate".into()));
    }
    let start = std::time::Instant::now();
    let end = end_token(tok);
    let mut predictions = Vec::with_capacity(examples.len());
    for e in examples {
        let ids = prompt_ids(tok, &e.prompt)
            .map_err(|m| Error::Other(format!("tokenizing eval example {}: {m}", e.id)))?;
        let max_new = max_new.min(model.max_seq_len.saturating_sub(ids.len()));
        // Only the first line is scored: stop once a line break follows some text.
        let mut out = generate_until(model, &ids, max_new, Sampling::Greedy, end, device, |new| {
            tok.decode(new).is_ok_and(|t| t.trim_start().contains('\n'))
        })?;
        if out.last().copied() == end && end.is_some() {
            out.pop();
        }
        if let Some(eos) = tok.eos_id {
            if let Some(i) = out.iter().position(|&t| t == eos) {
                out.truncate(i);
            }
        }
        let text = tok.decode(&out)?;
        let prediction = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        let em = e
            .answers
            .iter()
            .map(|a| exact_match(&prediction, a))
            .fold(0.0, f64::max);
        let f1 = e
            .answers
            .iter()
            .map(|a| token_f1(&prediction, a))
            .fold(0.0, f64::max);
        predictions.push(Prediction {
            id: e.id.clone(),
            prompt: e.prompt.clone(),
            prediction,
            answers: e.answers.clone(),
            em,
            f1,
        });
    }
    let n = predictions.len() as f64;
    Ok(EvalReport {
        examples: predictions.len(),
        em: 100.0 * predictions.iter().map(|p| p.em).sum::<f64>() / n,
        f1: 100.0 * predictions.iter().map(|p| p.f1).sum::<f64>() / n,
        secs: start.elapsed().as_secs_f64(),
        predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation_and_scores() {
        assert_eq!(normalize("The  Eiffel-Tower!"), "eiffel tower");
        assert_eq!(exact_match("Paris.", "paris"), 1.0);
        assert_eq!(exact_match("It is Paris", "Paris"), 0.0);
        let f = token_f1("the city of Paris", "Paris");
        assert!((f - 0.5).abs() < 1e-12, "{f}"); // p = 1/3, r = 1
        assert_eq!(token_f1("Lyon", "Paris"), 0.0);
    }
}
