//! The adapter's device compute (`y = Σ_s relu(g · x·k_j) v_j` over each token's slots),
//! routed to `cube_kernels`' fused operations when the backend has them.
//!
//! Model code is generic over `B: Backend`, so the choice is made at run time by type: the
//! burn backends this crate ships (wgpu and CUDA, fused or not, with or without autodiff) run
//! the kernels; any other backend (ndarray) runs the plain-op reference, which is also what
//! `MEFT_KERNELS=0` selects everywhere (for A/B measurements).

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use cube_kernels::{sparse_adapter, HostIndex, SparseAdapterBackend};

/// Which implementation [`sparse_adapter_any`] uses for backend `B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputePath {
    /// `cube_kernels`' fused kernels.
    Kernels,
    /// Plain burn ops (`cube_kernels::reference`).
    Reference,
}

/// False when `MEFT_KERNELS=0` (or `false`) asks for the plain-op reference everywhere.
pub fn kernels_enabled() -> bool {
    !matches!(
        std::env::var("MEFT_KERNELS").as_deref(),
        Ok("0") | Ok("false")
    )
}

fn cast<A: 'static, C: 'static>(a: A) -> C {
    *(Box::new(a) as Box<dyn Any>)
        .downcast::<C>()
        .expect("type checked by TypeId")
}

#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
fn on<B: Backend, K: SparseAdapterBackend>(
    x: Tensor<B, 2>,
    rows: Tensor<B, 2>,
    index: HostIndex,
    gate: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let x: Tensor<K, 2> = cast(x);
    let [_, d] = x.dims();
    let idx = index.plan(d, x.dtype().size()).to_device::<K>(&x.device());
    cast(sparse_adapter(x, cast(rows), &idx, cast(gate)))
}

macro_rules! kernel_backends {
    ($mac:ident) => {
        #[cfg(feature = "wgpu")]
        $mac!(burn::backend::Wgpu<f32>);
        #[cfg(feature = "wgpu")]
        $mac!(burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>);
        #[cfg(feature = "cuda")]
        $mac!(burn::backend::Cuda<f32>);
        #[cfg(feature = "cuda")]
        $mac!(burn::backend::Cuda<half::bf16>);
        #[cfg(feature = "cuda")]
        $mac!(crate::backend::CudaUnfused<f32>);
        #[cfg(feature = "cuda")]
        $mac!(crate::backend::CudaUnfused<half::bf16>);
    };
}

/// The path [`sparse_adapter_any`] takes on backend `B` (and its autodiff wrapper).
pub fn compute_path<B: Backend>() -> ComputePath {
    let id = TypeId::of::<B>();
    #[allow(unused_macros)] // no kernel backend in CPU-only builds
    macro_rules! check {
        ($t:ty) => {
            if kernels_enabled()
                && (id == TypeId::of::<$t>() || id == TypeId::of::<burn::backend::Autodiff<$t>>())
            {
                return ComputePath::Kernels;
            }
        };
    }
    kernel_backends!(check);
    let _ = id;
    ComputePath::Reference
}

/// The sparse adapter's output for `x` `[M, d]`, active rows `rows` `[R, 2d]` (`[k | v]`),
/// the slot index and per-slot gates `[M, K]`; differentiable on autodiff backends.
pub fn sparse_adapter_any<B: Backend>(
    x: Tensor<B, 2>,
    rows: Tensor<B, 2>,
    index: HostIndex,
    gate: Tensor<B, 2>,
) -> Tensor<B, 2> {
    if compute_path::<B>() == ComputePath::Kernels {
        let id = TypeId::of::<B>();
        let _ = id;
        #[allow(unused_macros)]
        macro_rules! run {
            ($t:ty) => {
                if id == TypeId::of::<$t>() {
                    return on::<B, $t>(x, rows, index, gate);
                }
                if id == TypeId::of::<burn::backend::Autodiff<$t>>() {
                    return on::<B, burn::backend::Autodiff<$t>>(x, rows, index, gate);
                }
            };
        }
        kernel_backends!(run);
    }
    let device = x.device();
    let slots =
        TensorData::new(index.slots.clone(), [index.tokens, index.k]).convert::<B::IntElem>();
    let slots = Tensor::<B, 2, Int>::from_data(slots, &device);
    cube_kernels::reference::forward_tensors(x, rows, slots, gate).0
}

/// Work that needs the `cube_kernels` extension trait on a backend chosen at run time (e.g.
/// `meft bench kernels`); see [`run_kernel_task`].
pub trait KernelTask {
    /// What the task returns.
    type Output;
    /// Runs the task on `K` and its `device`.
    fn run<K: SparseAdapterBackend>(self, device: K::Device) -> Self::Output;
}

/// Runs `task` on backend `B` if `B` implements the extension trait (the wgpu and CUDA
/// backends, and ndarray f32 with the reference implementation); `None` otherwise.
pub fn run_kernel_task<B: Backend, T: KernelTask>(device: B::Device, task: T) -> Option<T::Output> {
    let id = TypeId::of::<B>();
    macro_rules! run {
        ($t:ty) => {
            if id == TypeId::of::<$t>() {
                return Some(task.run::<$t>(cast(device)));
            }
        };
    }
    kernel_backends!(run);
    run!(burn::backend::NdArray<f32>);
    None
}
