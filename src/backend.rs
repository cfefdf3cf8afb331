//! Choosing a burn backend and float type at run time.
//!
//! Model code is generic over `B: Backend`; the CLI picks the concrete type here. Work that
//! must run on "whatever backend the user chose" implements [`BackendTask`].

use burn::tensor::backend::Backend;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where tensors live and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ndarray on the CPU (always available).
    Cpu,
    /// wgpu (Vulkan; on machines without a GPU, Mesa lavapipe on the CPU). Needs `--features wgpu`.
    Wgpu,
    /// CUDA. Needs `--features cuda`.
    Cuda,
}

/// Float type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    /// 32-bit float.
    F32,
    /// bfloat16 (CUDA only).
    Bf16,
}

/// A computation to run on a backend chosen at run time.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B` and its `device`.
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Checks that a device answers before real work starts. GPU runtimes report a missing
/// driver or adapter by panicking on their own thread; this turns that into an error that
/// names the cause instead of a crash.
pub fn probe_device<B: Backend>(device: &B::Device, name: &str) -> Result<()> {
    use std::sync::{Arc, Mutex};
    let first_panic = Arc::new(Mutex::new(None::<String>));
    let slot = first_panic.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            *slot = Some(msg);
        }
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        burn::tensor::Tensor::<B, 1>::zeros([1], device).into_data()
    }));
    std::panic::set_hook(previous);
    match outcome {
        Ok(_) => Ok(()),
        Err(_) => {
            let cause = first_panic.lock().unwrap_or_else(|e| e.into_inner()).take();
            let cause = cause.unwrap_or_else(|| "unknown failure".into());
            let cause = cause
                .split(" - searched for")
                .next()
                .unwrap_or(&cause)
                .to_string();
            Err(Error::Unsupported(format!(
                "the {name} device is not usable: {cause}"
            )))
        }
    }
}

/// CUDA without burn's operation fusion. burn-fusion 0.21 panics in the backward pass of our
/// bf16 model ("Ordering is bigger than operations", seen on the lent H100), so bf16 runs on
/// this backend; `MEFT_CUDA_FUSION=0` selects it for f32 too, `=1` forces fusion for bf16.
#[cfg(feature = "cuda")]
pub type CudaUnfused<F> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

#[cfg(feature = "cuda")]
fn cuda_fusion(default: bool) -> bool {
    match std::env::var("MEFT_CUDA_FUSION").as_deref() {
        Ok("0") | Ok("false") => false,
        Ok("1") | Ok("true") => true,
        _ => default,
    }
}

/// Set once a task runs on CUDA: the CUDA memory queries touch the device only then (a
/// CUDA build running a task on another backend must not initialise, or need, a GPU).
#[cfg(feature = "cuda")]
static CUDA_IN_USE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a task on CUDA with float type `$f`, fused or not.
#[cfg(feature = "cuda")]
macro_rules! run_cuda {
    ($task:expr, $f:ty, $fused_by_default:expr) => {{
        CUDA_IN_USE.store(true, std::sync::atomic::Ordering::SeqCst);
        let device = burn::backend::cuda::CudaDevice::new(0);
        if cuda_fusion($fused_by_default) {
            probe_device::<burn::backend::Cuda<$f>>(&device, "CUDA")?;
            $task.run::<burn::backend::Cuda<$f>>(device)
        } else {
            probe_device::<CudaUnfused<$f>>(&device, "CUDA")?;
            $task.run::<CudaUnfused<$f>>(device)
        }
    }};
}

/// Runs `task` on the chosen backend and float type, or explains why it cannot.
pub fn run_on<T: BackendTask>(kind: BackendKind, dtype: FloatType, task: T) -> Result<T::Output> {
    match (kind, dtype) {
        (BackendKind::Cpu, FloatType::F32) => {
            task.run::<burn::backend::NdArray<f32>>(burn::backend::ndarray::NdArrayDevice::Cpu)
        }
        (BackendKind::Cpu, FloatType::Bf16) => Err(Error::Unsupported(
            "bf16 is not available on the cpu (ndarray) backend; use --dtype f32 or --backend cuda".into(),
        )),
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, FloatType::F32) => {
            let device = burn::backend::wgpu::WgpuDevice::default();
            probe_device::<burn::backend::Wgpu<f32>>(&device, "wgpu")?;
            task.run::<burn::backend::Wgpu<f32>>(device)
        }
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, FloatType::Bf16) => Err(Error::Unsupported(
            "bf16 is not supported on the wgpu backend; use --dtype f32 or --backend cuda".into(),
        )),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, FloatType::F32) => run_cuda!(task, f32, true),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, FloatType::Bf16) => run_cuda!(task, half::bf16, false),
        #[allow(unreachable_patterns)]
        (kind, _) => Err(Error::Unsupported(format!(
            "this meft binary was built without the '{}' feature; rebuild with `cargo build --release --features {}`",
            feature_name(kind),
            feature_name(kind)
        ))),
    }
}

fn feature_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "default",
        BackendKind::Wgpu => "wgpu",
        BackendKind::Cuda => "cuda",
    }
}

/// Bytes the CUDA memory pool of device 0 has in use and reserved (cubecl's own accounting;
/// the pool keeps freed pages, so "reserved" is the high-water mark of the process). `None`
/// in builds without CUDA and while no task runs on CUDA.
pub fn cuda_memory() -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    {
        if !CUDA_IN_USE.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        use cubecl::Runtime;
        let client = cubecl::cuda::CudaRuntime::client(&burn::backend::cuda::CudaDevice::new(0));
        client
            .memory_usage()
            .ok()
            .map(|u| (u.bytes_in_use, u.bytes_reserved))
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Free and total bytes of CUDA device 0 as the driver reports them (`cuMemGetInfo`), before
/// this process allocates anything large. `None` in builds without CUDA or if the driver
/// cannot answer.
pub fn cuda_free_memory() -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::result;
        result::init().ok()?;
        let dev = result::device::get(0).ok()?;
        // SAFETY: the primary context of a valid device is retained, made current on this
        // thread for the query, unbound and released again; nothing else uses the handle.
        unsafe {
            let ctx = result::primary_ctx::retain(dev).ok()?;
            result::ctx::set_current(ctx).ok()?;
            let info = result::mem_get_info().ok();
            // Unbind before releasing, so this thread is not left with a dangling context.
            let _ = result::ctx::set_current(std::ptr::null_mut());
            let _ = result::primary_ctx::release(dev);
            info.map(|(free, total)| (free as u64, total as u64))
        }
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Releases the CUDA memory pool's free pages on device 0, so that the next
/// [`cuda_memory`] "reserved" figure is the high-water mark of what runs after it. No-op in
/// builds without CUDA.
pub fn cuda_memory_cleanup() {
    #[cfg(feature = "cuda")]
    {
        if !CUDA_IN_USE.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        use cubecl::Runtime;
        let client = cubecl::cuda::CudaRuntime::client(&burn::backend::cuda::CudaDevice::new(0));
        client.memory_cleanup();
    }
}
