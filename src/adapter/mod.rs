//! Adapters on a frozen base model, PEFT-style: a config says what to add, [`wrap`] freezes
//! the base and adds it to the chosen layers, and the returned [`Adapters`] handle reaches the
//! host-side parts (MEFT stores) for gradient collection, the sparse optimizer and metrics.
//!
//! - [`meft`]: the MEFT sparse adapter (host store, router, top-K, sparse AdamW).
//! - [`dense`]: the dense parallel adapter baseline (same N, all on the compute device).
//! - [`lora`]: the LoRA baseline.
//! - [`metrics`]: transfer metrics for burn-train's dashboard ([`TransferMetric`]).
//! - [`placement`]: where each part lives ([`Hybrid`]: model on the compute backend, stores on
//!   the host).
//! - [`transfer`]: host ↔ device traffic (pinned staging, counters).

pub mod dense;
pub mod lora;
pub mod meft;
pub mod metrics;
pub mod placement;
pub mod transfer;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use dense::{DenseAdapterConfig, DenseAdapterFfn};
pub use lora::{LoraConfig, LoraDelta, LoraTarget, Projection};
pub use meft::{HostWorker, MeftConfig, MeftFfn, SparseAdamW, SparseAdapter};
pub use metrics::{TransferMetric, TransferQuantity};
pub use placement::{HostStore, Hybrid, Placement};
pub use transfer::TransferStats;

use crate::model::{Ffn, Llama};
use crate::{Error, Result};

/// The float type adapters are kept and computed in beside a base of float type `base`: at
/// least f32. A bf16 or f16 base gets f32 adapters (PEFT's `autocast_adapter_dtype`): their
/// inputs are cast up at the adapter's entry and their outputs cast back to the base's type, so
/// updates are not rounded away in 8 mantissa bits; f32 and f64 bases keep their own type.
pub fn adapter_dtype(base: DType) -> DType {
    match base {
        DType::F64 | DType::F32 => base,
        _ => DType::F32,
    }
}

/// `t` as float type `dtype` (no cast when it already is).
pub(crate) fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// Which adapter to add.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdapterConfig {
    /// MEFT sparse adapter beside each chosen FFN.
    Meft(MeftConfig),
    /// Dense parallel adapter beside each chosen FFN.
    Dense(DenseAdapterConfig),
    /// LoRA on the chosen projections of each chosen layer.
    Lora(LoraConfig),
}

/// Which layers get the adapter.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layers {
    /// Every layer (the paper's "location: all").
    #[default]
    All,
    /// The listed layer indices.
    Only(Vec<usize>),
}

impl Layers {
    /// The selected indices for a model of `n` layers; errors on out-of-range or empty sets.
    pub fn indices(&self, n: usize) -> Result<Vec<usize>> {
        let v = match self {
            Layers::All => (0..n).collect(),
            Layers::Only(v) => {
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                v
            }
        };
        if let Some(&bad) = v.iter().find(|&&i| i >= n) {
            return Err(Error::AdapterConfig(format!(
                "layer {bad} does not exist: the model has {n} layers"
            )));
        }
        if v.is_empty() {
            return Err(Error::AdapterConfig(
                "no layers selected for the adapter".into(),
            ));
        }
        Ok(v)
    }
}

/// Host-side handle to the adapters [`wrap`] added.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    /// MEFT adapters, one per wrapped layer (empty for other kinds).
    pub sparse: Vec<SparseAdapter>,
}

impl Adapters {
    /// Moves the row gradients of all MEFT adapters to their stores (call after `backward`).
    pub fn collect_grads<AB: AutodiffBackend>(&self, grads: &mut AB::Gradients) -> Result<usize> {
        let mut n = 0;
        for a in &self.sparse {
            n += a.collect_grads::<AB>(grads)?;
        }
        Ok(n)
    }

