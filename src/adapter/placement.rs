//! Where each part of an adapted model lives, in types.
//!
//! [`Hybrid<C, S>`] puts the base model and MEFT's routers on the compute backend `C` (CUDA in
//! training, any backend in tests) and the adapter stores with their optimizer state in host
//! memory, viewed as tensors of the CPU backend `S` (ndarray). Swapping the whole model to the
//! CPU is one type change: `Hybrid<Autodiff<Cuda>>` → `Hybrid<Autodiff<NdArray>>`.
//!
//! The store itself is plain host memory (rows `[k | v]` plus AdamW moments) so that the CPU
//! side can select, gather and update single rows in place on many threads; `S` is the backend
//! its contents are exported to ([`Placement::store_tensors`]) for checkpoints, inspection and
//! tests.

use std::marker::PhantomData;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Element, Tensor, TensorData};

use super::meft::SparseAdapter;
use super::{wrap, AdapterConfig, Adapters, Layers};
use crate::model::Llama;
use crate::Result;

/// A store's keys and values `[N, d]` as tensors of the host backend `S`.
pub type StoreTensors<S> = (Tensor<S, 2>, Tensor<S, 2>);

/// Backends whose tensors live in host memory, where adapter stores can be exported.
pub trait HostStore: Backend {}

impl HostStore for NdArray<f32> {}
impl HostStore for NdArray<f64> {}

/// A placement: which backend computes, which host backend holds the adapter stores.
pub trait Placement: Clone + Send + Sync + 'static {
    /// The backend of the base model and the routers.
    type Compute: Backend;
    /// The host backend the stores are exported to.
    type Store: HostStore;

    /// The compute device.
    fn compute_device(&self) -> &burn::tensor::ops::Device<Self::Compute>;

    /// The host device of the stores.
    fn store_device(&self) -> &burn::tensor::ops::Device<Self::Store>;

    /// Freezes `model` (on the compute device) and adds the adapter: MEFT stores in host memory,
    /// routers and any dense parts on the compute device.
    fn wrap(
        &self,
        model: Llama<Self::Compute>,
        config: &AdapterConfig,
        layers: &Layers,
    ) -> Result<(Llama<Self::Compute>, Adapters)> {
        wrap(model, config, layers)
    }

    /// A MEFT adapter's keys and values `[N, d]` as tensors of the store backend.
    fn store_tensors(&self, adapter: &SparseAdapter) -> Result<StoreTensors<Self::Store>> {
        let device = self.store_device();
        // The store backend's own float type, not the device default (which the first backend
        // on a shared device sets).
        let dtype = <burn::tensor::ops::FloatElem<Self::Store> as Element>::dtype();
        adapter.with_store(|s| {
            let shape = [s.neurons(), s.d_model()];
            let keys = TensorData::new(s.keys(), shape).convert_dtype(dtype);
            let values = TensorData::new(s.values(), shape).convert_dtype(dtype);
            (
                Tensor::from_data(keys, (device, dtype)),
                Tensor::from_data(values, (device, dtype)),
            )
        })
    }
}

/// Base model and routers on `C`, adapter stores in host memory as `S` (ndarray by default).
pub struct Hybrid<C: Backend, S: HostStore = NdArray<f32>> {
    compute: C::Device,
    store: S::Device,
    _b: PhantomData<(C, S)>,
}

impl<C: Backend, S: HostStore> Hybrid<C, S> {
    /// Computes on `compute`; stores on the host backend's default device.
    pub fn new(compute: C::Device) -> Self {
        Self {
            compute,
            store: Default::default(),
            _b: PhantomData,
        }
    }
}

impl<C: Backend, S: HostStore> Clone for Hybrid<C, S> {
    fn clone(&self) -> Self {
        Self {
            compute: self.compute.clone(),
            store: self.store.clone(),
            _b: PhantomData,
        }
    }
}

impl<C: Backend, S: HostStore> std::fmt::Debug for Hybrid<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hybrid")
            .field("compute", &self.compute)
            .field("store", &self.store)
            .finish()
    }
}

impl<C: Backend, S: HostStore> Placement for Hybrid<C, S> {
    type Compute = C;
    type Store = S;

    fn compute_device(&self) -> &C::Device {
        &self.compute
    }

    fn store_device(&self) -> &S::Device {
        &self.store
    }
}
