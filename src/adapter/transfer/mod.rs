//! Host ↔ device traffic of the sparse adapter, counted at the one place it happens.
//!
//! Every tensor the adapter sends to the compute device or reads back goes through
//! [`upload_rows`] / [`to_device`] / [`to_host_f32`], which add the bytes actually moved (in the
//! device tensor's dtype) to a [`TransferStats`] category. On an all-CPU placement the same
//! calls count the bytes that *would* cross PCIe.
//!
//! On the un-fused CUDA backend in f32 (`MEFT_CUDA_FUSION=0`), rows go to the device through
//! pinned staging (`pinned_cuda.rs`); every other backend uses burn's `from_data`. Read-backs use
//! `into_data` everywhere (cubecl reads into pinned memory: 54 GB/s on the H100) and hand the
//! bytes to the consumer as a borrowed slice, without another host copy.
//! The choice is made on the concrete backend type at run time, so the adapter code stays
//! generic over `B: Backend`.

#[cfg(feature = "cuda")]
mod pinned_cuda;

use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use serde::Serialize;

use crate::timeline::{self, SpanKind};

/// Bytes moved per category, summed since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TransferStats {
    /// Forward calls counted.
    pub calls: u64,
    /// Hidden states read back for CPU scoring (device → host).
    pub hidden_to_host: u64,
    /// Router choices and gates read back (device → host).
    pub routing_to_host: u64,
    /// Active `[key | value]` rows sent (host → device).
    pub rows_to_device: u64,
    /// Slot and expert indices sent (host → device).
    pub indices_to_device: u64,
    /// Row gradients read back (device → host).
    pub row_grads_to_host: u64,
    /// Active rows sent (count, summed over calls).
    pub active_rows: u64,
    /// Seconds reading hidden states and routing back (includes waiting for the device to
    /// produce them).
    pub readback_secs: f64,
    /// Seconds creating the rows and indices on the device.
    pub upload_secs: f64,
    /// Seconds reading row gradients back.
    pub grads_secs: f64,
    /// Seconds adding row gradients into the stores' pending gradients.
    pub accumulate_secs: f64,
    /// Seconds spent scoring and selecting on the CPU.
    pub select_secs: f64,
    /// Seconds spent gathering rows on the CPU.
    pub gather_secs: f64,
    /// Seconds the row copies themselves took (device-timed on the pinned path).
    pub copy_secs: f64,
    /// Seconds the forward spent blocked on a copy: hidden-state and routing read-back
    /// (including the wait for the router) and the row upload's tail after the last gather.
    pub exposed_secs: f64,
    /// Seconds the forward waited for a handed-off update of its layer.
    pub wait_update_secs: f64,
    /// Seconds of the sparse optimizer applied by the hand-off ([`crate::adapter::meft::SparseAdapter::absorb`]).
    pub optimizer_secs: f64,
}

impl TransferStats {
    /// All host → device bytes.
    pub fn to_device(&self) -> u64 {
        self.rows_to_device + self.indices_to_device
    }

    /// All device → host bytes.
    pub fn to_host(&self) -> u64 {
        self.hidden_to_host + self.routing_to_host + self.row_grads_to_host
    }

    /// What happened between `earlier` (an older total of the same counters) and `self`.
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            calls: self.calls.saturating_sub(earlier.calls),
            hidden_to_host: self.hidden_to_host.saturating_sub(earlier.hidden_to_host),
            routing_to_host: self.routing_to_host.saturating_sub(earlier.routing_to_host),
            rows_to_device: self.rows_to_device.saturating_sub(earlier.rows_to_device),
            indices_to_device: self
                .indices_to_device
                .saturating_sub(earlier.indices_to_device),
            row_grads_to_host: self
                .row_grads_to_host
                .saturating_sub(earlier.row_grads_to_host),
            active_rows: self.active_rows.saturating_sub(earlier.active_rows),
            readback_secs: self.readback_secs - earlier.readback_secs,
            upload_secs: self.upload_secs - earlier.upload_secs,
            grads_secs: self.grads_secs - earlier.grads_secs,
            accumulate_secs: self.accumulate_secs - earlier.accumulate_secs,
            select_secs: self.select_secs - earlier.select_secs,
            gather_secs: self.gather_secs - earlier.gather_secs,
            copy_secs: self.copy_secs - earlier.copy_secs,
            exposed_secs: self.exposed_secs - earlier.exposed_secs,
            wait_update_secs: self.wait_update_secs - earlier.wait_update_secs,
            optimizer_secs: self.optimizer_secs - earlier.optimizer_secs,
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &TransferStats) {
        self.calls += other.calls;
        self.hidden_to_host += other.hidden_to_host;
        self.routing_to_host += other.routing_to_host;
        self.rows_to_device += other.rows_to_device;
        self.indices_to_device += other.indices_to_device;
        self.row_grads_to_host += other.row_grads_to_host;
        self.active_rows += other.active_rows;
        self.readback_secs += other.readback_secs;
        self.upload_secs += other.upload_secs;
        self.grads_secs += other.grads_secs;
        self.accumulate_secs += other.accumulate_secs;
        self.select_secs += other.select_secs;
        self.gather_secs += other.gather_secs;
        self.exposed_secs += other.exposed_secs;
        self.copy_secs += other.copy_secs;
        self.wait_update_secs += other.wait_update_secs;
        self.optimizer_secs += other.optimizer_secs;
    }
}

