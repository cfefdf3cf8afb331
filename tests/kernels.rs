//! cube_kernels on wgpu (lavapipe on CPU-only machines) against the plain-op reference:
//! row gather, the fused sparse forward and its backward (input, row and gate gradients),
//! at several sizes including ragged ones (K not a multiple of the 16-slot chunk, widths
//! not a multiple of the cube width), rows shared by many tokens, empty slots, a token with
//! no active row, and inactive (relu = 0) slots. The reference runs in f64 on ndarray; the
//! f32 kernels must agree within 1e-5 of each tensor's largest magnitude.
//!
//! Each is also run in d-slices (`cube_kernels::slices`) and in L2 passes.
//!
//! The reference backward (the trait's default, written out with dense ops) is itself checked
//! against burn's autodiff of the reference forward.
//!
//! With `--features cuda` (run on the lent GPU) the same checks run on CUDA in f32 (1e-5) and
//! bf16 (1e-2; inputs rounded to bf16 first, so only the kernels' own error is measured) —
//! wgpu has no bf16.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

#[cfg(feature = "wgpu")]
use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
#[cfg(feature = "wgpu")]
use burn::backend::Wgpu;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use cube_kernels::slices::tiles::RowTiles;
#[cfg(feature = "wgpu")]
use cube_kernels::{gather_rows, sparse_adapter};
use cube_kernels::{reference, HostIndex, SparseAdapterBackend};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

type Ref = Autodiff<NdArray<f64>>;
#[cfg(feature = "wgpu")]
type Fused = Autodiff<Wgpu<f32>>;
#[cfg(feature = "wgpu")]
type Unfused = Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>;

/// One random problem: M tokens, width d, R rows, K slots per token.
struct Case {
    m: usize,
    d: usize,
    r: usize,
    k: usize,
    x: Vec<f32>,
    rows: Vec<f32>,
    gate: Vec<f32>,
    dy: Vec<f32>,
    index: HostIndex,
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Box–Muller; plenty for test data.
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

impl Case {
    /// The same problem with every float rounded to bf16.
    #[cfg(feature = "cuda")]
    fn rounded_bf16(mut self) -> Self {
        for v in [&mut self.x, &mut self.rows, &mut self.gate, &mut self.dy] {
            for e in v.iter_mut() {
                *e = half::bf16::from_f32(*e).to_f32();
            }
        }
        self
    }

