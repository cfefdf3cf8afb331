//! Data-parallel workers over one host store.
//!
//! With several GPUs each worker holds a copy of the frozen base and of the router on its
//! device and a [`SparseAdapter::replica`] per MEFT layer, while the adapter store (rows and
//! both sparse-AdamW moments) stays **one** copy in host memory. One optimizer step `t`:
//!
//! 1. every worker's forward selects and gathers rows from the store as step `t − 1` left
//!    it: [`apply_worker_grads`] returns only after the update, so it is the barrier between
//!    the steps;
//! 2. each worker's loss is its own mean scaled by its share of the batch's loss tokens
//!    ([`loss_share`]), so the worker gradients sum to the gradient of the whole batch;
//! 3. the store adds the workers' row gradients per row, in worker order (a row two workers
//!    used gets both contributions; the order makes the sum deterministic), then applies one
//!    sparse AdamW step to every touched row — the same update one worker would make on the
//!    concatenated batch;
//! 4. device parameters (the routers) are summed across workers by the multi-device engine
//!    and stepped identically on each.
//!
//! Only the rows a worker used cross its PCIe link, in both directions.

use super::layer::SparseAdapter;
use super::optim::SparseAdamW;
use super::worker::RowGrad;
use crate::{Error, Result};

/// The factor a worker's mean loss is multiplied by: its loss tokens over the batch's.
pub fn loss_share(worker_tokens: usize, batch_tokens: usize) -> f64 {
    if batch_tokens == 0 {
        0.0
    } else {
        worker_tokens as f64 / batch_tokens as f64
    }
}

/// Sums the row gradients of every worker of one step into `layer`'s store (in worker order)
/// and applies one sparse AdamW step to the touched rows. `workers[w]` are worker `w`'s
/// gradients (from [`SparseAdapter::take_grads`] on its replica). Returns the rows updated.
///
/// A non-finite gradient from any worker is an error naming the row; then nothing of this
/// step is applied and the pending sums are dropped.
pub fn apply_worker_grads(
    layer: &SparseAdapter,
    workers: Vec<Vec<RowGrad>>,
    optimizer: &SparseAdamW,
) -> Result<usize> {
    for (w, grads) in workers.into_iter().enumerate() {
        if let Err(e) = layer.absorb(grads, None) {
            layer.with_store_mut(|s| s.clear_pending())?;
            return Err(match e {
                Error::NonFinite(m) => Error::NonFinite(format!("worker {w}: {m}")),
                other => other,
            });
        }
    }
    layer.with_store_mut(|s| optimizer.step_store(s))
}
