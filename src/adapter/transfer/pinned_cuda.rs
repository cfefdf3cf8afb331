//! Pinned staging on CUDA: adapter rows are gathered straight into page-locked host memory and
//! copied with `cuMemcpyHtoDAsync` into a device buffer that cubecl allocated. burn 0.21's
//! `from_data` copies every upload into a fresh pageable `Vec` first; on the lent H100 that path
//! moved rows at 0.6 GB/s, this one at 54 GB/s (`meft bench transfer`, BENCHMARKS.md).
//!
//! Unsafe code is confined to this file: allocation and release of the pinned buffer and the
//! copies. Invariants:
//! - the buffers are owned by one process-wide [`Engine`] behind a mutex, so a copy never races
//!   with another use of the same buffer, and every copy is waited for before the lock is
//!   released (no copy outlives the slice it reads or writes);
//! - the device side is a cubecl allocation kept alive by its handle during the copy; cubecl's
//!   stream is synchronised before the copy, so no queued kernel still uses (or produces) that
//!   memory;
//! - all calls run in CUDA's primary context of device 0, the one cubecl uses.

use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::Runtime;
use cudarc::driver::{result, sys};

use crate::backend::CudaUnfused;
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
            self.release();
            // SAFETY: plain allocation; the pointer is checked and owned by `self`.
            let ptr =
                unsafe { result::malloc_host(bytes, 0) }.map_err(cuda_err("cuMemHostAlloc"))?;
            self.ptr = ptr as *mut u8;
            self.bytes = bytes;
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

/// Creates an f32 `[rows, cols]` tensor on `device` whose contents `fill` writes straight into
/// pinned host memory (e.g. a parallel row gather).
pub fn upload_f32(
    device: &CudaDevice,
    shape: [usize; 2],
    fill: impl FnOnce(&mut [f32]),
) -> Result<CubeTensor<CudaRuntime>> {
    let n = shape[0] * shape[1];
    let client = CudaRuntime::client(device);
    with_engine(|e| {
        let host = e.up.f32s(n)?;
        fill(host);
        let handle = client.empty(n * 4);
        sync_cubecl(device)?;
        let res = client
            .get_resource(handle.clone())
            .map_err(|e| Error::Other(format!("cubecl resource: {e:?}")))?;
        // SAFETY: the destination is a live cubecl allocation of at least n·4 bytes (kept alive
        // by `res` and `handle`), unused by queued kernels (synchronised above); the source is
        // our pinned buffer, not touched until the copy is waited for just below.
        unsafe {
            result::memcpy_htod_async(res.resource().ptr, &host[..], e.stream)
                .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
            result::stream::synchronize(e.stream).map_err(cuda_err("cuStreamSynchronize"))?;
        }
        Ok(CubeTensor::new_contiguous(
            client.clone(),
            device.clone(),
            shape.into(),
            handle,
            DType::F32,
        ))
    })
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
