//! Held-out perplexity of a causal LM at several context lengths.
//!
//! For context length L the first `tokens` tokens of the held-out stream are cut into
//! `tokens / L` non-overlapping windows (at least one); every position of a window predicts
//! the next token, and the perplexity is `exp(mean NLL)` over all of them. Every context
//! length reads the same stretch of text, so the figures are comparable.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::Llama;
use crate::{Error, Result};

/// One context length's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextPerplexity {
    /// Tokens per window.
    pub context: usize,
    /// Windows scored.
    pub windows: usize,
    /// Next-token predictions scored.
    pub targets: usize,
    /// Mean negative log-likelihood (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
}

/// Perplexity at each evaluated context length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// One entry per context length, in the order asked.
    pub contexts: Vec<ContextPerplexity>,
}

impl PerplexityReport {
    /// One line: `ppl@L = x` per context.
    pub fn summary(&self) -> String {
        self.contexts
            .iter()
            .map(|c| {
                format!(
                    "ppl@{} = {:.3} ({} windows)",
                    c.context, c.perplexity, c.windows
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Summed next-token NLL of `window` (`L + 1` ids) under `model`, and its target count.
fn window_nll<B: Backend>(
    model: &Llama<B>,
    window: &[u32],
    device: &B::Device,
) -> Result<(f64, usize)> {
    let n = window.len() - 1;
    let ids = |v: &[u32]| {
        let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), device)
    };
    let (inputs, targets) = (ids(&window[..n]), ids(&window[1..]));
    let hidden = model.forward_hidden(inputs, None);
    let d = hidden.dims()[2];
    let (nll, _) = model.token_nll(hidden.reshape([n, d]), targets.reshape([n]));
    let nll = nll
        .sum()
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| Error::Other(format!("reading the loss: {e:?}")))?[0];
    if !nll.is_finite() {
        return Err(Error::NonFinite(format!("perplexity window loss is {nll}")));
    }
    Ok((nll, n))
}

/// Perplexity of `model` on the first `tokens` tokens of `stream` at each of `contexts`
/// (see the module docs). Errors if the stream is shorter than a context or the model's
/// context is shorter than one.
pub fn perplexity<B: Backend>(
    model: &Llama<B>,
    stream: &[u32],
    contexts: &[usize],
    tokens: usize,
    device: &B::Device,
) -> Result<PerplexityReport> {
    let mut out = Vec::new();
    for &ctx in contexts {
        if ctx == 0 {
            return Err(Error::Other("perplexity context 0 tokens".into()));
        }
        model.check_length(ctx)?;
        let windows = (tokens / ctx).max(1);
        if stream.len() < ctx + 1 {
            return Err(Error::Other(format!(
                "the held-out text has {} tokens, fewer than one {ctx}-token window",
                stream.len()
            )));
        }
        let (mut sum, mut count, mut done) = (0.0, 0usize, 0usize);
        for w in stream.chunks_exact(ctx + 1).take(windows) {
            let (s, n) = window_nll(model, w, device)?;
            sum += s;
            count += n;
            done += 1;
        }
        let nll = sum / count.max(1) as f64;
        out.push(ContextPerplexity {
            context: ctx,
            windows: done,
            targets: count,
            nll,
            perplexity: nll.exp(),
        });
    }
    Ok(PerplexityReport { contexts: out })
}
