//! A streaming-read probe: the device's read ceilings, measured by `meft bench kernels`.
//!
//! The sparse adapter's kernels are read-bound: a token kernel streams each token's K rows, a
//! row kernel each user's x and dy rows. The bench's `a + b` ceiling mixes reads and writes,
//! and burn's reductions cannot show L2 bandwidth (one launch over an L2-sized buffer is
//! shorter than its launch). This kernel reads a power-of-two buffer `sweeps` times over in
//! contiguous spans, wrapping around, and writes one partial sum per unit: over a buffer much
//! larger than L2 it measures the DRAM read ceiling, over one well inside L2 (16 MiB) the L2
//! read ceiling, with the kernels' own access width (16-byte vectors).

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use crate::kernel::cube_index;
use crate::launch::grid;

/// Units per cube.
const THREADS: usize = 256;
/// Loads issued back to back per unit and step (independent, so they are in flight together).
const UNROLL: usize = 8;
/// Elements per vector (16-byte loads for f32).
const VECTOR: usize = 4;

/// `out[u] = Σ src[(b · threads + tid) mod n]` over the blocks `b = (s · cubes + c) · UNROLL + i`
/// (s < `per_unit / UNROLL`, i < UNROLL) for unit u (cube c < `cubes`, unit tid), in vectors;
/// n (vectors) a power of two. At each step the resident cubes read one contiguous stretch
/// together, each cube `UNROLL` adjacent blocks of `threads` vectors (as a copy kernel does;
/// a power-of-two stride between a unit's loads in flight would pile them on one memory
/// partition).
#[cube(launch)]
pub fn read_probe_kernel<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    out: &mut Tensor<F>,
    cubes: u32,
    #[comptime] per_unit: u32,
    #[define(F)] _dtype: StorageType,
) {
    let c = cube_index();
    let cubes = cubes as usize;
    if c >= cubes {
        terminate!(); // the 2-D grid rounds up
    }
    let tid = UNIT_POS_X as usize;
    let nt = comptime!(THREADS);
    let steps = comptime!(per_unit as usize / UNROLL);
    let mask = src.shape(0) / N::value() - 1;
    let block = comptime!(THREADS * UNROLL);
    let mut at = c * block + tid;
    // Two accumulators, and unchecked reads (the mask keeps every index in bounds): a
    // bounds-checked read is a guarded load, which kept the loads of one unit from being in
    // flight together (2.4-2.7 TB/s from DRAM on the H200, below `a + b`).
    let mut even = Vector::<f32, N>::new(f32::new(0.0));
    let mut odd = Vector::<f32, N>::new(f32::new(0.0));
    for _ in 0..steps {
        #[unroll]
        for i in 0..comptime!(UNROLL / 2) {
            let a = (at + 2 * i * nt) & mask;
            let b = (at + (2 * i + 1) * nt) & mask;
            even += Vector::<f32, N>::cast_from(unsafe { *src.index_unchecked(a) });
            odd += Vector::<f32, N>::cast_from(unsafe { *src.index_unchecked(b) });
        }
        at += cubes * block;
    }
    let acc = even + odd;
    let mut sum = f32::new(0.0);
    #[unroll]
    for e in 0..N::value() {
        sum += acc[e];
    }
    out[c * nt + tid] = F::cast_from(sum);
}

/// Launches the probe: per-unit partial sums of `sweeps` reads of every element of the flat
/// `src`, or `None` when the buffer does not fit the probe's shape (a power-of-two length of
/// at least 8 192 elements; then the caller falls back to a plain reduction).
pub fn read_probe<R: CubeRuntime>(src: CubeTensor<R>, sweeps: usize) -> Option<CubeTensor<R>> {
    let n = src.shape().num_elements();
    if !n.is_power_of_two() || n < 8192 || sweeps == 0 {
        return None;
    }
    let src = into_contiguous(src);
    let total = n / VECTOR * sweeps; // vectors read
    let per_thread = total / THREADS;
    let per_unit = [256, 128, 64, 32, 16, 8]
        .into_iter()
        .find(|p| per_thread.is_multiple_of(*p))?;
    let cubes = per_thread / per_unit;
    let out = empty_device_contiguous_dtype(
        src.client.clone(),
        src.device.clone(),
        Shape::new([cubes * THREADS]),
        src.dtype,
    );
    let dtype: DType = src.dtype;
    read_probe_kernel::launch::<R>(
        &src.client.clone(),
        grid(cubes),
        CubeDim::new_1d(THREADS as u32),
        VECTOR,
        src.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        cubes as u32,
        per_unit as u32,
        dtype.into(),
    );
    Some(out)
}
