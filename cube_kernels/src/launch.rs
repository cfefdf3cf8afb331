//! Launch shapes: a documented choice instead of autotuning.
//!
//! The token kernels run one cube per token and the row kernel one cube per row; inside a
//! cube each unit owns the vectors `tid + i · threads` (`i < cols`) of the hidden width d,
//! kept in registers. A vector is `vector` elements read or written in one access: 4 (16-byte
//! loads for f32) when d is a multiple of 4, else 1. So the choice is the vector size, the
//! cube width `threads` and the number of slots scored at once, `chunk`:
//!
//! - `threads` = the power of two nearest `d / (4 · vector)`, clamped to 32 … 256: every unit
//!   owns about 4 vectors (d = 576 → 64 units × 3 vectors of 4; d = 4096 → 256 × 4;
//!   d = 8192 → 256 × 8). Fewer, wider units would leave too few warps per cube to hide
//!   memory latency; more than 256 only adds tree-reduction steps. Each cube streams `K`
//!   rows of `2d` floats, so with thousands of tokens the GPU is full at any of these widths.
//! - `chunk` = 16 slots scored per pass (16 independent dot products in flight per unit,
//!   16 × `threads` floats of shared memory for the reduction, one reduction per 16 slots).
//!   K need not be a multiple of it: the last pass is guarded.
//!
//! Shared memory per cube: `K` row ids + `K` coefficients + `chunk · threads` floats, i.e.
//! 24 KiB at K = 1024 and d = 4096: within every runtime's limit (lavapipe: 32 KiB).
//!
//! `K` and the shape are compile-time constants of the kernels, so each (K, d) pair compiles
//! once; a model has one d and a config one K.
//!
//! Passes (`HostIndex::plan`): with many tokens per row (large K·M/R) the token kernels run in
//! passes over blocks of rows of `MEFT_KERNEL_L2_MB` (default 24 MiB, about half the H100's
//! L2), and the row kernel in passes over blocks of tokens, when that moves at most half the
//! bytes of one pass and (token kernels) each pass still launches enough cubes to fill the
//! GPU; a pass launches one cube per token with slots in it. The rule is written at
//! `HostIndex::plan`.
//!
//! Without passes (K ≤ 256, 4-byte floats) the kernels run in d-slices instead (`slices`):
//! 8 tokens (or rows) × 32 vectors per cube, cubes numbered slice-major.

/// Slots scored per pass of the token kernels.
pub const CHUNK: u32 = 16;

/// Launch shape for hidden width `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// Units per cube.
    pub threads: u32,
    /// Vectors owned by each unit (`threads · cols · vector >= d`).
    pub cols: u32,
    /// Elements per vector (4 when d is a multiple of 4, else 1).
    pub vector: usize,
}

impl LaunchShape {
    /// The shape used for hidden width `d` (see the module docs).
    pub fn for_width(d: usize) -> Self {
        let vector = if d.is_multiple_of(4) { 4 } else { 1 };
        let width = d / vector;
        let target = (width / 4).max(1);
        let mut threads = 32usize;
        while threads < 256 && threads * 2 <= target.next_power_of_two() {
            threads *= 2;
        }
        let cols = width.div_ceil(threads).max(1);
        Self {
            threads: threads as u32,
            cols: cols as u32,
            vector,
        }
    }

    /// The scalar shape for width `w` (one element per access; the gather kernel's).
    pub fn scalar(w: usize) -> Self {
        let target = (w / 8).max(1);
        let mut threads = 32usize;
        while threads < 256 && threads * 2 <= target.next_power_of_two() {
            threads *= 2;
        }
        Self {
            threads: threads as u32,
            cols: w.div_ceil(threads).max(1) as u32,
            vector: 1,
        }
    }
}

/// A grid of `n` cubes laid out in 2-D (each dimension ≤ 65 535, the wgpu limit); kernels
/// read their linear index back with `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X`.
pub fn grid(n: usize) -> cubecl::CubeCount {
    // As few rows as the limit allows, split evenly so that few cubes fall past `n`.
    let n = n.max(1) as u32;
    let y = n.div_ceil(65_535);
    let x = n.div_ceil(y);
    cubecl::CubeCount::Static(x, y, 1)
}

/// Units per cube of the row kernels (attention softmax, loss rows): enough to stream a row of
/// `len` elements with a few loads each, a power of two in 32 … 256.
pub fn row_threads(len: usize) -> u32 {
    (len / 4).next_power_of_two().clamp(32, 256) as u32
}

/// The type the row kernels accumulate and return per-row results in: f64 for f64 inputs,
/// else f32.
pub fn row_acc(dtype: burn::tensor::DType) -> burn::tensor::DType {
    match dtype {
        burn::tensor::DType::F64 => burn::tensor::DType::F64,
        _ => burn::tensor::DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_the_width() {
        for d in [1, 7, 64, 576, 960, 2048, 4096, 5120, 8192, 12288] {
            for s in [LaunchShape::for_width(d), LaunchShape::scalar(d)] {
                assert!(s.threads.is_power_of_two() && (32..=256).contains(&s.threads));
                assert!(
                    s.threads as usize * s.cols as usize * s.vector >= d,
                    "d {d}: {s:?}"
                );
                assert_eq!(d % s.vector, 0, "d {d}: {s:?}");
            }
        }
        let shape = |threads, cols, vector| LaunchShape {
            threads,
            cols,
            vector,
        };
        assert_eq!(LaunchShape::for_width(4096), shape(256, 4, 4));
        assert_eq!(LaunchShape::for_width(576), shape(64, 3, 4));
        assert_eq!(LaunchShape::for_width(33), shape(32, 2, 1));
        assert_eq!(LaunchShape::scalar(4096), shape(256, 16, 1));
    }

    #[test]
    fn grid_stays_under_the_dimension_limit() {
        for n in [1, 65_535, 65_536, 200_000] {
            let cubecl::CubeCount::Static(x, y, _) = grid(n) else {
                panic!()
            };
            assert!(x <= 65_535 && (x * y) as usize >= n);
            assert!(((x * y) as usize) < n + y as usize, "{n}: {x} × {y}");
        }
    }
}
