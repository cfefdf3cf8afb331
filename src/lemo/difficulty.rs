//! [`TokenDifficulty`]: which tokens' gradient is worth keeping, learned from the losses of
//! the forwards already run.
//!
//! With backward elimination the forward is exact and the pattern only decides which tokens'
//! gradient crosses the layers. The cross-entropy's gradient at a token's logits is
//! `p − onehot(target)`, whose size is set by the target's *miss* `1 − p(target)`: a token the
//! model already predicts well gives almost no gradient. Every step's forward computes each
//! token's loss anyway, so a host table of running misses per (previous token, target) pair
//! (per target where the pair is new) predicts, before the next forward, which tokens will
//! carry the gradient; the pattern keeps those. The table follows the model: a token left out
//! of the backward that the model starts to miss again scores high in the next steps.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A running mean over the first `horizon` observations, an exponential average after.
#[derive(Debug, Clone, Copy, Default)]
struct Running {
    mean: f64,
    n: u64,
}

impl Running {
    fn observe(&mut self, x: f64, horizon: u64) {
        self.n += 1;
        self.mean += (x - self.mean) / self.n.min(horizon) as f64;
    }
}

/// Running misses `1 − p(target)` per (previous token, target) pair and per target.
#[derive(Debug, Clone)]
pub struct TokenDifficulty {
    pairs: HashMap<(u32, u32), Running>,
    targets: HashMap<u32, Running>,
    all: Running,
    horizon: u64,
}

impl TokenDifficulty {
    /// An empty table whose averages forget with time constant `horizon` observations.
    pub fn new(horizon: u64) -> Self {
        Self {
            pairs: HashMap::new(),
            targets: HashMap::new(),
            all: Running::default(),
            horizon: horizon.max(1),
        }
    }

    /// Records that the model missed `target` after `prev` by `miss` (`1 − p(target)`).
    pub fn observe(&mut self, prev: u32, target: u32, miss: f64) {
        if !miss.is_finite() {
            return;
        }
        let h = self.horizon;
        self.pairs
            .entry((prev, target))
            .or_default()
            .observe(miss, h);
        self.targets.entry(target).or_default().observe(miss, h);
        self.all.observe(miss, h);
    }

    /// The expected miss of `target` after `prev`: the pair's average, else the target's,
    /// else the average over everything seen (1 before anything is seen).
    pub fn expected_miss(&self, prev: u32, target: u32) -> f64 {
        if let Some(r) = self.pairs.get(&(prev, target)) {
            return r.mean;
        }
        if let Some(r) = self.targets.get(&target) {
            return r.mean;
        }
        if self.all.n > 0 {
            self.all.mean
        } else {
            1.0
        }
    }

    /// Observations so far.
    pub fn observed(&self) -> u64 {
        self.all.n
    }

    /// The table as plain lists (sorted, so equal tables serialise equally), for checkpoints.
    pub fn to_saved(&self) -> SavedDifficulty {
        let mut pairs: Vec<_> = self
            .pairs
            .iter()
            .map(|(&(p, t), r)| (p, t, r.mean, r.n))
            .collect();
        pairs.sort_by_key(|e| (e.0, e.1));
        let mut targets: Vec<_> = self
            .targets
            .iter()
            .map(|(&t, r)| (t, r.mean, r.n))
            .collect();
        targets.sort_by_key(|e| e.0);
        SavedDifficulty {
            horizon: self.horizon,
            all: (self.all.mean, self.all.n),
            pairs,
            targets,
        }
    }

    /// The table [`TokenDifficulty::to_saved`] saved.
    pub fn from_saved(s: SavedDifficulty) -> Self {
        let run = |mean, n| Running { mean, n };
        Self {
            pairs: s
                .pairs
                .into_iter()
                .map(|(p, t, m, n)| ((p, t), run(m, n)))
                .collect(),
            targets: s
                .targets
                .into_iter()
                .map(|(t, m, n)| (t, run(m, n)))
                .collect(),
            all: run(s.all.0, s.all.1),
            horizon: s.horizon.max(1),
        }
    }

