//! The host-resident parameter store of one layer's sparse adapter.
//!
//! Row `j` holds neuron j's key and value side by side, `[k_j | v_j]` (2·d floats), so one
//! gather ships both and one device tensor carries both gradients back. The AdamW moments have
//! the same layout. Everything lives in host memory and is never copied whole to the compute
//! device; the compute side only ever sees gathered rows.
//!
//! burn tensors are immutable values, so a multi-GB table that is updated a few rows at a time
//! cannot be one without copying it every step; the store therefore owns plain row-major
//! buffers (ndarray's layout; [`AdapterStore::key_block`] lends `ndarray` views) and does its
//! scoring, gathers and updates with rayon.

use ndarray::{ArrayView2, ShapeBuilder};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::{Error, Result};

/// Sentinel for "no pending gradient" in [`AdapterStore`]'s row-to-slot map.
const NO_SLOT: u32 = u32::MAX;

/// Rows per init chunk; each chunk has its own seeded RNG, so the init does not depend on the
/// number of threads.
const INIT_CHUNK_ROWS: usize = 256;

/// Keys, values, AdamW moments and pending row gradients of one layer's adapter.
pub struct AdapterStore {
    neurons: usize,
    d: usize,
    /// `[k_j | v_j]` rows, `neurons × 2d`.
    pub(crate) params: Vec<f32>,
    /// First moments, same layout (zero until a row is first updated).
    pub(crate) moment1: Vec<f32>,
    /// Second moments, same layout.
    pub(crate) moment2: Vec<f32>,
    /// AdamW steps taken by each row (its bias-correction time).
    pub(crate) row_steps: Vec<u32>,
    /// Rows with a pending gradient, in arrival order.
    pub(crate) pending_rows: Vec<u32>,
    /// Their summed gradients, `pending_rows.len() × 2d`.
    pub(crate) pending_grads: Vec<f32>,
    /// Row → index into `pending_rows`, or [`NO_SLOT`].
    pending_slot: Vec<u32>,
}

impl std::fmt::Debug for AdapterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterStore")
            .field("neurons", &self.neurons)
            .field("d", &self.d)
            .field("pending_rows", &self.pending_rows.len())
            .finish()
    }
}

impl AdapterStore {
    /// Keys ~ N(0, key_std²), values ~ N(0, value_std²) (a zero std gives exact zeros), seeded.
    pub fn init_random(neurons: usize, d: usize, key_std: f64, value_std: f64, seed: u64) -> Self {
        let width = 2 * d;
        let mut params = vec![0f32; neurons * width];
        let normal = |std: f64| Normal::new(0.0f32, std as f32).ok();
        let (nk, nv) = (normal(key_std), normal(value_std));
        params
            .par_chunks_mut(INIT_CHUNK_ROWS * width)
            .enumerate()
            .for_each(|(chunk, rows)| {
                let mut rng =
                    StdRng::seed_from_u64(seed ^ (chunk as u64).wrapping_mul(0x9E37_79B9));
                for row in rows.chunks_exact_mut(width) {
                    let (k, v) = row.split_at_mut(d);
                    if let (Some(n), true) = (nk, key_std > 0.0) {
                        k.iter_mut().for_each(|x| *x = n.sample(&mut rng));
                    }
                    if let (Some(n), true) = (nv, value_std > 0.0) {
                        v.iter_mut().for_each(|x| *x = n.sample(&mut rng));
                    }
                }
            });
        Self::from_params(neurons, d, params)
    }