    /// Moves every MEFT adapter's row gradients out of `grads` and queues them on `worker`, in
    /// layer order (read back, checked, added, and with `optimizer` applied, off this thread).
    /// Returns at once; each layer's next forward waits for its own update, and
    /// [`Adapters::wait_updates`] waits for all. A failed earlier update is reported here first.
    ///
    /// Waits for `device` first (the backward must be done before its gradients are read), so
    /// the worker's read-backs are copies only.
    pub fn hand_off<AB: AutodiffBackend>(
        &self,
        grads: &mut AB::Gradients,
        optimizer: Option<SparseAdamW>,
        worker: &HostWorker,
        device: &AB::Device,
    ) -> Result<()> {
        self.wait_updates()?;
        let start = std::time::Instant::now();
        AB::sync(device).map_err(|e| Error::Other(format!("device sync failed: {e:?}")))?;
        crate::timeline::record("wait device", crate::timeline::SpanKind::Wait, start);
        let taken = self
            .sparse
            .iter()
            .map(|a| a.take_grads::<AB>(grads))
            .collect::<Result<Vec<_>>>()?;
        for (a, g) in self.sparse.iter().zip(taken) {
            a.hand_off(g, optimizer, worker)?;
        }
        Ok(())
    }

    /// Queues row gradients already taken from the gradients (one list per MEFT adapter, in
    /// [`Adapters::sparse`] order, as [`SparseAdapter::take_grads`] returns them; the backward
    /// must have finished on the device) on `worker`, like [`Adapters::hand_off`].
    pub fn hand_off_taken(
        &self,
        taken: Vec<Vec<meft::RowGrad>>,
        optimizer: Option<SparseAdamW>,
        worker: &HostWorker,
    ) -> Result<()> {
        if taken.len() != self.sparse.len() {
            return Err(Error::Other(format!(
                "meft: {} row-gradient lists for {} adapters",
                taken.len(),
                self.sparse.len()
            )));
        }
        self.wait_updates()?;
        for (a, g) in self.sparse.iter().zip(taken) {
            a.hand_off(g, optimizer, worker)?;
        }
        Ok(())
    }

    /// Waits for every handed-off update; returns the first error one of them hit.
    pub fn wait_updates(&self) -> Result<()> {
        let mut first = Ok(());
        for a in &self.sparse {
            let r = a.wait_update();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Traffic of all MEFT adapters, summed.
    pub fn transfer_stats(&self) -> TransferStats {
        let mut s = TransferStats::default();
        for a in &self.sparse {
            s.add(&a.stats());
        }
        s
    }

    /// Zeroes the traffic counters.
    pub fn reset_stats(&self) {
        self.sparse.iter().for_each(SparseAdapter::reset_stats);
    }

    /// Host bytes held by the MEFT stores (parameters, moments, bookkeeping).
    pub fn host_bytes(&self) -> usize {
        self.sparse
            .iter()
            .map(|a| a.with_store(|s| s.host_bytes()).unwrap_or(0))
            .sum()
    }
}

/// Freezes `model` and adds the adapter to the chosen layers.
///
/// Everything of the base (embeddings, attention, FFNs, norms, head) stops requiring
/// gradients; the adapter's own parameters (router, dense keys/values, LoRA pairs) require
/// them. A layer that already has an adapter gets an error.
pub fn wrap<B: Backend>(
    model: Llama<B>,
    config: &AdapterConfig,
    layers: &Layers,
) -> Result<(Llama<B>, Adapters)> {
    let mut model = model.no_grad();
    let chosen = layers.indices(model.blocks.len())?;
    let mut handle = Adapters::default();
    if let AdapterConfig::Lora(c) = config {
        c.validate()?;
    }
    let blocks = std::mem::take(&mut model.blocks);
    let mut out = Vec::with_capacity(blocks.len());
    for (i, mut block) in blocks.into_iter().enumerate() {
        if chosen.binary_search(&i).is_ok() {
            if !matches!(block.ffn, Ffn::Base(_)) {
                return Err(Error::AdapterConfig(format!(
                    "layer {i} already has an adapter"
                )));
            }
            match config {
                AdapterConfig::Meft(c) => {
                    let f = MeftFfn::new(block.ffn.into_base(), c, i)?;
                    handle.sparse.push(f.adapter.clone());
                    block.ffn = Ffn::Meft(f);
                }
                AdapterConfig::Dense(c) => {
                    block.ffn = Ffn::Dense(DenseAdapterFfn::new(block.ffn.into_base(), c, i)?);
                }
                AdapterConfig::Lora(c) => {
                    block = lora::apply(block, c, i)?;
                }
            }
        }
        out.push(block);
    }
    model.blocks = out;
    Ok((model, handle))
}
