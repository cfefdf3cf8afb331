//! Autoregressive text generation with a KV cache: greedy, or temperature + top-p sampling.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{KvCache, Llama};
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Sample from `softmax(logits / temperature)` restricted to the smallest set of tokens
    /// whose probability mass reaches `top_p`.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1].
        top_p: f32,
        /// RNG seed, for reproducible samples.
        seed: u64,
    },
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from the nucleus of `softmax(logits / temperature)`.
fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - max) / temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = n + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f32 = nucleus.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * mass;
    for &(i, p) in nucleus {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    nucleus[cut - 1].0 as u32
}

/// Checks every id against the vocabulary size.
pub fn check_token_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
        None => Ok(()),
    }
}

/// Generates up to `max_new` tokens after `prompt`, stopping early at `eos`. Calls `on_token`
/// with each new id as it is produced. Returns the new ids.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: Option<u32>,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    generate_until(model, prompt, max_new, sampling, eos, device, |ids| {
        on_token(*ids.last().expect("called after each new token"));
        false
    })
}

/// [`generate`], also stopping as soon as `stop` (called with the new ids after each token)
/// returns true.
pub fn generate_until<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: Option<u32>,
    device: &B::Device,
    mut stop: impl FnMut(&[u32]) -> bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Other(
            "the prompt is empty: nothing to continue".into(),
        ));
    }
    let vocab = model.embed.weight.dims()[0];
    check_token_ids(prompt, vocab)?;
    model.check_length(prompt.len() + max_new)?;
    if let Sampling::TopP {
        temperature, top_p, ..
    } = sampling
    {
        if !(temperature > 0.0 && top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::Other(format!(
                "sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}"
            )));
        }
    }
    let mut rng = match sampling {
        Sampling::TopP { seed, .. } => StdRng::seed_from_u64(seed),
        Sampling::Greedy => StdRng::seed_from_u64(0),
    };
    let mut cache = KvCache::new(model.blocks.len());
    let mut input: Vec<u32> = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let ids: Vec<i32> = input.iter().map(|&t| t as i32).collect();
        let n = ids.len();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let logits = model.forward(tokens, Some(&mut cache));
        let last = logits.slice([0..1, n - 1..n]).reshape([vocab]);
        let last: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| Error::Other(format!("reading logits: {e:?}")))?;
        if last.iter().any(|x| !x.is_finite()) {
            return Err(Error::Other("the model produced non-finite logits".into()));
        }
        let next = match sampling {
            Sampling::Greedy => argmax(&last),
            Sampling::TopP {
                temperature, top_p, ..
            } => sample_top_p(&last, temperature, top_p, &mut rng),
        };
        out.push(next);
        if stop(&out) || Some(next) == eos {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_small_mass_is_greedy() {
        let logits = [0.1, 3.0, 0.2, 2.9];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(sample_top_p(&logits, 1.0, 1e-6, &mut rng), 1);
        }
        assert_eq!(argmax(&logits), 1);
    }

    #[test]
    fn top_p_samples_only_from_nucleus() {
        // p ≈ [0.0, 0.5, 0.0, 0.5]: nucleus 0.9 holds tokens 1 and 3 only.
        let logits = [-20.0, 5.0, -20.0, 5.0];
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<u32> = (0..200)
            .map(|_| sample_top_p(&logits, 1.0, 0.9, &mut rng))
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 3));
        assert!(draws.contains(&1) && draws.contains(&3));
    }
}
