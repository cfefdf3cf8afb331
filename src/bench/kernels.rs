//! `meft bench kernels`: cube_kernels' row gather, fused sparse forward and backward against
//! the generic-op path (burn `select`; select → matmul → mask) on the same inputs, beside the
//! device's bandwidth and compute ceilings measured in the same run.
//!
//! Counting: `unique` bytes count each input read once and each output written once (the
//! issue's definition); `gathered` bytes count what a kernel without cross-token reuse must
//! stream (each token's K key/value rows, each row-gradient entry's x and dy rows). FLOPs are
//! the sparse work: 4·M·K·d forward, 8·M·K·d backward. Inputs are positive, so every slot is
//! active (as after MEFT's selection, which keeps only positive-scoring neurons) and the
//! kernels cannot skip rows. Each op's kernel result is compared with the generic result.
//!
//! Slot patterns: `random` draws each token's K rows uniformly from all R (no structure to
//! reuse); `routed` draws them as MEFT's router makes them — the rows are E experts of
//! contiguous neurons (the compact union keeps neuron order), each token probes P experts and
//! its K rows lie among their neurons — so tokens that share an expert share rows.
//!
//! Ceilings: `a + b` (read and write), a streaming read over a buffer far larger than L2
//! (DRAM read) and over a 16 MiB one (L2 read), with the kernels' 16-byte loads
//! ([`cube_kernels::probe`]), and burn's f32 matmul.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive};
use clap::ValueEnum;
use cube_kernels::{reference, ActiveIndex, HostIndex, SparseAdapterBackend};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::model::median;
use crate::adapter::meft::compute::{run_kernel_task, KernelTask};
use crate::adapter::meft::MeftConfig;
use crate::backend::BackendTask;
use crate::{Error, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct KernelBench {
    /// Model width d.
    pub d_model: usize,
    /// Tokens M.
    pub tokens: usize,
    /// Active rows on the device R (every token picks its K among them).
    pub neurons: usize,
    /// Slot counts K to measure.
    pub top_k: Vec<usize>,
    /// Untimed repeats per op.
    pub warmup: usize,
    /// Timed repeats per op (median reported).
    pub iters: usize,
    /// Skip the generic path (its `M × R` matrices need ~10 such buffers of memory).
    pub skip_generic: bool,
    /// Slot patterns to measure, in order.
    pub patterns: Vec<SlotPattern>,
    /// Experts E of the routed pattern (0: the divisor of R nearest 4·√R, the paper's).
    pub experts: usize,
    /// Experts each token probes in the routed pattern (the paper's 8).
    pub probes: usize,
    /// Row label.
    pub label: String,
}

/// How each token's K slots are drawn (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotPattern {
    /// K distinct rows drawn uniformly from all R.
    Random,
    /// K distinct rows among the neurons of P distinct random experts (contiguous blocks).
    Routed,
}

/// The device's ceilings, measured in the run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ceilings {
    /// `a + b` (2 reads, 1 write; 1 GiB each at full size), GB/s.
    pub bandwidth_gbps: f64,
    /// Square side of the matmul below.
    pub matmul_size: usize,
    /// burn's matmul at that size, TFLOP/s (the device's float throughput as burn reaches it).
    pub matmul_tflops: f64,
    /// Streaming read of a buffer far larger than L2 (the read probe), GB/s.
    pub read_gbps: f64,
    /// Streaming read of a 16 MiB buffer read over and over (L2-resident), GB/s.
    pub l2_read_gbps: f64,
}

