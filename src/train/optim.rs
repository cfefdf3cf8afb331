//! [`AdapterOptimizer`]: burn-train's optimizer for an [`AdaptedLm`]. One `step` updates both
//! kinds of trainable state with the scheduled learning rate:
//! - device parameters (router, LoRA pairs, dense adapter): burn's AdamW;
//! - MEFT rows: the row gradients the training step staged are handed to the host worker,
//!   which reads them back and applies [`SparseAdamW`] to the touched rows of each layer's
//!   store (at `lr × sparse_lr / lr`). Each layer's next forward waits for its own update.
//!
//! Clones share state (the training loop keeps one to checkpoint the AdamW moments; burn's
//! `Learner` owns the other). burn's `Optimizer::step` cannot fail: an error is left in the
//! model's [`RowSlot`](super::model::RowSlot) for the loop to report.

use std::sync::{Arc, Mutex};

use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::LearningRate;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;

use super::model::AdaptedLm;
use crate::adapter::{HostWorker, SparseAdamW};
use crate::Result;

type Dense<B> = OptimizerAdaptor<AdamW, AdaptedLm<B>, B>;

/// The dense AdamW's record (moments per parameter id).
pub type DenseRecord<B> = <Dense<B> as Optimizer<AdaptedLm<B>, B>>::Record;

struct Inner<B: AutodiffBackend> {
    dense: Dense<B>,
    sparse: SparseAdamW,
    sparse_scale: f64,
    worker: Arc<HostWorker>,
}

/// AdamW on the device parameters + sparse AdamW on the MEFT rows (see the module docs).
pub struct AdapterOptimizer<B: AutodiffBackend> {
    inner: Arc<Mutex<Inner<B>>>,
}

impl<B: AutodiffBackend> Clone for AdapterOptimizer<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B: AutodiffBackend> AdapterOptimizer<B> {
    /// AdamW (β 0.9/0.999, ε 1e-8, decoupled decay `weight_decay`, optional per-parameter norm
    /// clipping) for both parts; the rows' learning rate is the schedule's × `sparse_scale`.
    pub fn new(weight_decay: f64, grad_clip: Option<f64>, sparse_scale: f64) -> Result<Self> {
        let dense = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(weight_decay as f32)
            .with_grad_clipping(grad_clip.map(|c| GradientClippingConfig::Norm(c as f32)))
            .init();
        let sparse = SparseAdamW {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: weight_decay as f32,
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dense,
                sparse,
                sparse_scale,
                worker: Arc::new(HostWorker::new()?),
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The dense AdamW's state.
    pub fn dense_record(&self) -> DenseRecord<B> {
        self.lock().dense.to_record()
    }

    /// Restores the dense AdamW's state.
    pub fn load_dense_record(&self, record: DenseRecord<B>) {
        let mut g = self.lock();
        g.dense = g.dense.clone().load_record(record);
    }

    /// Hands the staged row gradients to the sparse optimizer; an error is left in the
    /// module's slot for the training loop (burn's `Optimizer::step` cannot return one).
    fn sparse_step(&self, lr: LearningRate, module: &AdaptedLm<B>) {
        if let Err(e) = self.hand_off_rows(lr, module) {
            module.staged.fail(e);
        }
    }

    fn hand_off_rows(&self, lr: LearningRate, module: &AdaptedLm<B>) -> Result<()> {
        let Some(rows) = module.staged.take_rows() else {
            return Ok(());
        };
        let g = self.lock();
        let opt = SparseAdamW {
            lr: (lr * g.sparse_scale) as f32,
            ..g.sparse
        };
        module.adapters.hand_off_taken(rows, Some(opt), &g.worker)
    }
}

impl<B: AutodiffBackend> Optimizer<AdaptedLm<B>, B> for AdapterOptimizer<B>
where
    AdaptedLm<B>: AutodiffModule<B>,
{
    type Record = DenseRecord<B>;

    fn step(
        &mut self,
        lr: LearningRate,
        module: AdaptedLm<B>,
        grads: GradientsParams,
    ) -> AdaptedLm<B> {
        self.sparse_step(lr, &module);
        self.lock().dense.step(lr, module, grads)
    }

    fn step_multi(
        &mut self,
        lr: LearningRate,
        module: AdaptedLm<B>,
        grads: MultiGradientsParams,
    ) -> AdaptedLm<B> {
        self.sparse_step(lr, &module);
        self.lock().dense.step_multi(lr, module, grads)
    }

    fn to_record(&self) -> Self::Record {
        self.dense_record()
    }

    fn load_record(self, record: Self::Record) -> Self {
        self.load_dense_record(record);
        self
    }
}