    /// Per position of a `[batch, seq]` input (row-major `inputs`, `targets`), the expected
    /// miss; positions out of the loss (`in_loss` false) get the overall average. `tie` adds a
    /// tiny pseudo-random tie-break from this seed, so equal scores do not always favour the
    /// earliest position.
    pub fn scores(&self, inputs: &[i64], targets: &[i64], in_loss: &[bool], tie: u64) -> Vec<f32> {
        let tiny = super::layer::random_scores(tie, inputs.len());
        let neutral = self.expected_miss(u32::MAX, u32::MAX);
        inputs
            .iter()
            .zip(targets)
            .zip(in_loss)
            .zip(tiny)
            .map(|(((&p, &t), &l), r)| {
                let m = match l {
                    true => self.expected_miss(p as u32, t as u32),
                    false => neutral,
                };
                m as f32 + 1e-6 * r
            })
            .collect()
    }
}

/// [`TokenDifficulty`] as plain lists: `(previous, target, mean, count)` per pair,
/// `(target, mean, count)` per target, `(mean, count)` over all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedDifficulty {
    /// Time constant of the averages, in observations.
    pub horizon: u64,
    /// The average over everything.
    pub all: (f64, u64),
    /// Per (previous token, target) pair.
    pub pairs: Vec<(u32, u32, f64, u64)>,
    /// Per target.
    pub targets: Vec<(u32, f64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lemo::select::{kept_share, select_kept};

    #[test]
    fn falls_back_from_pair_to_target_to_average() {
        let mut d = TokenDifficulty::new(10);
        assert_eq!(d.expected_miss(1, 2), 1.0);
        d.observe(1, 2, 0.2);
        d.observe(3, 2, 0.6);
        d.observe(5, 9, 0.7);
        assert!((d.expected_miss(1, 2) - 0.2).abs() < 1e-12);
        assert!((d.expected_miss(7, 2) - 0.4).abs() < 1e-12);
        assert!((d.expected_miss(7, 8) - 0.5).abs() < 1e-12);
        d.observe(1, 2, f64::NAN);
        assert_eq!(d.observed(), 3);
    }

    #[test]
    fn saves_and_restores_exactly() {
        let mut d = TokenDifficulty::new(5);
        for i in 0..50u32 {
            d.observe(i % 7, i % 3, (i as f64 * 0.37).sin().abs());
        }
        let json = serde_json::to_string(&d.to_saved()).unwrap();
        let back = TokenDifficulty::from_saved(serde_json::from_str(&json).unwrap());
        assert_eq!(back.to_saved(), d.to_saved());
        for (p, t) in [(0, 0), (3, 1), (9, 2), (9, 9)] {
            assert_eq!(back.expected_miss(p, t), d.expected_miss(p, t));
        }
    }

    #[test]
    fn forgets_after_the_horizon() {
        let mut d = TokenDifficulty::new(4);
        for _ in 0..100 {
            d.observe(0, 0, 1.0);
        }
        for _ in 0..20 {
            d.observe(0, 0, 0.0);
        }
        // 0.75^20 of the old value is left: an exponential average with time constant 4.
        let left = d.expected_miss(0, 0);
        assert!((left - 0.75f64.powi(20)).abs() < 1e-12, "{left}");
    }

    #[test]
    fn keeps_the_hardest_tokens_of_each_segment() {
        let mut d = TokenDifficulty::new(8);
        // Target 1 is always missed, target 0 never.
        d.observe(0, 1, 0.9);
        d.observe(0, 0, 0.01);
        let targets = [0i64, 1, 0, 1, 1, 0, 0, 1];
        let inputs = [0i64; 8];
        let s = d.scores(&inputs, &targets, &[true; 8], 3);
        let (idx, inv) = select_kept(&s, 1, 8, 4, 2, 0, 0);
        assert_eq!(idx, vec![1, 3, 4, 7]);
        let miss: Vec<f64> = targets.iter().map(|&t| [0.01, 0.9][t as usize]).collect();
        let share = kept_share(&inv, 4, &miss);
        assert!((share - 3.6 / 3.64).abs() < 1e-12);
        // Forced positions win over any score.
        let (idx, _) = select_kept(&s, 1, 8, 4, 2, 1, 1);
        assert_eq!((idx[0], &idx[2..]), (0, &[4, 7][..]));
        assert!(idx[1] == 1 || idx[1] == 3, "{idx:?}");
    }
}