/// One op at one K.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelBenchResult {
    /// Row label.
    pub label: String,
    /// Slot pattern: `random`, or `routed E×P` (experts × probes per token).
    pub slots: String,
    /// `gather`, `forward`, `backward` or `forward+backward`.
    pub op: String,
    /// Tokens M.
    pub tokens: usize,
    /// Width d.
    pub d_model: usize,
    /// Rows R.
    pub rows: usize,
    /// Slots per token K.
    pub top_k: usize,
    /// Kernel time, ms (median).
    pub kernel_ms: f64,
    /// Generic-op time, ms (median), if measured.
    pub generic_ms: Option<f64>,
    /// generic / kernel.
    pub speedup: Option<f64>,
    /// Bytes, each input read once and each output written once.
    pub unique_bytes: f64,
    /// Bytes a kernel without cross-token reuse streams.
    pub gathered_bytes: f64,
    /// Sparse FLOPs.
    pub flops: f64,
    /// unique bytes / kernel time, GB/s.
    pub kernel_gbps: f64,
    /// gathered bytes / kernel time, GB/s.
    pub kernel_gathered_gbps: f64,
    /// FLOPs / kernel time, TFLOP/s.
    pub kernel_tflops: f64,
    /// "bandwidth" or "compute": which ceiling bounds the op on unique bytes.
    pub binding: String,
    /// Ideal time at the binding ceiling (unique bytes) / kernel time.
    pub share_of_ceiling: f64,
    /// gathered bytes / bandwidth ceiling / kernel time.
    pub gathered_share_of_bandwidth: f64,
    /// gathered bytes / DRAM read ceiling / kernel time (1: streamed at DRAM read speed).
    pub gathered_share_of_read: f64,
    /// gathered bytes / L2 read ceiling / kernel time (1: streamed at L2 read speed).
    pub gathered_share_of_l2: f64,
    /// Largest |kernel − generic| / largest |generic| over the op's outputs.
    pub max_rel_diff: Option<f64>,
    /// L2 passes the kernels ran in: token kernels P, row kernel Q (1 = no blocking).
    pub passes: [usize; 2],
    /// Whether the kernels ran in d-slices (`cube_kernels::slices`).
    #[serde(default)]
    pub sliced: bool,
    /// Whether the d-sliced partial dots ran over row tiles (`cube_kernels::slices::tiles`).
    #[serde(default)]
    pub tiled: bool,
    /// The ceilings measured in this run.
    pub ceilings: Ceilings,
}

impl BackendTask for KernelBench {
    type Output = Vec<KernelBenchResult>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        run_kernel_task::<B, _>(device, self).unwrap_or_else(|| {
            Err(Error::Unsupported(
                "meft bench kernels needs a backend with cube_kernels (cpu f32, wgpu, cuda)".into(),
            ))
        })
    }
}

fn float<K: Backend>(t: FloatTensor<K>) -> Tensor<K, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<K: Backend>(t: &Tensor<K, 2>) -> FloatTensor<K> {
    t.clone().into_primitive().tensor()
}

fn sync<K: Backend>(device: &K::Device) -> Result<()> {
    K::sync(device).map_err(|e| Error::Other(format!("device sync failed: {e:?}")))
}

/// Median wall time of `f` (synchronised before and after), ms.
fn time<K: Backend, R>(
    device: &K::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> R,
) -> Result<(f64, R)> {
    let mut last = None;
    for _ in 0..warmup {
        last = Some(f());
    }
    sync::<K>(device)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        drop(last.take());
        let start = Instant::now();
        last = Some(f());
        sync::<K>(device)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(&ms), last.expect("at least one run")))
}

/// The kernels' forward and backward on one index: median ms of each, and their outputs.
struct KernelRun<K: Backend> {
    forward_ms: f64,
    backward_ms: f64,
    /// `[y, z]`.
    forward: [Tensor<K, 2>; 2],
    /// `[dx, drows, dgate]`.
    backward: [Tensor<K, 2>; 3],
}

/// Times the kernels' forward and backward on `idx` (see [`KernelRun`]).
#[allow(clippy::too_many_arguments)]
fn time_kernels<K: SparseAdapterBackend>(
    device: &K::Device,
    warmup: usize,
    iters: usize,
    x: &Tensor<K, 2>,
    rows: &Tensor<K, 2>,
    gate: &Tensor<K, 2>,
    dy: &Tensor<K, 2>,
    idx: &ActiveIndex<K>,
) -> Result<KernelRun<K>> {
    let (f, (y, z)) = time::<K, _>(device, warmup, iters, || {
        let (y, z) = K::sparse_adapter_forward(prim(x), prim(rows), idx, prim(gate));
        (float::<K>(y), float::<K>(z))
    })?;
    let (b, g) = time::<K, _>(device, warmup, iters, || {
        let g =
            K::sparse_adapter_backward(prim(x), prim(rows), idx, prim(gate), prim(&z), prim(dy));
        [float::<K>(g.x), float::<K>(g.rows), float::<K>(g.gate)]
    })?;
    Ok(KernelRun {
        forward_ms: f,
        backward_ms: b,
        forward: [y, z],
        backward: g,
    })
}

