//! [`MeftFfn`]: a frozen base FFN with the MEFT sparse adapter beside it, and
//! [`SparseAdapter`], the adapter itself (usable beside any burn module).
//!
//! Per forward call (M tokens, width d, union U of active rows):
//! 1. compute device: router scores `r = x·W_r` (`M × E`) and each token's top-P experts;
//! 2. device → host: x, the chosen experts and their gates;
//! 3. host: score the probed experts' neurons, top-K per token, union U ([`select_active`]);
//! 4. host → device: the `|U| × 2d` rows `[k | v]` (a fresh leaf when training) and indices;
//! 5. compute device: `y_t = Σ_s relu(g_ts · x_t·k_s) v_s` over each token's K slots,
//!    differentiable in x, the router and the rows ([`super::compute`]: `cube_kernels`' fused
//!    kernels on wgpu/CUDA, the plain-op reference elsewhere). After `backward`,
//!    [`SparseAdapter::collect_grads`] reads the rows' gradients back and adds them to the
//!    store for the sparse optimizer.

use std::any::Any;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use cube_kernels::HostIndex;
use rayon::prelude::*;

use super::compute::{compute_path, sparse_adapter_any, ComputePath};
use super::config::MeftConfig;
use super::optim::SparseAdamW;
use super::selection::{select_active, ActiveNeurons, Routing, SelectionRule};
use super::store::AdapterStore;
use super::worker::{HostWorker, RowGrad, UpdateGate};
use crate::adapter::transfer::{int_to_device, read_f32, upload_rows, TransferStats};
use crate::model::FeedForward;
use crate::timeline::{self, SpanKind};
use crate::{Error, Result};

/// Active rows are shipped padded with zero rows to a multiple of this (see `apply`).
pub const PAD_ROWS: usize = 64;

/// Rows shipped for one forward call, kept until their gradients are collected.
struct TapeEntry {
    rows: Vec<u32>,
    /// The device leaf, a `Tensor<B, 2>` of the autodiff backend used in the forward.
    leaf: Box<dyn Any + Send>,
}

struct Shared {
    config: MeftConfig,
    layer: usize,
    /// Shared by every [`SparseAdapter::replica`] (one store for all data-parallel workers).
    store: Arc<RwLock<AdapterStore>>,
    tape: Mutex<Vec<TapeEntry>>,
    stats: Mutex<TransferStats>,
    last_active: Mutex<Option<ActiveNeurons>>,
    update: UpdateGate,
}

/// The host side of one layer's MEFT adapter: config, parameter store, the rows awaiting
/// gradients, and traffic counters. Clones share the same store (it is the parameters).
#[derive(Clone)]
pub struct SparseAdapter {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for SparseAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseAdapter")
            .field("layer", &self.inner.layer)
            .field("config", &self.inner.config)
            .finish()
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Other("meft: adapter state lock poisoned by an earlier panic".into())
}

impl SparseAdapter {
    /// An adapter over `store` for layer `layer`; the config must match the store.
    pub fn new(config: MeftConfig, layer: usize, store: AdapterStore) -> Result<Self> {
        config.validate(store.d_model())?;
        if store.neurons() != config.neurons {
            return Err(Error::AdapterConfig(format!(
                "meft: the store has {} neurons, the config {}",
                store.neurons(),
                config.neurons
            )));
        }
        Ok(Self {
            inner: Arc::new(Shared {
                config,
                layer,
                store: Arc::new(RwLock::new(store)),
                tape: Mutex::new(Vec::new()),
                stats: Mutex::new(TransferStats::default()),
                last_active: Mutex::new(None),
                update: UpdateGate::default(),
            }),
        })
    }

    /// A handle for another data-parallel worker: the same store (parameters, moments and
    /// pending gradients, one copy in host memory), with its own tape of shipped rows, traffic
    /// counters, last active set and update gate. Unlike `clone`, whose handles share the tape
    /// too, a replica's forward and gradient collection are independent of the others'.
    pub fn replica(&self) -> Self {
        Self {
            inner: Arc::new(Shared {
                config: self.inner.config.clone(),
                layer: self.inner.layer,
                store: Arc::clone(&self.inner.store),
                tape: Mutex::new(Vec::new()),
                stats: Mutex::new(TransferStats::default()),
                last_active: Mutex::new(None),
                update: UpdateGate::default(),
            }),
        }
    }

    /// Whether `other` works on the same store (it is this adapter or one of its replicas).
    pub fn shares_store_with(&self, other: &SparseAdapter) -> bool {
        Arc::ptr_eq(&self.inner.store, &other.inner.store)
    }