    fn new(m: usize, d: usize, r: usize, k: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut slots = Vec::with_capacity(m * k);
        for t in 0..m {
            // Token 1 has no active row; every third token leaves its last slot empty.
            let used = if t == 1 {
                0
            } else if t % 3 == 0 {
                k.min(r).saturating_sub(1)
            } else {
                k.min(r)
            };
            let picked = sample(&mut rng, r, used);
            slots.extend(picked.iter().map(|j| j as u32));
            slots.extend(std::iter::repeat_n(r as u32, k - used));
        }
        let index = HostIndex::new(&slots, m, k, r).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let x = normal(&mut rng, m * d);
        let rows = normal(&mut rng, r * 2 * d)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        // Mixed signs: about half the slots are inactive (relu = 0).
        let gate = normal(&mut rng, m * k);
        let dy = normal(&mut rng, m * d);
        Self {
            m,
            d,
            r,
            k,
            x,
            rows,
            gate,
            dy,
            index,
        }
    }
}

fn tensor<B: Backend>(
    v: &[f32],
    shape: [usize; 2],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, 2> {
    // (device, dtype): tests share the device, and its default float type is whichever test
    // created a tensor first.
    Tensor::from_data(TensorData::new(v.to_vec(), shape), (device, dtype))
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// (y, z, dx, drows, dgate) through the extension trait on backend `B`.
fn run_trait<B: AutodiffBackend + SparseAdapterBackend>(
    c: &Case,
    device: &B::Device,
    dtype: DType,
) -> [Vec<f64>; 5] {
    run_index::<B>(c, &c.index, device, dtype)
}

/// The index in L2 passes: 3 rows per token-kernel pass, 3 tokens per row-kernel pass.
fn in_passes(c: &Case, elem: usize) -> HostIndex {
    let idx = c
        .index
        .clone()
        .plan_with(c.d, elem, 3 * 2 * c.d * elem, true);
    assert_eq!(idx.token_passes.is_some(), c.r > 3);
    assert_eq!(idx.row_passes.is_some(), c.m > 3);
    idx
}

/// The index with the kernels in d-slices (`cube_kernels::slices`), no passes.
fn in_slices(c: &Case) -> HostIndex {
    let mut idx = c.index.clone().unplanned();
    idx.sliced = true;
    idx
}

/// The index in d-slices with the partial dots over row tiles (`cube_kernels::slices::tiles`).
fn in_tiles(c: &Case) -> HostIndex {
    let mut idx = in_slices(c);
    idx.tiles = Some(RowTiles::new(&idx.slots, idx.k, idx.rows));
    idx
}

/// [`run_trait`] with a given index (e.g. [`in_passes`]).
fn run_index<B: AutodiffBackend + SparseAdapterBackend>(
    c: &Case,
    index: &HostIndex,
    device: &B::Device,
    dtype: DType,
) -> [Vec<f64>; 5] {
    let x = tensor::<B>(&c.x, [c.m, c.d], device, dtype).require_grad();
    let rows = tensor::<B>(&c.rows, [c.r, 2 * c.d], device, dtype).require_grad();
    let gate = tensor::<B>(&c.gate, [c.m, c.k], device, dtype).require_grad();
    let dy = tensor::<B>(&c.dy, [c.m, c.d], device, dtype);
    let idx = index.to_device::<B>(device);
    let (y, z) = B::sparse_adapter_forward(
        x.clone().into_primitive().tensor(),
        rows.clone().into_primitive().tensor(),
        &idx,
        gate.clone().into_primitive().tensor(),
    );
    let y = Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
    let z = Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(z));
    let grads = (y.clone() * dy).sum().backward();
    [
        to_vec(y),
        to_vec(z),
        to_vec(x.grad(&grads).unwrap()),
        to_vec(rows.grad(&grads).unwrap()),
        to_vec(gate.grad(&grads).unwrap()),
    ]
}

/// The same through burn's autodiff of the plain-op reference forward (f64 ndarray).
fn run_autodiff_reference(c: &Case) -> [Vec<f64>; 5] {
    let device = Default::default();
    let x = tensor::<Ref>(&c.x, [c.m, c.d], &device, DType::F64).require_grad();
    let rows = tensor::<Ref>(&c.rows, [c.r, 2 * c.d], &device, DType::F64).require_grad();
    let gate = tensor::<Ref>(&c.gate, [c.m, c.k], &device, DType::F64).require_grad();
    let dy = tensor::<Ref>(&c.dy, [c.m, c.d], &device, DType::F64);
    let slots = TensorData::new(c.index.slots.clone(), [c.m, c.k]).convert::<i64>();
    let slots = Tensor::<Ref, 2, Int>::from_data(slots, &device);
    let (y, z) = reference::forward_tensors(x.clone(), rows.clone(), slots, gate.clone());
    let grads = (y.clone() * dy).sum().backward();
    [
        to_vec(y),
        to_vec(z),
        to_vec(x.grad(&grads).unwrap()),
        to_vec(rows.grad(&grads).unwrap()),
        to_vec(gate.grad(&grads).unwrap()),
    ]
}

const NAMES: [&str; 5] = ["y", "z", "dx", "drows", "dgate"];

/// Largest difference relative to the reference's largest magnitude.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (g, w)| a.max((g - w).abs()))
        / scale
}

fn assert_all_close(label: &str, got: &[Vec<f64>; 5], want: &[Vec<f64>; 5], tol: f64) {
    for i in 0..5 {
        let e = rel_err(&got[i], &want[i]);
        assert!(
            e <= tol,
            "{label}: {} differs by {e:.2e} (tolerance {tol:.0e})",
            NAMES[i]
        );
    }
}

/// (M, d, R, K): ragged widths and K, d = 576 (SmolLM2's width), shared rows, K > R.
const SIZES: [(usize, usize, usize, usize); 6] = [
    (1, 8, 4, 1),
    (5, 33, 17, 3),
    (37, 96, 50, 16),
    (19, 130, 64, 21),
    (24, 576, 40, 33),
    (6, 64, 5, 8),
];

#[test]
fn reference_backward_matches_autodiff_of_reference_forward() {
    for (i, &(m, d, r, k)) in SIZES.iter().enumerate() {
        let c = Case::new(m, d, r, k, 10 + i as u64);
        let manual = run_trait::<Ref>(&c, &Default::default(), DType::F64);
        let auto = run_autodiff_reference(&c);
        assert_all_close(
            &format!("reference {m}x{d} R{r} K{k}"),
            &manual,
            &auto,
            1e-12,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn fused_kernels_match_reference_on_wgpu() {
    let device = Default::default();
    for (i, &(m, d, r, k)) in SIZES.iter().enumerate() {
        let c = Case::new(m, d, r, k, 10 + i as u64);
        let want = run_autodiff_reference(&c);
        let fused = run_trait::<Fused>(&c, &device, DType::F32);
        assert_all_close(
            &format!("wgpu (fusion) {m}x{d} R{r} K{k}"),
            &fused,
            &want,
            1e-5,
        );
        let plain = run_trait::<Unfused>(&c, &device, DType::F32);
        assert_all_close(&format!("wgpu {m}x{d} R{r} K{k}"), &plain, &want, 1e-5);
        for (label, got) in [
            (
                "fusion",
                run_index::<Fused>(&c, &in_slices(&c), &device, DType::F32),
            ),
            (
                "plain",
                run_index::<Unfused>(&c, &in_slices(&c), &device, DType::F32),
            ),
            (
                "fusion, row tiles",
                run_index::<Fused>(&c, &in_tiles(&c), &device, DType::F32),
            ),
            (
                "plain, row tiles",
                run_index::<Unfused>(&c, &in_tiles(&c), &device, DType::F32),
            ),
        ] {
            let label = format!("wgpu {label} d-slices {m}x{d} R{r} K{k}");
            assert_all_close(&label, &got, &want, 1e-5);
        }
        let passes = run_index::<Fused>(&c, &in_passes(&c, 4), &device, DType::F32);
        assert_all_close(
            &format!("wgpu passes {m}x{d} R{r} K{k}"),
            &passes,
            &want,
            1e-5,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn kernels_are_deterministic() {
    let device = Default::default();
    let c = Case::new(40, 96, 12, 9, 3); // 12 rows shared by 40 tokens
    let a = run_trait::<Fused>(&c, &device, DType::F32);
    let b = run_trait::<Fused>(&c, &device, DType::F32);
    assert_eq!(a, b);
    for idx in [in_passes(&c, 4), in_slices(&c), in_tiles(&c)] {
        let a = run_index::<Fused>(&c, &idx, &device, DType::F32);
        let b = run_index::<Fused>(&c, &idx, &device, DType::F32);
        assert_eq!(a, b);
    }
    // Row tiles change where the sums run, not their terms or order: the same bits.
    let d_slices = run_index::<Fused>(&c, &in_slices(&c), &device, DType::F32);
    let tiles = run_index::<Fused>(&c, &in_tiles(&c), &device, DType::F32);
    assert_eq!(tiles, d_slices, "row tiles");
}

#[cfg(feature = "wgpu")]
#[test]
fn tensor_api_and_gather_match_reference() {
    let device = Default::default();
    let c = Case::new(9, 40, 13, 5, 7);
    let idx = c.index.to_device::<Wgpu<f32>>(&device);
    let y = sparse_adapter(
        tensor::<Wgpu<f32>>(&c.x, [c.m, c.d], &device, DType::F32),
        tensor::<Wgpu<f32>>(&c.rows, [c.r, 2 * c.d], &device, DType::F32),
        &idx,
        tensor::<Wgpu<f32>>(&c.gate, [c.m, c.k], &device, DType::F32),
    );
    assert!(rel_err(&to_vec(y), &run_autodiff_reference(&c)[0]) <= 1e-5);

    // Gather with repeated indices and an uneven row width.
    let (n, w) = (23, 37);
    let src: Vec<f32> = (0..n * w).map(|i| i as f32 * 0.5 - 3.0).collect();
    let ids: Vec<i32> = vec![4, 4, 0, 22, 7, 4, 13, 0];
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| src[i as usize * w..][..w].iter().map(|&v| v as f64))
        .collect();
    let run = |ids: &[i32]| {
        let s = tensor::<Wgpu<f32>>(&src, [n, w], &device, DType::F32);
        let i = Tensor::<Wgpu<f32>, 1, Int>::from_data(
            TensorData::new(ids.to_vec(), [ids.len()]),
            &device,
        );
        to_vec(gather_rows(s, i))
    };
    assert_eq!(run(&ids), want);
    let u = Tensor::<CubeBackend<WgpuRuntime, f32, i32, u32>, 2>::from_data(
        TensorData::new(src.clone(), [n, w]),
        &device,
    );
    let i = Tensor::<CubeBackend<WgpuRuntime, f32, i32, u32>, 1, Int>::from_data(
        TensorData::new(ids.clone(), [ids.len()]),
        &device,
    );
    assert_eq!(to_vec(gather_rows(u, i)), want);
}

/// The bench's read probe: every element read `sweeps` times, through the fused and un-fused
/// backends, the kernel itself (per-unit partials) and the fallback for a length it does not
/// take (not a power of two). Values are multiples of 1/4, so every sum is exact in f32.
#[cfg(feature = "wgpu")]
#[test]
fn read_probe_reads_every_element_sweeps_times() {
    type Plain = CubeBackend<WgpuRuntime, f32, i32, u32>;
    let device = Default::default();
    for (n, sweeps) in [(8192usize, 1usize), (8192, 3), (1 << 15, 5), (1000, 2)] {
        let src: Vec<f32> = (0..n)
            .map(|i| (i % 7) as f32 - 3.0 + (i % 3) as f32 * 0.25)
            .collect();
        let want = sweeps as f64 * src.iter().map(|&v| v as f64).sum::<f64>();
        let data = || TensorData::new(src.clone(), [n]);
        let fused = Tensor::<Wgpu<f32>, 1>::from_data(data(), &device);
        let got = Tensor::<Wgpu<f32>, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(
            Wgpu::<f32>::read_probe(fused.into_primitive().tensor(), sweeps),
        ));
        assert_eq!(to_vec(got), vec![want], "fused, n {n}, sweeps {sweeps}");
        let plain = Tensor::<Plain, 1>::from_data(data(), &device);
        let prim = plain.into_primitive().tensor();
        let got = Tensor::<Plain, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(
            Plain::read_probe(prim.clone(), sweeps),
        ));
        assert_eq!(to_vec(got), vec![want], "un-fused, n {n}, sweeps {sweeps}");
        let partials = cube_kernels::probe::read_probe(prim, sweeps);
        assert_eq!(partials.is_some(), n.is_power_of_two(), "n {n}");
        if let Some(p) = partials {
            let p = to_vec(Tensor::<Plain, 1>::from_primitive(
                burn::tensor::TensorPrimitive::Float(p),
            ));
            assert_eq!(p.len() % 256, 0);
            assert_eq!(p.iter().sum::<f64>(), want, "kernel partials, n {n}");
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use meft::backend::CudaUnfused;

    /// The CPU sizes plus LLaMA-7B width, K = 64 and K = 1024.
    fn sizes() -> Vec<(usize, usize, usize, usize)> {
        let mut v = SIZES.to_vec();
        v.extend([
            (64, 4096, 300, 64),
            (8, 4096, 2048, 1024),
            (33, 8192, 128, 40),
        ]);
        v
    }

    #[test]
    fn fused_kernels_match_reference_on_cuda_f32() {
        let device = CudaDevice::new(0);
        for (i, (m, d, r, k)) in sizes().into_iter().enumerate() {
            let c = Case::new(m, d, r, k, 10 + i as u64);
            let want = run_autodiff_reference(&c);
            let got = run_trait::<Autodiff<CudaUnfused<f32>>>(&c, &device, DType::F32);
            assert_all_close(&format!("cuda f32 {m}x{d} R{r} K{k}"), &got, &want, 1e-5);
            let got = run_trait::<Autodiff<Cuda<f32>>>(&c, &device, DType::F32);
            assert_all_close(
                &format!("cuda f32 fusion {m}x{d} R{r} K{k}"),
                &got,
                &want,
                1e-5,
            );
            let got =
                run_index::<Autodiff<CudaUnfused<f32>>>(&c, &in_passes(&c, 4), &device, DType::F32);
            assert_all_close(
                &format!("cuda f32 passes {m}x{d} R{r} K{k}"),
                &got,
                &want,
                1e-5,
            );
            if k <= cube_kernels::slices::MAX_K {
                let got = run_index::<Autodiff<Cuda<f32>>>(&c, &in_slices(&c), &device, DType::F32);
                assert_all_close(
                    &format!("cuda f32 d-slices {m}x{d} R{r} K{k}"),
                    &got,
                    &want,
                    1e-5,
                );
                let got = run_index::<Autodiff<Cuda<f32>>>(&c, &in_tiles(&c), &device, DType::F32);
                assert_all_close(
                    &format!("cuda f32 row tiles {m}x{d} R{r} K{k}"),
                    &got,
                    &want,
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn fused_kernels_match_reference_on_cuda_bf16() {
        let device = CudaDevice::new(0);
        for (i, (m, d, r, k)) in sizes().into_iter().enumerate() {
            let c = Case::new(m, d, r, k, 10 + i as u64).rounded_bf16();
            let want = run_autodiff_reference(&c);
            let got = run_trait::<Autodiff<CudaUnfused<half::bf16>>>(&c, &device, DType::BF16);
            assert_all_close(&format!("cuda bf16 {m}x{d} R{r} K{k}"), &got, &want, 1e-2);
        }
    }
}