/// Which of the kernels' paths a bench row ran (fields of [`KernelBenchResult`]).
#[derive(Debug, Clone, Copy, Default)]
struct KernelPath {
    sliced: bool,
    tiled: bool,
}

impl KernelPath {
    fn of(host: &HostIndex) -> Self {
        Self {
            sliced: host.sliced,
            tiled: host.tiles.is_some(),
        }
    }
}

/// Largest `|got − want| / max |want|` over the pairs; NaN when either side holds a NaN or an
/// infinity (a fold with `f64::max` would drop a NaN and report agreement).
fn rel_diff<K: Backend>(got: &[Tensor<K, 2>], want: &[Tensor<K, 2>]) -> f64 {
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let finite = |t: &Tensor<K, 2>| {
            let s = t.clone().sum().into_scalar().to_f64_lossy();
            s.is_finite()
        };
        if !finite(g) || !finite(w) {
            return f64::NAN;
        }
        let scale = w.clone().abs().max().into_scalar().to_f64_lossy();
        let diff = (g.clone() - w.clone())
            .abs()
            .max()
            .into_scalar()
            .to_f64_lossy();
        let r = diff / scale.max(1e-30);
        if r.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(r);
    }
    worst
}

trait ToF64 {
    fn to_f64_lossy(self) -> f64;
}
impl<E: burn::tensor::ElementConversion> ToF64 for E {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
}

/// Ceilings measured at a size that follows the problem's (1 GiB buffers and a 4096³ matmul
/// at LLaMA-7B geometry; smaller for small runs).
fn ceilings<K: SparseAdapterBackend>(
    device: &K::Device,
    elems: usize,
    width: usize,
    iters: usize,
) -> Result<Ceilings> {
    let n = elems.clamp(1 << 16, 1 << 28);
    let a = Tensor::<K, 1>::random([n], Distribution::Default, device);
    let b = Tensor::<K, 1>::random([n], Distribution::Default, device);
    let elem = a.dtype().size() as f64;
    let (ms, _) = time::<K, _>(device, 2, iters, || a.clone() + b.clone())?;
    let bandwidth_gbps = 3.0 * n as f64 * elem / (ms * 1e-3) / 1e9;
    drop((a, b));
    let s = width.clamp(256, 4096);
    let a = Tensor::<K, 2>::random([s, s], Distribution::Default, device);
    let b = Tensor::<K, 2>::random([s, s], Distribution::Default, device);
    let (ms, _) = time::<K, _>(device, 2, iters, || a.clone().matmul(b.clone()))?;
    let matmul_tflops = 2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12;
    drop((a, b));
    // Reads: one sweep over a power-of-two buffer as large as the `a + b` operands, and as
    // many bytes read from a 16 MiB buffer (L2-resident: the H100's L2 is 50 MB, the H200's
    // 60 MB).
    let big = n.next_power_of_two().max(1 << 13);
    let read = |len: usize, sweeps: usize| -> Result<f64> {
        let src = Tensor::<K, 1>::random([len], Distribution::Default, device);
        let (ms, _) = time::<K, _>(device, 2, iters, || {
            Tensor::<K, 1>::from_primitive(TensorPrimitive::Float(K::read_probe(
                src.clone().into_primitive().tensor(),
                sweeps,
            )))
        })?;
        Ok((len * sweeps) as f64 * elem / (ms * 1e-3) / 1e9)
    };
    let read_gbps = read(big, 1)?;
    let small = (L2_PROBE_BYTES / elem as usize).min(big);
    let l2_read_gbps = read(small, big / small)?;
    Ok(Ceilings {
        matmul_size: s,
        bandwidth_gbps,
        matmul_tflops,
        read_gbps,
        l2_read_gbps,
    })
}

