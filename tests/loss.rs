//! The fused, chunked LM head + cross-entropy (`cube_kernels::loss`) against the plain
//! `log_softmax(h · W)` in f64: per-row losses, argmax, and the gradients with respect to the
//! hidden states and the head's weight under a random upstream gradient, at chunk sizes that
//! divide the rows, leave a ragged last chunk, hold one row, or hold everything; on ndarray
//! always and on wgpu (lavapipe) with the `wgpu` feature. Then the model's loss through it
//! equals the loss from the plain logits.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use cube_kernels::loss::ChunkedLossBackend;
use meft::model::{CausalLmBatch, Llama};

mod common;

type Ref = Autodiff<NdArray<f64>>;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec().unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    worst / scale
}

/// (rows, d, vocab, chunk sizes); the last vocabulary spans several columns per unit of the
/// row kernels (256 units), ragged.
const CASES: [(usize, usize, usize, &[usize]); 5] = [
    (37, 8, 50, &[1, 16, 37, 64]),
    (64, 16, 97, &[16, 48]),
    (1, 4, 7, &[16]),
    (100, 12, 300, &[32, 7]),
    (20, 8, 2049, &[16, 7]),
];

/// Reference: per-row NLL, argmax, and the gradients of `Σ c · nll` in f64.
fn reference(
    h: &[f32],
    w: &[f32],
    t: &[i64],
    c: &[f32],
    [n, d, v]: [usize; 3],
) -> (Vec<f64>, Vec<i64>, Vec<f64>, Vec<f64>) {
    let dev = Default::default();
    let f = |x: &[f32], s: [usize; 2]| {
        Tensor::<Ref, 2>::from_data(TensorData::new(x.to_vec(), s).convert::<f64>(), &dev)
    };
    let hh = f(h, [n, d]).require_grad();
    let ww = f(w, [d, v]).require_grad();
    let logits = hh.clone().matmul(ww.clone());
    let best: Vec<i64> = logits
        .clone()
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let targets = Tensor::<Ref, 2, Int>::from_data(TensorData::new(t.to_vec(), [n, 1]), &dev);
    let nll = log_softmax(logits, 1).gather(1, targets).neg().reshape([n]);
    let cc = Tensor::<Ref, 1>::from_data(TensorData::new(c.to_vec(), [n]).convert::<f64>(), &dev);
    let grads = (nll.clone() * cc).sum().backward();
    let gh = floats(hh.grad(&grads).unwrap());
    let gw = floats(ww.grad(&grads).unwrap());
    (floats(nll), best, gh, gw)
}

fn check<K: AutodiffBackend + ChunkedLossBackend>(name: &str, tol: f64) {
    let dev = Default::default();
    for (i, &(n, d, v, chunks)) in CASES.iter().enumerate() {
        let h = values(n * d, 11 + i as u64, 1.0);
        let w = values(d * v, 23 + i as u64, 0.8);
        let t: Vec<i64> = values(n, 5 + i as u64, 1.0)
            .iter()
            .map(|x| ((x + 1.0) * 0.5 * v as f32) as i64 % v as i64)
            .collect();
        let c = values(n, 31 + i as u64, 1.0);
        let (nll_r, best_r, gh_r, gw_r) = reference(&h, &w, &t, &c, [n, d, v]);
        for &chunk in chunks {
            let hh =
                Tensor::<K, 2>::from_data(TensorData::new(h.clone(), [n, d]), &dev).require_grad();
            let ww =
                Tensor::<K, 2>::from_data(TensorData::new(w.clone(), [d, v]), &dev).require_grad();
            let tt = Tensor::<K, 1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
            let (nll, best) = K::chunked_token_nll(
                hh.clone().into_primitive().tensor(),
                ww.clone().into_primitive().tensor(),
                tt.into_primitive(),
                chunk,
            );
            let nll = Tensor::<K, 1>::from_primitive(TensorPrimitive::Float(nll));
            let best: Vec<i64> = Tensor::<K, 1, Int>::from_primitive(best)
                .into_data()
                .convert::<i64>()
                .into_vec()
                .unwrap();
            let cc = Tensor::<K, 1>::from_data(TensorData::new(c.clone(), [n]), &dev);
            let grads = (nll.clone() * cc).sum().backward();
            let gh = floats(hh.grad(&grads).expect("hidden gradient"));
            let gw = floats(ww.grad(&grads).expect("weight gradient"));
            let case = format!("{name}: rows {n}, d {d}, vocab {v}, chunk {chunk}");
            let e = max_rel(&floats(nll), &nll_r);
            assert!(e <= tol, "{case}: nll rel err {e}");
            assert_eq!(best, best_r, "{case}: argmax");
            let e = max_rel(&gh, &gh_r);
            assert!(e <= tol, "{case}: d hidden rel err {e}");
            let e = max_rel(&gw, &gw_r);
            assert!(e <= tol, "{case}: d weight rel err {e}");
        }
    }
}