    /// A store holding the given keys and values (`neurons × d` each, row-major).
    pub fn from_keys_values(
        neurons: usize,
        d: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<Self> {
        if keys.len() != neurons * d || values.len() != neurons * d {
            return Err(Error::AdapterConfig(format!(
                "store: expected {neurons}×{d} keys and values, got {} and {} floats",
                keys.len(),
                values.len()
            )));
        }
        let mut params = vec![0f32; neurons * 2 * d];
        params
            .par_chunks_mut(2 * d)
            .zip(keys.par_chunks(d).zip(values.par_chunks(d)))
            .for_each(|(row, (k, v))| {
                row[..d].copy_from_slice(k);
                row[d..].copy_from_slice(v);
            });
        Ok(Self::from_params(neurons, d, params))
    }

    fn from_params(neurons: usize, d: usize, params: Vec<f32>) -> Self {
        let len = params.len();
        Self {
            neurons,
            d,
            params,
            moment1: vec![0.0; len],
            moment2: vec![0.0; len],
            row_steps: vec![0; neurons],
            pending_rows: Vec::new(),
            pending_grads: Vec::new(),
            pending_slot: vec![NO_SLOT; neurons],
        }
    }

    /// Parameters, first and second moments (each `neurons × 2d`) and per-row AdamW steps:
    /// the store's whole training state, for checkpoints.
    pub fn training_state(&self) -> (&[f32], &[f32], &[f32], &[u32]) {
        (&self.params, &self.moment1, &self.moment2, &self.row_steps)
    }

    /// Replaces the training state (see [`AdapterStore::training_state`]); pending gradients
    /// are dropped. Errors, changing nothing, if a size does not match the store.
    pub fn restore(
        &mut self,
        params: Vec<f32>,
        moment1: Vec<f32>,
        moment2: Vec<f32>,
        row_steps: Vec<u32>,
    ) -> Result<()> {
        let len = self.neurons * 2 * self.d;
        if params.len() != len
            || moment1.len() != len
            || moment2.len() != len
            || row_steps.len() != self.neurons
        {
            return Err(Error::AdapterConfig(format!(
                "store: expected {} × {} parameters and moments and {} step counts, got {}, {}, {} and {}",
                self.neurons,
                2 * self.d,
                self.neurons,
                params.len(),
                moment1.len(),
                moment2.len(),
                row_steps.len()
            )));
        }
        self.clear_pending();
        self.params = params;
        self.moment1 = moment1;
        self.moment2 = moment2;
        self.row_steps = row_steps;
        Ok(())
    }

    /// Number of neurons (rows).
    pub fn neurons(&self) -> usize {
        self.neurons
    }

    /// Model width d.
    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Neuron j's key (d floats).
    pub fn key(&self, j: usize) -> &[f32] {
        &self.params[j * 2 * self.d..][..self.d]
    }

    /// Neuron j's value (d floats).
    pub fn value(&self, j: usize) -> &[f32] {
        &self.params[j * 2 * self.d + self.d..][..self.d]
    }

    /// Keys of neurons `start..start + count` as a `count × d` view (row stride 2d).
    pub fn key_block(&self, start: usize, count: usize) -> ArrayView2<'_, f32> {
        let w = 2 * self.d;
        let end = (start + count - 1) * w + self.d;
        ArrayView2::from_shape(
            (count, self.d).strides((w, 1)),
            &self.params[start * w..end],
        )
        .expect("key block lies inside the store")
    }

    /// All keys, `neurons × d` (a copy; for tests, init and checkpoints).
    pub fn keys(&self) -> Vec<f32> {
        self.params
            .chunks_exact(2 * self.d)
            .flat_map(|r| &r[..self.d])
            .copied()
            .collect()
    }

    /// All values, `neurons × d` (a copy).
    pub fn values(&self) -> Vec<f32> {
        self.params
            .chunks_exact(2 * self.d)
            .flat_map(|r| &r[self.d..])
            .copied()
            .collect()
    }

    /// Bytes of host memory held (parameters, moments, step counters, pending gradients).
    pub fn host_bytes(&self) -> usize {
        4 * (self.params.len() + self.moment1.len() + self.moment2.len())
            + 4 * (self.row_steps.len() + self.pending_slot.len() + self.pending_rows.len())
            + 4 * self.pending_grads.len()
    }