/// The L2 read probe's buffer.
const L2_PROBE_BYTES: usize = 16 << 20;

/// K distinct random rows per token, as a host index.
fn random_index(tokens: usize, rows: usize, k: usize, seed: u64) -> Result<HostIndex> {
    let per_token: Vec<Vec<u32>> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
            sample(&mut rng, rows, k).iter().map(|j| j as u32).collect()
        })
        .collect();
    let slots: Vec<u32> = per_token.concat();
    HostIndex::new(&slots, tokens, k, rows).map_err(|e| Error::Other(e.to_string()))
}

/// Checks one (pattern, K) of the bench before anything runs: 1 <= K <= the rows a token can
/// take (all R for random slots, its probed experts' neurons for routed ones, which also need
/// `1 <= probes <= experts` and experts dividing R). Returns that number of rows.
fn check_slots(
    pattern: SlotPattern,
    rows: usize,
    k: usize,
    experts: usize,
    probes: usize,
) -> Result<usize> {
    let (cap, what) = match pattern {
        SlotPattern::Random => (rows, format!("the {rows} rows")),
        SlotPattern::Routed => {
            if experts == 0 || !rows.is_multiple_of(experts) || probes == 0 || probes > experts {
                return Err(Error::Other(format!(
                    "bench kernels: routed slots need 1 <= probes ({probes}) <= experts \
                     ({experts}) and experts dividing the rows ({rows})"
                )));
            }
            let cap = probes * (rows / experts);
            (cap, format!("the {probes} probed experts' {cap} neurons"))
        }
    };
    if k == 0 || k > cap {
        return Err(Error::Other(format!(
            "bench kernels: K = {k} must be at least 1 and cannot exceed {what}"
        )));
    }
    Ok(cap)
}

/// The routed pattern: R rows as `experts` blocks of R / E contiguous rows; each token probes
/// `probes` distinct random experts and takes K distinct random rows among their neurons.
fn routed_index(
    tokens: usize,
    rows: usize,
    k: usize,
    experts: usize,
    probes: usize,
    seed: u64,
) -> Result<HostIndex> {
    let size = check_slots(SlotPattern::Routed, rows, k, experts, probes)? / probes;
    let per_token: Vec<Vec<u32>> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
            let chosen: Vec<usize> = sample(&mut rng, experts, probes).into_vec();
            sample(&mut rng, probes * size, k)
                .iter()
                .map(|c| (chosen[c / size] * size + c % size) as u32)
                .collect()
        })
        .collect();
    let slots: Vec<u32> = per_token.concat();
    HostIndex::new(&slots, tokens, k, rows).map_err(|e| Error::Other(e.to_string()))
}

struct Sizes {
    m: f64,
    d: f64,
    r: f64,
    k: f64,
    elem: f64,
    int: f64,
}

impl Sizes {
    fn forward(&self) -> (f64, f64, f64) {
        let Sizes {
            m,
            d,
            r,
            k,
            elem,
            int,
        } = *self;
        let unique = elem * (m * d + r * 2.0 * d + m * k + m * d + m * k) + int * m * k;
        let gathered = elem * (m * d + m * k * 2.0 * d + m * d + 2.0 * m * k) + int * m * k;
        (unique, gathered, 4.0 * m * k * d)
    }
    fn backward(&self) -> (f64, f64, f64) {
        let Sizes {
            m,
            d,
            r,
            k,
            elem,
            int,
        } = *self;
        // In: x, dy, rows, gate, z, slots, offsets, users. Out: dx, drows, dgate.
        let unique = elem * (2.0 * m * d + r * 2.0 * d + 2.0 * m * k + m * d + r * 2.0 * d + m * k)
            + int * (2.0 * m * k + r + 1.0);
        // Token kernel: dy, K value and key rows per token, dx; row kernel: x and dy per entry,
        // the row gradients; per-slot scalars.
        let gathered = elem
            * (m * d + m * k * 2.0 * d + m * d + m * k * 2.0 * d + r * 2.0 * d + 6.0 * m * k)
            + int * (2.0 * m * k + r + 1.0);
        (unique, gathered, 8.0 * m * k * d)
    }
}

