//! [`SparseAdamW`]: AdamW on the CPU that updates only the rows with a pending gradient.
//!
//! Semantics (lazy moments, as PyTorch's `SparseAdam`): a row's moments, weight decay and
//! bias-correction time advance only in steps where the row received a gradient. A row
//! touched in steps s₁ < s₂ < … therefore ends exactly where dense AdamW would after steps
//! with gradients g_{s₁}, g_{s₂}, …; rows never touched stay bit-identical. This differs from
//! dense AdamW, which would also decay untouched rows and move them by their stale momentum.
//!
//! The update formula is burn's `AdamW` (decoupled decay θ ← θ·(1 − lr·λ), then
//! θ ← θ − lr·m̂ / (sqrt(v̂) + ε)). Cost per touched row: ~12 flops and 5 reads + 3 writes of
//! 2·d floats (parameters, two moments, gradient), spread over the rayon pool.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::layer::SparseAdapter;
use crate::{Error, Result};

/// Sparse AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SparseAdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub epsilon: f32,
    /// Decoupled weight decay (λ).
    pub weight_decay: f32,
}

impl Default for SparseAdamW {
    /// burn's AdamW defaults (β = 0.9, 0.999; ε = 1e-5; λ = 1e-4) with lr 1e-4 (the paper's).
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
        }
    }
}

/// What one sparse step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SparseStepStats {
    /// Rows updated.
    pub rows: usize,
    /// Wall time of the update in seconds.
    pub secs: f64,
}

impl SparseAdamW {
    /// Updates the rows with pending gradients in every adapter, then clears those gradients.
    pub fn step(&self, adapters: &[SparseAdapter]) -> Result<SparseStepStats> {
        let start = std::time::Instant::now();
        let mut rows = 0;
        for a in adapters {
            rows += a.with_store_mut(|s| self.step_store(s))?;
        }
        Ok(SparseStepStats {
            rows,
            secs: start.elapsed().as_secs_f64(),
        })
    }

    /// Updates one store; returns the rows updated.
    pub fn step_store(&self, store: &mut super::store::AdapterStore) -> usize {
        let n = store.pending_rows.len();
        if n == 0 {
            return 0;
        }
        let slots: Vec<Option<usize>> = (0..store.neurons())
            .map(|j| store.pending_slot(j))
            .collect();
        let grads = std::mem::take(&mut store.pending_grads);
        self.apply(store, &slots, &grads);
        store.pending_grads = grads;
        store.clear_pending();
        n
    }

    /// Updates `rows` straight from their gradients `grads` (`rows.len() × 2d`, row-major),
    /// without staging them in the store's pending gradients: the hand-off's fast path for a
    /// layer whose rows got exactly one gradient block this step. Same result as
    /// `accumulate_grads_from` + [`SparseAdamW::step_store`].
    ///
    /// Errors (and changes nothing) if the store still has pending gradients, a row repeats or
    /// is out of range, or the sizes disagree.
    pub fn step_rows(
        &self,
        store: &mut super::store::AdapterStore,
        rows: &[u32],
        grads: &[f32],
    ) -> Result<usize> {
        let w = 2 * store.d_model();
        if !store.pending_rows.is_empty() || grads.len() != rows.len() * w {
            return Err(Error::Other(format!(
                "sparse AdamW: direct step needs no pending rows ({}) and {} × {w} floats ({})",
                store.pending_rows.len(),
                rows.len(),
                grads.len()
            )));
        }
        let mut slots = vec![None; store.neurons()];
        for (i, &j) in rows.iter().enumerate() {
            match slots.get_mut(j as usize) {
                Some(s @ None) => *s = Some(i),
                Some(Some(_)) => {
                    return Err(Error::Other(format!("sparse AdamW: row {j} given twice")))
                }
                None => {
                    return Err(Error::Other(format!(
                        "sparse AdamW: row {j} of a {}-row store",
                        store.neurons()
                    )))
                }
            }
        }
        self.apply(store, &slots, grads);
        Ok(rows.len())
    }

    /// AdamW on every row `j` with `slots[j] = Some(s)`, gradient `grads[s·2d ..][.. 2d]`.
    fn apply(
        &self,
        store: &mut super::store::AdapterStore,
        slots: &[Option<usize>],
        grads: &[f32],
    ) {
        let w = 2 * store.d_model();
        let hp = *self;
        store
            .params
            .par_chunks_mut(w)
            .zip(store.moment1.par_chunks_mut(w))
            .zip(store.moment2.par_chunks_mut(w))
            .zip(store.row_steps.par_iter_mut())
            .zip(slots.par_iter())
            .for_each(|((((p, m), v), t), slot)| {
                if let Some(s) = slot {
                    *t += 1;
                    hp.update_row(p, m, v, &grads[s * w..][..w], *t);
                }
            });
    }

    /// burn's AdamW on one row at bias-correction time `t`.
    fn update_row(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], t: u32) {
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        let decay = 1.0 - self.lr * self.weight_decay;
        for i in 0..p.len() {
            let gi = g[i];
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let step = (m[i] / c1) / ((v[i] / c2).sqrt() + self.epsilon);
            p[i] = p[i] * decay - self.lr * step;
        }
    }

    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.epsilon > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::AdapterConfig(format!(
                "sparse AdamW: invalid hyper-parameters {self:?}"
            )))
        }
    }
}
