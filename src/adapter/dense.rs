//! The dense parallel adapter baseline: the same N key/value pairs as MEFT, all on the compute
//! device, every neuron active: `FFN(x) + relu(x·Kᵀ)·V`.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::meft::AdapterStore;
use crate::model::FeedForward;
use crate::{Error, Result};

/// Dense parallel adapter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseAdapterConfig {
    /// Adapter neurons per layer (N).
    pub neurons: usize,
    /// Standard deviation of the key init.
    #[serde(default = "default_key_std")]
    pub key_init_std: f64,
    /// Standard deviation of the value init (0: start from the base model).
    #[serde(default)]
    pub value_init_std: f64,
    /// Seed (layer i uses seed + i).
    #[serde(default)]
    pub seed: u64,
}

fn default_key_std() -> f64 {
    0.02
}

impl DenseAdapterConfig {
    /// Paper-style init for `neurons` neurons.
    pub fn new(neurons: usize) -> Self {
        Self {
            neurons,
            key_init_std: default_key_std(),
            value_init_std: 0.0,
            seed: 0,
        }
    }
}

/// A frozen base FFN plus a dense ReLU key/value adapter on the compute device.
#[derive(Module, Debug)]
pub struct DenseAdapterFfn<B: Backend> {
    /// The base FFN (frozen).
    pub base: FeedForward<B>,
    /// Keys `[N, d]` (trainable).
    pub keys: Param<Tensor<B, 2>>,
    /// Values `[N, d]` (trainable).
    pub values: Param<Tensor<B, 2>>,
}

impl<B: Backend> DenseAdapterFfn<B> {
    /// Wraps `base` with a fresh adapter for layer `layer` (same init stream as MEFT's store,
    /// so a dense and a sparse adapter with equal configs start from equal weights).
    pub fn new(base: FeedForward<B>, config: &DenseAdapterConfig, layer: usize) -> Result<Self> {
        if config.neurons == 0 {
            return Err(Error::AdapterConfig(
                "dense adapter: neurons must be >= 1".into(),
            ));
        }
        let d = base.d_model();
        let store = AdapterStore::init_random(
            config.neurons,
            d,
            config.key_init_std,
            config.value_init_std,
            config.seed.wrapping_add(layer as u64),
        );
        Ok(Self::from_store(base, &store))
    }

    /// Wraps `base` with an adapter holding the store's keys and values.
    pub fn from_store(base: FeedForward<B>, store: &AdapterStore) -> Self {
        let device = base.gate.linear.weight.device();
        let shape = [store.neurons(), store.d_model()];
        let dtype = super::adapter_dtype(base.gate.linear.weight.dtype());
        let t = |v: Vec<f32>| {
            let data = TensorData::new(v, shape).convert_dtype(dtype);
            Param::from_tensor(Tensor::from_data(data, (&device, dtype)))
        };
        Self {
            base,
            keys: t(store.keys()),
            values: t(store.values()),
        }
    }

    /// The adapter alone on `[M, d]` (computed in the adapter's float type, returned in `x`'s).
    pub fn adapter(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let keys = self.keys.val();
        let dtype = x.dtype();
        let x = super::to_dtype(x, keys.dtype());
        super::to_dtype(
            relu(x.matmul(keys.transpose())).matmul(self.values.val()),
            dtype,
        )
    }

    /// Applies base FFN and adapter to `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let base = self.base.forward(x.clone());
        base + self.adapter(x.reshape([b * t, d])).reshape([b, t, d])
    }
}
