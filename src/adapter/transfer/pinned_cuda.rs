//! Pinned staging on CUDA: adapter rows are gathered straight into page-locked host memory and
//! copied with `cuMemcpyHtoDAsync` into a device buffer that cubecl allocated. burn 0.21's
//! `from_data` copies every upload into a fresh pageable `Vec` first; on the lent H100 that path
//! moved rows at 0.6 GB/s, this one at 54 GB/s (`meft bench transfer`, BENCHMARKS.md).
//!
//! Unsafe code is confined to this file: allocation and release of the pinned buffer and the
//! copies. Invariants:
//! - the buffers are owned by one process-wide [`Engine`] behind a mutex, so a copy never races
//!   with another use of the same buffer, and every copy is waited for before the lock is
//!   released (no copy outlives the slice it reads or writes); the chunks of one pipelined upload
//!   are disjoint regions of the buffer, each written once before its copy is issued;
//! - the device side is a cubecl allocation kept alive by its handle during the copy; cubecl's
//!   stream is synchronised before the copy, so no queued kernel still uses (or produces) that
//!   memory;
//! - all calls run in CUDA's primary context of device 0, the one cubecl uses.

use std::sync::Mutex;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::Runtime;
use cudarc::driver::{result, sys};

use crate::backend::CudaUnfused;
use crate::timeline::{self, SpanKind};
use crate::{Error, Result};

/// A page-locked host buffer (grown on demand, never shrunk).
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
}

impl Pinned {
    const fn empty() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            bytes: 0,
        }
    }

    /// At least `bytes` bytes, as `n` f32s.
    fn f32s(&mut self, n: usize) -> Result<&mut [f32]> {
        let bytes = n * 4;
        if self.bytes < bytes {
            // Grow with headroom: row counts vary from call to call, and pinning a fresh buffer
            // costs ~0.3 s per GB.
            let bytes = bytes + bytes / 4;
            let t = Instant::now();
            self.release();
            // SAFETY: plain allocation; the pointer is checked and owned by `self`.
            let ptr =
                unsafe { result::malloc_host(bytes, 0) }.map_err(cuda_err("cuMemHostAlloc"))?;
            self.ptr = ptr as *mut u8;
            self.bytes = bytes;
            timeline::record("grow pinned buffer", SpanKind::Wait, t);
        }
        // SAFETY: `ptr` points to at least `bytes` bytes owned by `self`, 16-byte aligned
        // (CUDA host allocations are page-aligned), and `&mut self` makes the slice unique.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, n) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from `malloc_host` and no copy is pending (they are waited for).
            let _ = unsafe { result::free_host(self.ptr as *mut _) };
            self.ptr = std::ptr::null_mut();
            self.bytes = 0;
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.release();
    }
}

/// The process-wide staging state: context, our copy stream, the upload buffer.
struct Engine {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    up: Pinned,
    /// Timing events, two per chunk of an upload (grown on demand, never destroyed).
    events: Vec<sys::CUevent>,
}

impl Engine {
    /// At least `n` timing events.
    fn events(&mut self, n: usize) -> Result<&[sys::CUevent]> {
        while self.events.len() < n {
            let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(cuda_err("cuEventCreate"))?;
            self.events.push(ev);
        }
        Ok(&self.events[..n])
    }
}

// SAFETY: the raw CUDA handles are only used while holding `ENGINE`'s lock, after making the
// primary context current on the calling thread.
unsafe impl Send for Engine {}

static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Other(format!("CUDA {what} failed: {e:?}"))
}

fn with_engine<R>(f: impl FnOnce(&mut Engine) -> Result<R>) -> Result<R> {
    let mut guard = ENGINE
        .lock()
        .map_err(|_| Error::Other("pinned staging lock poisoned".into()))?;
    if guard.is_none() {
        result::init().map_err(cuda_err("cuInit"))?;
        let dev = result::device::get(0).map_err(cuda_err("cuDeviceGet"))?;
        // SAFETY: `dev` came from `device::get`; retaining the primary context is what cubecl
        // does for the same device, so both share one context.
        let ctx =
            unsafe { result::primary_ctx::retain(dev) }.map_err(cuda_err("retain context"))?;
        // SAFETY: `ctx` is the live primary context just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(cuda_err("cuCtxSetCurrent"))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(cuda_err("cuStreamCreate"))?;
        *guard = Some(Engine {
            ctx,
            stream,
            up: Pinned::empty(),
            events: Vec::new(),
        });
    }
    let engine = guard.as_mut().expect("initialised above");
    // SAFETY: the context stays retained for the life of the process.
    unsafe { result::ctx::set_current(engine.ctx) }.map_err(cuda_err("cuCtxSetCurrent"))?;
    f(engine)
}

fn sync_cubecl(device: &CudaDevice) -> Result<()> {
    CudaUnfused::<f32>::sync(device).map_err(|e| Error::Other(format!("device sync failed: {e:?}")))
}

/// Timing of one pipelined upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct UploadTiming {
    /// Seconds in `fill` (the row gather), summed over chunks.
    pub fill_secs: f64,
    /// Seconds waiting for the copies after the last gather: the part not hidden by gathering.
    pub tail_secs: f64,
    /// Seconds the copy engine spent copying (the chunks' copies, timed by CUDA events).
    pub copy_secs: f64,
}