/// Default bytes per pipelined upload chunk: 128 MiB. Gathering a chunk and copying the previous
/// one compete for host memory bandwidth; on the lent H100 host (16 cores), for 1.35 GB of
/// rows, 128 MiB chunks gave the shortest gather + copy (32.2 ms, vs 51.2 ms unpipelined) with
/// the copies still at 0.84 of the pinned peak; 32 MiB: 33.7 ms at 0.79; 8 MiB: 38.1 ms at 0.67
/// (BENCHMARKS.md, "pipelined row upload").
pub const CHUNK_BYTES: usize = 128 << 20;

/// Bytes per upload chunk: [`CHUNK_BYTES`], or `MEFT_UPLOAD_CHUNK_MB` MiB (0: one chunk, i.e.
/// gather everything, then copy — no overlap).
pub fn chunk_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| match std::env::var("MEFT_UPLOAD_CHUNK_MB").ok() {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(0) => usize::MAX,
            Ok(mb) => mb << 20,
            Err(_) => {
                eprintln!("meft: MEFT_UPLOAD_CHUNK_MB={v:?} is not a number; using 128");
                CHUNK_BYTES
            }
        },
        None => CHUNK_BYTES,
    })
}

/// Threads gathering rows for an upload: `MEFT_GATHER_THREADS`, else rayon's global pool.
fn gather_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n: usize = std::env::var("MEFT_GATHER_THREADS")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .thread_name(|i| format!("meft-gather-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs `f` on the gather pool (see [`gather_pool`]).
fn in_gather_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match gather_pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The row ranges of an upload of `rows` rows of `cols` f32s, in order: consecutive, disjoint,
/// covering `0..rows`, each at most [`chunk_bytes`] (at least one row).
pub fn row_chunks(rows: usize, cols: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per_chunk = (chunk_bytes() / (cols * 4).max(1)).max(1);
    (0..rows.div_ceil(per_chunk)).map(move |c| c * per_chunk..((c + 1) * per_chunk).min(rows))
}

/// What one [`upload_rows`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowUpload {
    /// Bytes moved host → device.
    pub bytes: u64,
    /// Seconds gathering rows on the CPU (`fill`).
    pub gather_secs: f64,
    /// Seconds of the copy not hidden behind the gather (the pipeline's tail; the whole copy on
    /// the generic path).
    pub exposed_secs: f64,
    /// Seconds the copy itself took (device-timed on the pinned path; the whole `from_data`
    /// call elsewhere): bytes / this is the achieved bandwidth.
    pub copy_secs: f64,
}

/// Creates the `[rows, cols]` float tensor of `dtype` whose rows `fill(range, dst)` writes (a
/// parallel row gather of rows `range` into `dst`).
///
/// On the un-fused CUDA backend in f32 the rows go through pinned staging in chunks, each
/// chunk's copy overlapping the next chunk's gather; elsewhere they are gathered into one host
/// buffer handed to `from_data`. Adds the whole call's seconds (less the gather) to `secs`.
pub fn upload_rows<B: Backend>(
    shape: [usize; 2],
    device: &B::Device,
    dtype: DType,
    fill: impl FnMut(std::ops::Range<usize>, &mut [f32]) + Send,
    secs: &mut f64,
) -> (Tensor<B, 2>, RowUpload) {
    let start = Instant::now();
    let mut fill = fill;
    let mut fill = |r: std::ops::Range<usize>, dst: &mut [f32]| in_gather_pool(|| fill(r, dst));
    #[cfg(feature = "cuda")]
    if dtype == DType::F32 {
        if let Some((t, timing)) = cuda::upload::<B>(shape, device, &mut fill) {
            *secs += start.elapsed().as_secs_f64() - timing.fill_secs;
            let up = RowUpload {
                bytes: (shape[0] * shape[1] * 4) as u64,
                gather_secs: timing.fill_secs,
                exposed_secs: timing.tail_secs,
                copy_secs: timing.copy_secs,
            };
            return (t, up);
        }
    }
    let mut host = vec![0f32; shape[0] * shape[1]];
    let t = Instant::now();
    // The same chunks as the pinned path, so CPU tests exercise its fill pattern.
    for r in row_chunks(shape[0], shape[1]) {
        fill(r.clone(), &mut host[r.start * shape[1]..r.end * shape[1]]);
    }
    let gather_secs = t.elapsed().as_secs_f64();
    timeline::record("gather rows", SpanKind::Work, t);
    let t = Instant::now();
    let mut upload = 0.0;
    let (tensor, bytes) = to_device::<B, 2>(host, shape, device, dtype, &mut upload);
    timeline::record("h2d rows", SpanKind::Transfer, t);
    *secs += start.elapsed().as_secs_f64() - gather_secs;
    let up = RowUpload {
        bytes,
        gather_secs,
        exposed_secs: upload,
        copy_secs: upload,
    };
    (tensor, up)
}

/// Creates a float tensor of `dtype` on `device` from host floats (converted on the host, so
/// a half-precision device tensor moves half the bytes); returns it and the bytes moved.
pub fn to_device<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
    secs: &mut f64,
) -> (Tensor<B, D>, u64) {
    let start = Instant::now();
    let mut data = TensorData::new(data, shape);
    if data.dtype != dtype {
        data = data.convert_dtype(dtype);
    }
    let t = Tensor::<B, D>::from_data(data, (device, dtype));
    *secs += start.elapsed().as_secs_f64();
    let bytes = (shape.iter().product::<usize>() * t.dtype().size()) as u64;
    (t, bytes)
}