impl KernelTask for KernelBench {
    type Output = Result<Vec<KernelBenchResult>>;

    fn run<K: SparseAdapterBackend>(self, device: K::Device) -> Self::Output {
        let (m, d, r) = (self.tokens, self.d_model, self.neurons);
        let (w, it) = (self.warmup, self.iters);
        let experts = if self.experts == 0 {
            MeftConfig::new(r).expert_count() // the divisor of R nearest 4·√R
        } else {
            self.experts
        };
        // Every (pattern, K) is checked before anything is timed, so a bad one costs nothing.
        for &p in &self.patterns {
            for &k in &self.top_k {
                check_slots(p, r, k, experts, self.probes)?;
            }
        }
        let ceil = ceilings::<K>(&device, r * 2 * d, d, it.max(3))?;
        eprintln!(
            "ceilings: {:.0} GB/s (a + b), {:.0} GB/s (DRAM read), {:.0} GB/s (L2 read), \
             {:.1} TFLOP/s (matmul {}³)",
            ceil.bandwidth_gbps,
            ceil.read_gbps,
            ceil.l2_read_gbps,
            ceil.matmul_tflops,
            ceil.matmul_size
        );
        // Positive inputs: every slot active.
        let u = |shape: [usize; 2], lo: f64, hi: f64| {
            Tensor::<K, 2>::random(shape, Distribution::Uniform(lo, hi), &device)
        };
        let scale = 1.0 / (d as f64).sqrt();
        let x = u([m, d], 0.0, 1.0);
        let rows = u([r, 2 * d], 0.0, scale);
        let dy = Tensor::<K, 2>::random([m, d], Distribution::Normal(0.0, 1.0), &device);
        let elem = x.dtype().size() as f64;
        let mut out = Vec::new();
        // Which kernels the rows pushed next ran (d-slices, row tiles).
        let path = std::cell::Cell::new(KernelPath::default());
        let mut push = |slots: &str,
                        op: &str,
                        passes: [usize; 2],
                        k: usize,
                        kernel_ms: f64,
                        generic_ms: Option<f64>,
                        (unique, gathered, flops): (f64, f64, f64),
                        diff: Option<f64>| {
            let t_bw = unique / (ceil.bandwidth_gbps * 1e9);
            let t_fl = flops / (ceil.matmul_tflops * 1e12);
            let secs = kernel_ms * 1e-3;
            let res = KernelBenchResult {
                label: self.label.clone(),
                slots: slots.into(),
                op: op.into(),
                tokens: m,
                d_model: d,
                rows: r,
                top_k: k,
                kernel_ms,
                generic_ms,
                speedup: generic_ms.map(|g| g / kernel_ms),
                unique_bytes: unique,
                gathered_bytes: gathered,
                flops,
                kernel_gbps: unique / secs / 1e9,
                kernel_gathered_gbps: gathered / secs / 1e9,
                kernel_tflops: flops / secs / 1e12,
                binding: if t_bw >= t_fl { "bandwidth" } else { "compute" }.into(),
                share_of_ceiling: t_bw.max(t_fl) / secs,
                gathered_share_of_bandwidth: gathered / (ceil.bandwidth_gbps * 1e9) / secs,
                gathered_share_of_read: gathered / (ceil.read_gbps * 1e9) / secs,
                gathered_share_of_l2: gathered / (ceil.l2_read_gbps * 1e9) / secs,
                max_rel_diff: diff,
                passes,
                sliced: path.get().sliced,
                tiled: path.get().tiled,
                ceilings: ceil,
            };
            eprintln!(
                "{slots} {op} K={k} passes {passes:?}: kernel {kernel_ms:.2} ms, generic {}",
                generic_ms.map_or("–".into(), |g| format!("{g:.2} ms"))
            );
            out.push(res);
        };

        let runs: Vec<(SlotPattern, usize)> = self
            .patterns
            .iter()
            .flat_map(|&p| self.top_k.iter().map(move |&k| (p, k)))
            .collect();
        for (pattern, k) in runs {
            let (host, slots) = match pattern {
                SlotPattern::Random => (random_index(m, r, k, 7 + k as u64)?, "random".into()),
                SlotPattern::Routed => (
                    routed_index(m, r, k, experts, self.probes, 7 + k as u64)?,
                    format!("routed {experts}×{}", self.probes),
                ),
            };
            let slots: String = slots;
            let host = host.plan(d, elem as usize);
            let int = std::mem::size_of::<K::IntElem>() as f64;
            let sizes = Sizes {
                m: m as f64,
                d: d as f64,
                r: r as f64,
                k: k as f64,
                elem,
                int,
            };
            let passes = [
                host.token_passes.as_ref().map_or(1, |p| p.passes),
                host.row_passes.as_ref().map_or(1, |p| p.passes),
            ];
            let idx = host.to_device::<K>(&device);
            path.set(KernelPath::default());
            let gate = u([m, k], 0.5, 1.5);

            // Gather: the union of the active rows out of the R staged rows.
            let mut union: Vec<i32> = host.slots.clone();
            union.par_sort_unstable();
            union.dedup();
            let n_union = union.len();
            let ids = TensorData::new(union, [n_union]).convert::<K::IntElem>();
            let ids = Tensor::<K, 1, Int>::from_data(ids, &device);
            let (gk, g1) = time::<K, _>(&device, w, it, || {
                float::<K>(K::gather_rows(prim(&rows), ids.clone().into_primitive()))
            })?;
            let (gg, diff) = if self.skip_generic {
                (None, None)
            } else {
                let (gg, g2) = time::<K, _>(&device, w, it, || {
                    float::<K>(reference::gather_rows::<K>(
                        prim(&rows),
                        ids.clone().into_primitive(),
                    ))
                })?;
                (Some(gg), Some(rel_diff(&[g1], &[g2])))
            };
            let nu = n_union as f64;
            let gb = elem * 2.0 * (nu * 2.0 * d as f64) + int * nu;
            push(&slots, "gather", [1, 1], k, gk, gg, (gb, gb, 0.0), diff);
            path.set(KernelPath::of(&host));

            let KernelRun {
                forward_ms: fk,
                backward_ms: bk,
                forward: [y, z],
                backward: gk3,
            } = time_kernels(&device, w, it, &x, &rows, &gate, &dy, &idx)?;
            let (fg, bg, fdiff, bdiff) = if self.skip_generic {
                (None, None, None, None)
            } else {
                let (fg, (yr, zr)) = time::<K, _>(&device, w.min(1), it, || {
                    let (y, z) = reference::forward::<K>(prim(&x), prim(&rows), &idx, prim(&gate));
                    (float::<K>(y), float::<K>(z))
                })?;
                let amax = |t: &Tensor<K, 2>| t.clone().abs().max().into_scalar().to_f64_lossy();
                eprintln!(
                    "K={k}: max |y| kernels {:.4e}, generic {:.4e}",
                    amax(&y),
                    amax(&yr)
                );
                let fdiff = rel_diff(&[y.clone(), z.clone()], &[yr, zr]);
                let (bg, gr3) = time::<K, _>(&device, w.min(1), it, || {
                    let g = reference::backward::<K>(
                        prim(&x),
                        prim(&rows),
                        &idx,
                        prim(&gate),
                        prim(&z),
                        prim(&dy),
                    );
                    [float::<K>(g.x), float::<K>(g.rows), float::<K>(g.gate)]
                })?;
                let bdiff = rel_diff(&gk3, &gr3);
                (Some(fg), Some(bg), Some(fdiff), Some(bdiff))
            };
            let (fu, fgath, ff) = sizes.forward();
            let (bu, bgath, bf) = sizes.backward();
            push(&slots, "forward", passes, k, fk, fg, (fu, fgath, ff), fdiff);
            push(
                &slots,
                "backward",
                passes,
                k,
                bk,
                bg,
                (bu, bgath, bf),
                bdiff,
            );
            let both_generic = fg.zip(bg).map(|(a, b)| a + b);
            let both_diff = fdiff.zip(bdiff).map(|(a, b)| a.max(b));
            let both = (fu + bu, fgath + bgath, ff + bf);
            push(
                &slots,
                "forward+backward",
                passes,
                k,
                fk + bk,
                both_generic,
                both,
                both_diff,
            );
            if passes != [1, 1] {
                // The same kernels in one pass (no L2 blocking), checked against the passes.
                let one = host.clone().unplanned().to_device::<K>(&device);
                let KernelRun {
                    forward_ms: f1,
                    backward_ms: b1,
                    forward: [y1, z1],
                    backward: g1,
                } = time_kernels(&device, w, it, &x, &rows, &gate, &dy, &one)?;
                let d1 = rel_diff(&[y1, z1], &[y.clone(), z.clone()]).max(rel_diff(&g1, &gk3));
                eprintln!("one pass vs passes: max rel diff {d1:.1e}");
                path.set(KernelPath::default());
                let op = "forward+backward, one pass";
                push(&slots, op, [1, 1], k, f1 + b1, both_generic, both, Some(d1));
            }
            // Side by side: the same kernels over whole rows / in d-slices, whichever the
            // plan did not pick, and in d-slices without row tiles if the plan took them.
            let mut alts = Vec::new();
            if passes == [1, 1] && cube_kernels::slices::supported(elem as usize, k) {
                let mut alt = host.clone().unplanned();
                alt.sliced = !host.sliced;
                let name = if alt.sliced { "d-slices" } else { "whole rows" };
                alts.push((alt, name));
            }
            if host.tiles.is_some() {
                let mut alt = host.clone();
                alt.tiles = None;
                alts.push((alt, "d-slices without tiles"));
            }
            for (alt, name) in alts {
                let run = time_kernels(
                    &device,
                    w,
                    it,
                    &x,
                    &rows,
                    &gate,
                    &dy,
                    &alt.to_device::<K>(&device),
                )?;
                let d1 = rel_diff(&run.forward, &[y.clone(), z.clone()])
                    .max(rel_diff(&run.backward, &gk3));
                eprintln!("{name} vs planned: max rel diff {d1:.1e}");
                path.set(KernelPath::of(&alt));
                let fgb = run.forward_ms + run.backward_ms;
                push(
                    &slots,
                    &format!("forward, {name}"),
                    [1, 1],
                    k,
                    run.forward_ms,
                    fg,
                    (fu, fgath, ff),
                    Some(d1),
                );
                push(
                    &slots,
                    &format!("backward, {name}"),
                    [1, 1],
                    k,
                    run.backward_ms,
                    bg,
                    (bu, bgath, bf),
                    Some(d1),
                );
                push(
                    &slots,
                    &format!("forward+backward, {name}"),
                    [1, 1],
                    k,
                    fgb,
                    both_generic,
                    both,
                    Some(d1),
                );
            }
        }
        Ok(out)
    }
}

