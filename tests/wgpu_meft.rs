//! The MEFT adapter's generic compute path on wgpu (lavapipe on CPU-only machines) matches
//! ndarray: output, row gradients and input gradient, with the router gate and top-K < N. On
//! wgpu the layer runs cube_kernels' fused kernels, on ndarray the plain-op reference.
#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use meft::adapter::meft::compute::{compute_path, ComputePath};
use meft::adapter::meft::{AdapterStore, MeftConfig, MeftFfn};
use meft::adapter::Projection;
use meft::model::FeedForward;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

const SHAPE: [usize; 3] = [2, 5, 16];

fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dist = Normal::new(0.0, std).unwrap();
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}

fn tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    dev: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), (dev, DType::F32))
}

/// (output, dense key|value gradients from the store, input gradient).
fn run<B: AutodiffBackend>(dev: &B::Device) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [b, t, d] = SHAPE;
    let (n, hidden) = (96, 32);
    let p = |rows: usize, cols: usize, seed| {
        Projection::new(Linear {
            weight: Param::from_tensor(tensor(randn(rows * cols, 0.2, seed), [rows, cols], dev)),
            bias: None,
        })
    };
    let base = FeedForward {
        gate: p(d, hidden, 1),
        up: p(d, hidden, 2),
        down: p(hidden, d, 3),
    }
    .no_grad();
    let cfg = MeftConfig {
        experts: Some(12),
        experts_per_token: 3,
        top_k: 5,
        ..MeftConfig::new(n)
    };
    let store = AdapterStore::init_random(n, d, 0.5, 0.5, 4);
    let layer = MeftFfn::<B>::with_store(base, cfg, 0, store).unwrap();
    let x = tensor::<B, 3>(randn(b * t * d, 1.0, 5), SHAPE, dev).require_grad();
    let w = tensor::<B, 3>(randn(b * t * d, 1.0, 6), SHAPE, dev);
    let y = layer.forward(x.clone());
    let out: Vec<f32> = y.clone().into_data().convert::<f32>().into_vec().unwrap();
    let mut grads = (y * w).sum().backward();
    let dx = x
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    layer.adapter.collect_grads::<B>(&mut grads).unwrap();
    let rows = layer
        .adapter
        .with_store(|s| {
            (0..n)
                .flat_map(|j| s.pending_grad(j).map_or(vec![0.0; 2 * d], <[f32]>::to_vec))
                .collect()
        })
        .unwrap();
    (out, rows, dx)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= 1e-4 * scale,
        "{what}: max abs error {err}, scale {scale}"
    );
}

#[test]
fn meft_layer_on_wgpu_matches_ndarray() {
    // wgpu runs cube_kernels' fused kernels, ndarray the plain-op reference.
    assert_eq!(compute_path::<Autodiff<Wgpu<f32>>>(), ComputePath::Kernels);
    assert_eq!(
        compute_path::<Autodiff<NdArray<f32>>>(),
        ComputePath::Reference
    );
    let (cpu_out, cpu_rows, cpu_dx) = run::<Autodiff<NdArray<f32>>>(&Default::default());
    let (gpu_out, gpu_rows, gpu_dx) = run::<Autodiff<Wgpu<f32>>>(&Default::default());
    assert_close(&gpu_out, &cpu_out, "output");
    assert_close(&gpu_rows, &cpu_rows, "row gradients");
    assert_close(&gpu_dx, &cpu_dx, "input gradient");
    assert!(cpu_rows.iter().any(|&g| g != 0.0), "some rows were active");
}