    /// Copies rows `[k_j | v_j]` for the given neurons into one `rows.len() × 2d` buffer.
    pub fn gather_rows(&self, rows: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * 2 * self.d];
        self.gather_rows_into(rows, &mut out);
        out
    }

    /// Copies rows `[k_j | v_j]` into `out` (`rows.len() × 2d`, e.g. a pinned staging buffer),
    /// in parallel.
    pub fn gather_rows_into(&self, rows: &[u32], out: &mut [f32]) {
        let w = 2 * self.d;
        out[..rows.len() * w]
            .par_chunks_mut(w)
            .zip(rows.par_iter())
            .for_each(|(dst, &j)| dst.copy_from_slice(&self.params[j as usize * w..][..w]));
    }

    /// Adds gradients `grads` (`rows.len() × 2d`, rows distinct) to the pending gradients.
    pub fn accumulate_grads(&mut self, rows: &[u32], grads: Vec<f32>) -> Result<()> {
        self.accumulate_grads_from(rows, &grads)
    }

    /// As [`AdapterStore::accumulate_grads`], from a borrowed buffer (e.g. the device read-back
    /// itself). The pending buffer keeps its capacity across steps, so its pages stay mapped.
    pub fn accumulate_grads_from(&mut self, rows: &[u32], grads: &[f32]) -> Result<()> {
        let w = 2 * self.d;
        if grads.len() != rows.len() * w {
            return Err(Error::Other(format!(
                "store: {} gradient floats for {} rows of width {w}",
                grads.len(),
                rows.len()
            )));
        }
        if let Some(&bad) = rows.iter().find(|&&j| j as usize >= self.neurons) {
            return Err(Error::Other(format!(
                "store: gradient for row {bad} of a {}-row store",
                self.neurons
            )));
        }
        if self.pending_rows.is_empty() {
            for (slot, &j) in rows.iter().enumerate() {
                self.pending_slot[j as usize] = slot as u32;
            }
            self.pending_rows = rows.to_vec();
            self.pending_grads.clear();
            self.pending_grads.par_extend(grads.par_iter().copied());
            return Ok(());
        }
        // Rows seen before are summed in place (in parallel); new rows are appended.
        let mut incoming_of_slot = vec![NO_SLOT; self.pending_rows.len()];
        let mut fresh = Vec::new();
        for (i, &j) in rows.iter().enumerate() {
            match self.pending_slot[j as usize] {
                NO_SLOT => fresh.push(i),
                s => incoming_of_slot[s as usize] = i as u32,
            }
        }
        self.pending_grads
            .par_chunks_mut(w)
            .zip(incoming_of_slot.par_iter())
            .filter(|(_, &i)| i != NO_SLOT)
            .for_each(|(acc, &i)| {
                acc.iter_mut()
                    .zip(&grads[i as usize * w..][..w])
                    .for_each(|(a, g)| *a += g);
            });
        for i in fresh {
            let j = rows[i];
            self.pending_slot[j as usize] = self.pending_rows.len() as u32;
            self.pending_rows.push(j);
            self.pending_grads.extend_from_slice(&grads[i * w..][..w]);
        }
        Ok(())
    }

    /// Rows with a pending gradient.
    pub fn pending_rows(&self) -> &[u32] {
        &self.pending_rows
    }

    /// Index of row j's pending gradient, if any.
    pub(crate) fn pending_slot(&self, j: usize) -> Option<usize> {
        match self.pending_slot[j] {
            NO_SLOT => None,
            s => Some(s as usize),
        }
    }

    /// Row j's pending gradient `[∂k_j | ∂v_j]`, if any.
    pub fn pending_grad(&self, j: usize) -> Option<&[f32]> {
        let w = 2 * self.d;
        self.pending_slot(j)
            .map(|s| &self.pending_grads[s * w..][..w])
    }

    /// Row j, `[k_j | v_j]`, for editing (tests, checkpoint loading).
    pub fn row_mut(&mut self, j: usize) -> &mut [f32] {
        let w = 2 * self.d;
        &mut self.params[j * w..][..w]
    }

    /// Forgets the pending gradients.
    pub fn clear_pending(&mut self) {
        for &j in &self.pending_rows {
            self.pending_slot[j as usize] = NO_SLOT;
        }
        self.pending_rows.clear();
        self.pending_grads.clear();
    }

    /// AdamW steps taken by row j so far.
    pub fn row_steps(&self, j: usize) -> u32 {
        self.row_steps[j]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_and_accumulate() {
        let (n, d) = (5, 2);
        let keys: Vec<f32> = (0..n * d).map(|i| i as f32).collect();
        let values: Vec<f32> = (0..n * d).map(|i| -(i as f32)).collect();
        let mut s = AdapterStore::from_keys_values(n, d, &keys, &values).unwrap();
        assert_eq!(
            s.gather_rows(&[3, 1]),
            vec![6., 7., -6., -7., 2., 3., -2., -3.]
        );
        assert_eq!(s.key_block(1, 2).row(1).to_vec(), vec![4., 5.]);
        s.accumulate_grads(&[1, 4], vec![1.0; 8]).unwrap();
        s.accumulate_grads(&[4, 2], vec![2.0; 8]).unwrap();
        assert_eq!(s.pending_rows(), &[1, 4, 2]);
        let slot4 = s.pending_slot(4).unwrap();
        assert_eq!(s.pending_grads[slot4 * 4..][..4], [3.0; 4]);
        assert!(s.accumulate_grads(&[9], vec![0.0; 4]).is_err());
        s.clear_pending();
        assert!(s.pending_slot(4).is_none() && s.pending_rows().is_empty());
    }

    #[test]
    fn init_is_seeded_and_values_start_at_zero() {
        let a = AdapterStore::init_random(600, 8, 0.02, 0.0, 7);
        let b = AdapterStore::init_random(600, 8, 0.02, 0.0, 7);
        assert_eq!(a.keys(), b.keys());
        assert!(a.values().iter().all(|&v| v == 0.0));
        let std = (a.keys().iter().map(|k| k * k).sum::<f32>() / 4800.0).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
    }
}