/// Creates an int tensor on `device` from host indices; returns it and the bytes moved.
pub fn int_to_device<B: Backend, const D: usize>(
    data: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
    secs: &mut f64,
) -> (Tensor<B, D, Int>, u64) {
    let start = Instant::now();
    let data = TensorData::new(data, shape).convert::<B::IntElem>();
    let t = Tensor::<B, D, Int>::from_data(data, device);
    *secs += start.elapsed().as_secs_f64();
    let bytes = (shape.iter().product::<usize>() * t.dtype().size()) as u64;
    (t, bytes)
}

/// Reads a float tensor back and hands its contents, as f32s, to `f` (a borrowed slice of the
/// read-back buffer: no extra host copy when the tensor is already f32). Returns `f`'s result and
/// the bytes moved (in the tensor's own dtype).
pub fn read_f32<B: Backend, const D: usize, R>(
    t: Tensor<B, D>,
    secs: &mut f64,
    f: impl FnOnce(&[f32]) -> R,
) -> (R, u64) {
    let start = Instant::now();
    let bytes = (t.shape().num_elements() * t.dtype().size()) as u64;
    let mut data = t.into_data();
    if data.dtype != DType::F32 {
        data = data.convert::<f32>();
    }
    *secs += start.elapsed().as_secs_f64();
    let out = match bytemuck::try_cast_slice::<u8, f32>(data.as_bytes()) {
        Ok(s) => f(s),
        Err(_) => f(&f32s_from_bytes(data.as_bytes())),
    };
    (out, bytes)
}

/// Reads a float tensor back as an owned `Vec<f32>`; returns it and the bytes moved.
pub fn to_host_f32<B: Backend, const D: usize>(t: Tensor<B, D>, secs: &mut f64) -> (Vec<f32>, u64) {
    read_f32(t, secs, copy_f32s)
}

/// A parallel copy of `src`.
fn copy_f32s(src: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
    out
}

/// Host f32s from raw little-endian bytes, copied in parallel. (burn 0.21's
/// `TensorData::into_vec::<f32>` went through a per-element checked cast here: 0.2 GB/s.)
fn f32s_from_bytes(bytes: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; bytes.len() / 4];
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        Ok(src) => out
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s)),
        Err(_) => out
            .par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(4 * CHUNK))
            .for_each(|(d, s)| {
                for (x, b) in d.iter_mut().zip(s.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }),
    }
    out
}

/// Seconds for one raw pinned host → device copy of `bytes` on the CUDA device (the ceiling the
/// row uploads are compared with); `None` without CUDA or on another backend.
pub fn raw_pinned_h2d_secs<B: Backend>(device: &B::Device, bytes: usize) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        let device = (device as &dyn std::any::Any).downcast_ref::<cubecl::cuda::CudaDevice>()?;
        pinned_cuda::time_raw_h2d(device, bytes).ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, bytes);
        None
    }
}