impl KernelBenchResult {
    /// Markdown table of results.
    pub fn table(results: &[KernelBenchResult]) -> String {
        let opt = |v: Option<f64>, p: usize| v.map_or("–".into(), |v| format!("{v:.p$}"));
        let mut s = String::from(
            "| run | slots | op | K | passes (P, Q) | kernel ms | generic ms | speedup | GB/s (unique) | GB/s (gathered) | TFLOP/s | binds | share of ceiling | gathered / a+b | gathered / DRAM read | gathered / L2 read | max rel diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in results {
            s += &format!(
                "| {} | {} | {} | {} | {}, {} | {:.2} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                r.label,
                r.slots,
                r.op,
                r.top_k,
                r.passes[0],
                if r.tiled {
                    format!("{} (d-slices, tiles)", r.passes[1])
                } else if r.sliced {
                    format!("{} (d-slices)", r.passes[1])
                } else {
                    r.passes[1].to_string()
                },
                r.kernel_ms,
                opt(r.generic_ms, 2),
                opt(r.speedup, 1),
                r.kernel_gbps,
                r.kernel_gathered_gbps,
                r.kernel_tflops,
                r.binding,
                r.share_of_ceiling,
                r.gathered_share_of_bandwidth,
                r.gathered_share_of_read,
                r.gathered_share_of_l2,
                r.max_rel_diff.map_or("–".into(), |v| format!("{v:.1e}")),
            );
        }
        s
    }
}