    /// The adapter's config.
    pub fn config(&self) -> &MeftConfig {
        &self.inner.config
    }

    /// The model layer it belongs to.
    pub fn layer(&self) -> usize {
        self.inner.layer
    }

    /// Runs `f` with the store (read access).
    pub fn with_store<R>(&self, f: impl FnOnce(&AdapterStore) -> R) -> Result<R> {
        Ok(f(&*self.inner.store.read().map_err(poisoned)?))
    }

    /// The store, locked for reading until the guard drops.
    pub fn read_store(&self) -> Result<std::sync::RwLockReadGuard<'_, AdapterStore>> {
        self.inner.store.read().map_err(poisoned)
    }

    /// Runs `f` with the store (write access).
    pub fn with_store_mut<R>(&self, f: impl FnOnce(&mut AdapterStore) -> R) -> Result<R> {
        Ok(f(&mut *self.inner.store.write().map_err(poisoned)?))
    }

    /// Traffic since the last [`SparseAdapter::reset_stats`].
    pub fn stats(&self) -> TransferStats {
        *self.inner.stats.lock().expect("stats lock")
    }

    /// Zeroes the traffic counters.
    pub fn reset_stats(&self) {
        *self.inner.stats.lock().expect("stats lock") = TransferStats::default();
    }

    /// The active neurons of the latest forward call.
    pub fn last_active(&self) -> Option<ActiveNeurons> {
        self.inner.last_active.lock().expect("active lock").clone()
    }

    /// Router weight `[d, E]` at init: row e = scale × mean of expert e's keys (a centroid).
    pub fn router_init(&self) -> Vec<f32> {
        let cfg = &self.inner.config;
        let (e_count, size) = (cfg.expert_count(), cfg.expert_size());
        let store = self.inner.store.read().expect("store lock");
        let d = store.d_model();
        let mut w = vec![0f32; d * e_count];
        for e in 0..e_count {
            let block = store.key_block(e * size, size);
            let mean = block
                .mean_axis(ndarray::Axis(0))
                .expect("expert is not empty");
            for (i, m) in mean.iter().enumerate() {
                w[i * e_count + e] = (cfg.router_init_scale as f32) * m;
            }
        }
        w
    }

    /// The adapter's output `[M, d]` for hidden states `x` `[M, d]`, routed by `router`.
    pub fn forward<B: Backend>(&self, x: Tensor<B, 2>, router: &Linear<B>) -> Tensor<B, 2> {
        let routed = self.route(x, router);
        self.apply(routed)
    }

    /// First half of [`SparseAdapter::forward`]: router scores and each token's top experts
    /// on the device, then hidden states and routing read back to the host. Device work queued
    /// between this and [`SparseAdapter::apply`] (e.g. the base FFN) runs while the host
    /// selects and gathers.
    pub fn route<B: Backend>(&self, x: Tensor<B, 2>, router: &Linear<B>) -> Routed<B> {
        let cfg = &self.inner.config;
        timeline::set_layer(Some(self.inner.layer));
        let mut st = TransferStats {
            calls: 1,
            ..Default::default()
        };
        let start = Instant::now();
        let scores = router.forward(x.clone());
        timeline::record("router (queue)", SpanKind::Wait, start);
        // Wait for the device first, so the read-back's time is the copy alone.
        let start = Instant::now();
        let _ = B::sync(&x.device());
        timeline::record("wait device", SpanKind::Wait, start);
        let start = Instant::now();
        // Plain copies, not rayon: the host worker may be running a layer's optimizer update
        // in the global pool, and this short step should not queue behind it.
        let (x_host, b) = read_f32(x.clone().detach(), &mut st.readback_secs, <[f32]>::to_vec);
        st.hidden_to_host += b;
        // The whole score matrix comes back (M × E floats, a few MB): each token's top experts
        // are picked on the host, far faster than burn's generic top-k on the device.
        let (routing, b) = read_f32(scores.clone().detach(), &mut st.readback_secs, |s| {
            Routing::from_scores(s, cfg.expert_count(), cfg.experts_per_token)
        });
        st.routing_to_host += b;
        st.exposed_secs += start.elapsed().as_secs_f64();
        timeline::record("d2h hidden+routing", SpanKind::Transfer, start);
        Routed {
            x,
            scores,
            x_host,
            routing,
            stats: st,
        }
    }

    /// Second half of [`SparseAdapter::forward`]: waits for this layer's handed-off update (if
    /// any), selects the active neurons on the host, ships their rows, and computes the output.
    pub fn apply<B: Backend>(&self, routed: Routed<B>) -> Tensor<B, 2> {
        let Routed {
            x,
            scores,
            x_host,
            routing,
            stats: mut st,
        } = routed;
        let cfg = &self.inner.config;
        let device = x.device();
        let [m, d] = x.dims();
        let training = B::ad_enabled(&device);
        let dtype = x.dtype();
        timeline::set_layer(Some(self.inner.layer));
        st.wait_update_secs += self.inner.update.wait();

        let rule = SelectionRule {
            expert_size: cfg.expert_size(),
            top_k: cfg.top_k,
            router_gate: cfg.router_gate,
            max_active: cfg.max_active_per_batch,
        };
        let store = self.inner.store.read().expect("store lock");
        let start = Instant::now();
        let active = select_active(&store, &x_host, &routing, &rule);
        st.select_secs += start.elapsed().as_secs_f64();
        timeline::record("select", SpanKind::Work, start);
        let u = active.rows.len();
        st.active_rows += u as u64;

        let out = if u == 0 {
            drop(store);
            Tensor::zeros([m, d], (&device, dtype))
        } else {
            // Rows are padded with zeros to a multiple of PAD_ROWS: a few shapes instead of one
            // per active-row count, so the device compiles a few kernel variants, not one per
            // step. Padded rows score 0, so they add nothing and get no gradient.
            let u_pad = u.div_ceil(PAD_ROWS) * PAD_ROWS;
            let w = 2 * d;
            let fill = |r: std::ops::Range<usize>, dst: &mut [f32]| {
                let real = r.start.min(u)..r.end.min(u);
                let split = real.len() * w;
                store.gather_rows_into(&active.rows[real], &mut dst[..split]);
                dst[split..].fill(0.0);
            };
            let (mut rows, up) =
                upload_rows::<B>([u_pad, w], &device, dtype, fill, &mut st.upload_secs);
            drop(store);
            st.gather_secs += up.gather_secs;
            st.rows_to_device += up.bytes;
            st.exposed_secs += up.exposed_secs;
            st.copy_secs += up.copy_secs;
            let queued = Instant::now();
            if training {
                rows = rows.require_grad();
                self.inner.tape.lock().expect("tape lock").push(TapeEntry {
                    rows: active.rows.clone(),
                    leaf: Box::new(rows.clone()),
                });
            }
            // Empty slots point past the padded rows (the kernels' "no neuron" value).
            let k = cfg.top_k;
            let pad = active.pad();
            let slots: Vec<u32> = active
                .slots
                .iter()
                .map(|&s| if s == pad { u_pad as u32 } else { s })
                .collect();
            let index = HostIndex::new(&slots, m, k, u_pad).expect("selection yields valid slots");
            // The reference path ships the slots; the kernels also the per-row entry lists.
            let ints = match compute_path::<B>() {
                ComputePath::Kernels => {
                    index.slots.len() + index.row_offsets.len() + index.row_users.len().max(1)
                }
                ComputePath::Reference => index.slots.len(),
            };
            st.indices_to_device += (ints * std::mem::size_of::<B::IntElem>()) as u64;
            let gate = if cfg.router_gate {
                // Each slot's gate is its token's router score for the neuron's expert.
                let size = cfg.expert_size() as u32;
                let experts = active
                    .slots
                    .iter()
                    .map(|&s| {
                        if s == pad {
                            0
                        } else {
                            (active.rows[s as usize] / size) as i64
                        }
                    })
                    .collect();
                let (experts, b) =
                    int_to_device::<B, 2>(experts, [m, k], &device, &mut st.upload_secs);
                st.indices_to_device += b;
                scores.gather(1, experts)
            } else {
                Tensor::ones([m, k], (&device, dtype))
            };
            let y = sparse_adapter_any(x, rows, index, gate);
            timeline::record("adapter (queue)", SpanKind::Wait, queued);
            y
        };
        *self.inner.last_active.lock().expect("active lock") = Some(active);
        self.inner.stats.lock().expect("stats lock").add(&st);
        timeline::set_layer(None);
        out
    }

    /// Moves the gradients of every row shipped since the last call out of `grads` (still on
    /// the device, not read back yet). Errors if the forward ran on another backend than `AB`.
    pub fn take_grads<AB: AutodiffBackend>(
        &self,
        grads: &mut AB::Gradients,
    ) -> Result<Vec<RowGrad>> {
        let entries: Vec<TapeEntry> =
            std::mem::take(&mut *self.inner.tape.lock().map_err(poisoned)?);
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let leaf = entry.leaf.downcast::<Tensor<AB, 2>>().map_err(|_| {
                Error::Other(
                    "meft: gradients collected on a different backend than the forward".into(),
                )
            })?;
            // Removing the gradient leaves the read-back the only owner (no copy on ndarray).
            let Some(grad) = leaf.grad_remove(grads) else {
                continue; // The output did not reach the loss: zero gradient, nothing to add.
            };
            // Drop the padding rows (contiguous leading rows: a view, no copy).
            let [_, w] = grad.dims();
            let grad = grad.slice([0..entry.rows.len(), 0..w]);
            out.push(RowGrad {
                rows: entry.rows,
                read: Box::new(move |secs, f| read_f32(grad, secs, |g| f(g)).1),
            });
        }
        Ok(out)
    }

    /// Reads `grads` back, checks them, and adds them to the store's pending gradients; with
    /// `optimizer`, then updates the touched rows (straight from the read-back buffer when they
    /// are this step's only gradients). Returns the rows received.
    ///
    /// A non-finite gradient is an [`Error::NonFinite`] naming the row; that block is not
    /// added, and with `optimizer` nothing of this layer is updated.
    pub fn absorb(&self, grads: Vec<RowGrad>, optimizer: Option<&SparseAdamW>) -> Result<usize> {
        let mut st = TransferStats::default();
        let layer = self.inner.layer;
        timeline::set_layer(Some(layer));
        let direct = optimizer.is_some()
            && grads.len() == 1
            && self.with_store(|s| s.pending_rows().is_empty())?;
        let mut received = 0;
        let mut result = Ok(());
        for RowGrad { rows, read } in grads {
            received += rows.len();
            let start = Instant::now();
            let mut read_secs = 0.0;
            let mut consume = |g: &[f32]| {
                timeline::record("d2h row grads", SpanKind::Transfer, start);
                if let Some(i) = g.par_iter().position_any(|v| !v.is_finite()) {
                    let w = g.len() / rows.len().max(1);
                    result = Err(Error::NonFinite(format!(
                        "gradient of adapter row {} in layer {layer} is {}",
                        rows[i / w],
                        g[i]
                    )));
                    return;
                }
                let t = Instant::now();
                let Ok(mut store) = self.inner.store.write() else {
                    result = Err(poisoned(()));
                    return;
                };
                result = match (direct, optimizer) {
                    (true, Some(opt)) => {
                        let r = opt.step_rows(&mut store, &rows, g).map(|_| ());
                        st.optimizer_secs += t.elapsed().as_secs_f64();
                        timeline::record("sparse AdamW", SpanKind::Work, t);
                        r
                    }
                    _ => {
                        let r = store.accumulate_grads_from(&rows, g);
                        st.accumulate_secs += t.elapsed().as_secs_f64();
                        timeline::record("accumulate grads", SpanKind::Work, t);
                        r
                    }
                };
            };
            st.row_grads_to_host += read(&mut read_secs, &mut consume);
            st.grads_secs += read_secs;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && !direct {
            if let Some(opt) = optimizer {
                let t = Instant::now();
                self.with_store_mut(|s| opt.step_store(s))?;
                st.optimizer_secs += t.elapsed().as_secs_f64();
                timeline::record("sparse AdamW", SpanKind::Work, t);
            }
        }
        self.inner.stats.lock().map_err(poisoned)?.add(&st);
        timeline::set_layer(None);
        result.map(|()| received)
    }

    /// After `backward`, moves the gradients of every row shipped since the last call into the
    /// store's pending gradients (summed per row), removing them from `grads`. Returns the
    /// number of rows collected. Synchronous: [`SparseAdapter::hand_off`] is the overlapped form.
    ///
    /// Errors if a gradient is not finite (that row block is not added) or if the forward ran
    /// on a different backend than `AB`.
    pub fn collect_grads<AB: AutodiffBackend>(&self, grads: &mut AB::Gradients) -> Result<usize> {
        let taken = self.take_grads::<AB>(grads)?;
        self.absorb(taken, None)
    }

    /// Queues `grads` on `worker`: read back, checked, added, and (with `optimizer`) applied to
    /// the rows, off the calling thread. This layer's next forward waits for it before
    /// selecting; [`SparseAdapter::wait_update`] waits for it and reports its error.
    pub fn hand_off(
        &self,
        grads: Vec<RowGrad>,
        optimizer: Option<SparseAdamW>,
        worker: &HostWorker,
    ) -> Result<()> {
        self.inner.update.open();
        let me = self.clone();
        let job = Box::new(move || {
            let r = me.absorb(grads, optimizer.as_ref());
            me.inner.update.close(r.err());
        });
        worker
            .submit(job)
            .inspect_err(|_| self.inner.update.close(None))
    }

    /// Waits for this layer's handed-off updates; returns the first error one of them hit.
    pub fn wait_update(&self) -> Result<()> {
        self.inner.update.wait();
        match self.inner.update.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Drops rows shipped by forward calls whose gradients will not be collected (e.g. after
    /// an evaluation pass on an autodiff backend).
    pub fn clear_tape(&self) {
        self.inner.tape.lock().expect("tape lock").clear();
    }
}

/// Routing of one forward call, read back to the host (see [`SparseAdapter::route`]).
pub struct Routed<B: Backend> {
    x: Tensor<B, 2>,
    scores: Tensor<B, 2>,
    x_host: Vec<f32>,
    routing: Routing,
    stats: TransferStats,
}

/// A frozen base FFN plus the MEFT sparse adapter: `FFN(x) + V_Uᵀ relu(top-K scores)`.
#[derive(Module, Debug)]
pub struct MeftFfn<B: Backend> {
    /// The base FFN (frozen).
    pub base: FeedForward<B>,
    /// Bias-free router `[d, E]` on the compute device (trainable).
    pub router: Linear<B>,
    /// Host side: store, selection, traffic counters.
    #[module(skip)]
    pub adapter: SparseAdapter,
}

impl<B: Backend> MeftFfn<B> {
    /// Wraps `base` with a fresh adapter for layer `layer`: keys and values drawn per the
    /// config (seed + layer), router rows at the experts' scaled centroids.
    pub fn new(base: FeedForward<B>, config: &MeftConfig, layer: usize) -> Result<Self> {
        let d = base.d_model();
        config.validate(d)?;
        let store = AdapterStore::init_random(
            config.neurons,
            d,
            config.key_init_std,
            config.value_init_std,
            config.seed.wrapping_add(layer as u64),
        );
        Self::with_store(base, config.clone(), layer, store)
    }

    /// Wraps `base` with an adapter over an existing store (router at the centroids).
    pub fn with_store(
        base: FeedForward<B>,
        config: MeftConfig,
        layer: usize,
        store: AdapterStore,
    ) -> Result<Self> {
        let d = base.d_model();
        if store.d_model() != d {
            return Err(Error::AdapterConfig(format!(
                "meft: the store's width {} does not match the FFN's input width {d}",
                store.d_model()
            )));
        }
        let experts = config.expert_count();
        let adapter = SparseAdapter::new(config, layer, store)?;
        let device = base.gate.linear.weight.device();
        // From the base's dtype, not the device default (which the first backend on a device
        // sets): at least f32 (see `adapter_dtype`).
        let dtype = crate::adapter::adapter_dtype(base.gate.linear.weight.dtype());
        let w = TensorData::new(adapter.router_init(), [d, experts]).convert_dtype(dtype);
        let w = Tensor::from_data(w, (&device, dtype));
        Ok(Self {
            base,
            router: Linear {
                weight: Param::from_tensor(w),
                bias: None,
            },
            adapter,
        })
    }

    /// This layer for another data-parallel worker: copies of the base FFN and the router on
    /// `device`, the adapter a [`SparseAdapter::replica`] over the same host store.
    pub fn replica(&self, device: &B::Device) -> Self {
        Self {
            base: self.base.clone().to_device(device),
            router: self.router.clone().to_device(device),
            adapter: self.adapter.replica(),
        }
    }

    /// Applies base FFN and adapter to `[batch, seq, d]`. The router, the rows and the
    /// adapter's compute use the router's float type (at least f32, see
    /// [`crate::adapter::adapter_dtype`]); the output is `x`'s.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        use crate::adapter::to_dtype;
        let [b, t, d] = x.dims();
        let dtype = x.dtype();
        let xa = to_dtype(
            x.clone().reshape([b * t, d]),
            self.router.weight.val().dtype(),
        );
        // Routing first (it reads back), then the base FFN: its kernels run on the device
        // while the host selects and gathers the active rows.
        let routed = self.adapter.route(xa, &self.router);
        let start = std::time::Instant::now();
        let base = self.base.forward(x);
        timeline::record("base FFN (queue)", SpanKind::Wait, start);
        let y = self.adapter.apply(routed);
        base + to_dtype(y, dtype).reshape([b, t, d])
    }
}