#[test]
fn chunked_loss_equals_dense_on_ndarray() {
    check::<Autodiff<NdArray<f64>>>("ndarray f64", 1e-12);
    check::<Autodiff<NdArray<f32>>>("ndarray f32", 1e-5);
}

#[test]
fn frozen_head_gets_no_gradient_and_hidden_still_does() {
    type K = Autodiff<NdArray<f64>>;
    let dev = Default::default();
    let (n, d, v) = (9, 4, 11);
    let hh = Tensor::<K, 2>::from_data(TensorData::new(values(n * d, 1, 1.0), [n, d]), &dev)
        .require_grad();
    let ww = Tensor::<K, 2>::from_data(TensorData::new(values(d * v, 2, 1.0), [d, v]), &dev);
    let tt = Tensor::<K, 1, Int>::from_data(TensorData::new(vec![3i64; n], [n]), &dev);
    let (nll, _) = cube_kernels::loss::chunked_token_nll(hh.clone(), ww.clone(), tt);
    let grads = nll.sum().backward();
    assert!(ww.grad(&grads).is_none());
    let gh = floats(hh.grad(&grads).unwrap());
    assert!(gh.iter().any(|x| x.abs() > 1e-6));
}

#[cfg(feature = "wgpu")]
#[test]
fn chunked_loss_equals_dense_on_wgpu() {
    use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
    check::<Autodiff<burn::backend::Wgpu<f32>>>("wgpu fused", 1e-5);
    check::<Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>>("wgpu", 1e-5);
}

#[test]
fn model_loss_equals_plain_logits_loss() {
    type K = Autodiff<NdArray<f64>>;
    let dev = Default::default();
    let cfg = common::tiny_llama(2);
    let model = Llama::<K>::init_random(&cfg, &dev);
    let (b, t) = (2, 7);
    let ids = |seed| {
        let v: Vec<i64> = values(b * t, seed, 1.0)
            .iter()
            .map(|x| ((x + 1.0) * 20.0) as i64 % 40)
            .collect();
        Tensor::<K, 2, Int>::from_data(TensorData::new(v, [b, t]), &dev)
    };
    let mut mask = vec![1.0f32; b * t];
    mask[0] = 0.0;
    mask[b * t - 1] = 0.0;
    let batch = CausalLmBatch {
        inputs: ids(3),
        targets: ids(4),
        target_mask: Tensor::from_data(TensorData::new(mask, [b, t]).convert::<f64>(), &dev),
    };
    let (loss, correct) = model.loss_and_correct(&batch);
    let logits = model.forward(batch.inputs.clone(), None);
    let picked = log_softmax(logits.clone(), 2)
        .gather(2, batch.targets.clone().unsqueeze_dim(2))
        .squeeze_dim::<2>(2);
    let m = batch.target_mask.clone();
    let plain = (picked * m.clone()).sum().neg() / m.clone().sum();
    let hits = logits
        .argmax(2)
        .squeeze_dim::<2>(2)
        .equal(batch.targets.clone())
        .float()
        * m;
    let (a, p) = (floats(loss)[0], floats(plain)[0]);
    assert!((a - p).abs() <= 1e-12 * p.abs(), "loss {a} vs plain {p}");
    assert_eq!(floats(correct)[0], floats(hits.sum())[0]);
}