/// Run-time dispatch to the pinned path for the concrete un-fused CUDA f32 backend (plain or
/// under autodiff). A tensor of the concrete type is built and handed back as `Tensor<B, _>`
/// through `Any`, which succeeds exactly when `B` is that type.
#[cfg(feature = "cuda")]
mod cuda {
    use std::any::{Any, TypeId};

    use burn::backend::Autodiff;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Tensor, TensorPrimitive};

    use burn_cubecl::tensor::CubeTensor;
    use cubecl::cuda::{CudaDevice, CudaRuntime};

    use super::pinned_cuda;
    use crate::backend::CudaUnfused;

    type F32 = CudaUnfused<f32>;
    type Bf16 = CudaUnfused<half::bf16>;

    fn cast<T: 'static, U: 'static>(t: T) -> Option<U> {
        (Box::new(t) as Box<dyn Any>)
            .downcast::<U>()
            .ok()
            .map(|b| *b)
    }

    fn is<B: 'static, C: 'static>() -> bool {
        TypeId::of::<B>() == TypeId::of::<C>()
    }

    /// Whether `B` is the un-fused CUDA backend `C` or its autodiff wrapper.
    fn is_either<B: 'static, C: 'static>() -> bool {
        is::<B, C>() || is::<B, Autodiff<C>>()
    }

    /// `cube` (an f32 tensor) as a tensor of `B`, which is `C` or `Autodiff<C>`.
    fn wrap<B: Backend, C>(cube: CubeTensor<CudaRuntime>) -> Option<Tensor<B, 2>>
    where
        C: Backend<FloatTensorPrimitive = CubeTensor<CudaRuntime>>,
    {
        let t = Tensor::<C, 2>::from_primitive(TensorPrimitive::Float(cube));
        if is::<B, C>() {
            cast(t)
        } else {
            cast(Tensor::<Autodiff<C>, 2>::from_inner(t))
        }
    }

    /// Pinned upload of an f32 tensor when `B` is the un-fused CUDA backend (of either float
    /// type: the rows are f32 either way) or its autodiff wrapper; `None` otherwise (or on a
    /// CUDA error, which is reported on stderr once and leaves the generic path to do the work).
    pub fn upload<B: Backend>(
        shape: [usize; 2],
        device: &B::Device,
        fill: &mut dyn FnMut(std::ops::Range<usize>, &mut [f32]),
    ) -> Option<(Tensor<B, 2>, pinned_cuda::UploadTiming)> {
        let f32_backend = is_either::<B, F32>();
        if !(f32_backend || is_either::<B, Bf16>()) {
            return None;
        }
        let device = (device as &dyn Any).downcast_ref::<CudaDevice>()?;
        let (cube, timing) = match pinned_cuda::upload_f32(device, shape, fill) {
            Ok(t) => t,
            Err(e) => {
                warn_once(&e);
                return None;
            }
        };
        let t = if f32_backend {
            wrap::<B, F32>(cube)
        } else {
            wrap::<B, Bf16>(cube)
        };
        t.map(|t| (t, timing))
    }

    fn warn_once(e: &crate::Error) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| eprintln!("meft: pinned staging unavailable ({e}); using from_data"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_chunks_cover_the_rows_in_order() {
        let per_chunk = chunk_bytes() / (8192 * 4);
        for (rows, cols) in [
            (0, 8),
            (1, 8192),
            (per_chunk, 8192),
            (per_chunk + 1, 8192),
            (41_216, 8192),
            (3, 1 << 26),
        ] {
            let chunks: Vec<_> = row_chunks(rows, cols).collect();
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.start, next, "{rows}×{cols}: {chunks:?}");
                assert!(c.end > c.start);
                assert!((c.end - c.start) * cols * 4 <= chunk_bytes() || c.end - c.start == 1);
                next = c.end;
            }
            assert_eq!(next, rows);
        }
        assert_eq!(row_chunks(per_chunk + 1, 8192).count(), 2);
    }

    #[test]
    fn f32s_from_aligned_and_unaligned_bytes() {
        let want: Vec<f32> = (0..70_000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        // A one-byte offset makes the slice unaligned for f32: the fallback path decodes it.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(f32s_from_bytes(&shifted[1..]), want);
        let aligned: &[u8] = bytemuck::cast_slice(&want);
        assert_eq!(f32s_from_bytes(aligned), want);
    }
}