/// Creates an f32 `[rows, cols]` tensor on `device` whose rows `fill(range, dst)` writes straight
/// into pinned host memory (`dst` holds rows `range`, row-major).
///
/// Pipelined: rows are filled in chunks ([`super::chunk_bytes`]) and each chunk's `cuMemcpyHtoDAsync` is
/// issued as soon as it is filled, so the copy of chunk i runs while chunk i + 1 is gathered.
/// Every chunk has its own region of the staging buffer, so no chunk waits for another's copy.
pub fn upload_f32(
    device: &CudaDevice,
    shape: [usize; 2],
    fill: &mut dyn FnMut(std::ops::Range<usize>, &mut [f32]),
) -> Result<(CubeTensor<CudaRuntime>, UploadTiming)> {
    let [rows, cols] = shape;
    let n = rows * cols;
    let client = CudaRuntime::client(device);
    let t = Instant::now();
    let handle = client.empty(n * 4);
    timeline::record("alloc rows", SpanKind::Wait, t);
    // The destination may reuse memory that queued kernels of this thread's stream still use.
    let t = Instant::now();
    sync_cubecl(device)?;
    timeline::record("wait device", SpanKind::Wait, t);
    let res = client
        .get_resource(handle.clone())
        .map_err(|e| Error::Other(format!("cubecl resource: {e:?}")))?;
    let dst = res.resource().ptr;
    let mut timing = UploadTiming::default();
    let ranges: Vec<_> = super::row_chunks(rows, cols).collect();
    let chunks = ranges.len();
    with_engine(|e| {
        let events = e.events(1 + 2 * chunks)?.to_vec();
        let host = e.up.f32s(n)?;
        let mut origin = None;
        for (c, r) in ranges.iter().enumerate() {
            let (row, end) = (r.start, r.end);
            let chunk = &mut host[row * cols..end * cols];
            let t = Instant::now();
            fill(row..end, chunk);
            timing.fill_secs += t.elapsed().as_secs_f64();
            timeline::record("gather rows", SpanKind::Work, t);
            // SAFETY: the destination range [row·cols·4, end·cols·4) lies inside a live cubecl
            // allocation of n·4 bytes (kept alive by `res` and `handle`), unused by queued kernels
            // (synchronised above); the source chunk is a region of our pinned buffer that is not
            // written again before the stream is synchronised below. The events are ours.
            unsafe {
                if c == 0 {
                    result::event::record(events[0], e.stream)
                        .map_err(cuda_err("cuEventRecord"))?;
                    origin = Some(Instant::now());
                }
                result::event::record(events[1 + 2 * c], e.stream)
                    .map_err(cuda_err("cuEventRecord"))?;
                result::memcpy_htod_async(dst + (row * cols * 4) as u64, &*chunk, e.stream)
                    .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
                result::event::record(events[2 + 2 * c], e.stream)
                    .map_err(cuda_err("cuEventRecord"))?;
            }
        }
        let t = Instant::now();
        // SAFETY: waits for the copies above; afterwards nothing reads the pinned buffer.
        unsafe { result::stream::synchronize(e.stream) }
            .map_err(cuda_err("cuStreamSynchronize"))?;
        timing.tail_secs = t.elapsed().as_secs_f64();
        for c in 0..chunks {
            // SAFETY: all events were recorded on our stream, which has completed.
            let (from, to) = unsafe {
                (
                    result::event::elapsed(events[0], events[1 + 2 * c]),
                    result::event::elapsed(events[0], events[2 + 2 * c]),
                )
            };
            let (from, to) = (
                from.map_err(cuda_err("cuEventElapsedTime"))? as f64 / 1e3,
                to.map_err(cuda_err("cuEventElapsedTime"))? as f64 / 1e3,
            );
            timing.copy_secs += to - from;
            if let Some(o) = origin {
                timeline::record_between("copy", "h2d rows", SpanKind::Transfer, o, from, to);
            }
        }
        Ok(())
    })?;
    let tensor = CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        shape.into(),
        handle,
        DType::F32,
    );
    Ok((tensor, timing))
}

/// The pinned host → device ceiling in this process: seconds for one `cuMemcpyHtoDAsync` of
/// `bytes` from the staging buffer into a scratch device buffer (no gather, no cubecl calls in
/// between).
pub fn time_raw_h2d(device: &CudaDevice, bytes: usize) -> Result<f64> {
    let n = bytes / 4;
    let client = CudaRuntime::client(device);
    let handle = client.empty(n * 4);
    sync_cubecl(device)?;
    let res = client
        .get_resource(handle.clone())
        .map_err(|e| Error::Other(format!("cubecl resource: {e:?}")))?;
    with_engine(|e| {
        let host = e.up.f32s(n)?;
        let start = std::time::Instant::now();
        // SAFETY: as in `upload_f32`: live, idle destination of n·4 bytes; pinned source
        // untouched until the copy is waited for.
        unsafe {
            result::memcpy_htod_async(res.resource().ptr, &host[..], e.stream)
                .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
            result::stream::synchronize(e.stream).map_err(cuda_err("cuStreamSynchronize"))?;
        }
        Ok(start.elapsed().as_secs_f64())
    })
}
