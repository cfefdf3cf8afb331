//! Token elimination kernels (see the module docs of [`super`]).

// Kernel code is cubecl's subset of Rust: `usize::div_ceil` is not in it.
#![allow(clippy::manual_div_ceil)]

use cubecl::prelude::*;

use crate::kernel::cube_index;

/// One cube per (input b, segment g): loads the segment's scores into shared memory, ranks
/// each token by counting the tokens that beat it (higher score, or equal and earlier), keeps
/// rank < `min(keep, len)`, and places each kept token at `b·K + g·keep + (kept before it)`.
/// Writes `idx` for kept tokens and `inv` for every token (`B·K` where eliminated).
/// O(S²) comparisons per segment, all in shared memory; no sort, no global scan.
#[cube(launch)]
pub fn segment_select_kernel<F: Float, I: Numeric>(
    scores: &Tensor<F>,
    idx: &mut Tensor<I>,
    inv: &mut Tensor<I>,
    keep: u32,
    kept: u32,
    #[comptime] segment: u32,
    #[comptime] threads: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let batch = scores.shape(0);
    let seq = scores.shape(1);
    let seg = comptime!(segment as usize);
    let nt = comptime!(threads as usize);
    let nseg = (seq + seg - 1) / seg;
    let cube = cube_index();
    if cube >= batch * nseg {
        terminate!();
    }
    let b = cube / nseg;
    let g = cube % nseg;
    let start = g * seg;
    let mut len = seq - start;
    if len > seg {
        len = seg;
    }
    let mut k = keep as usize;
    if k > len {
        k = len;
    }
    let kept_n = kept as usize;
    let sentinel = (batch * kept_n) as u32;
    let tid = UNIT_POS_X as usize;

    let mut score = SharedMemory::<f32>::new(seg);
    let mut flag = SharedMemory::<u32>::new(seg);
    let mut e = tid;
    while e < len {
        score[e] = f32::cast_from(scores[b * seq + start + e]);
        e += nt;
    }
    sync_cube();

    let mut e = tid;
    while e < len {
        let s = score[e];
        let mut rank = 0usize;
        for f in 0..len {
            let o = score[f];
            if o > s || (o == s && f < e) {
                rank += 1;
            }
        }
        let mut keep_e = 0u32;
        if rank < k {
            keep_e = 1u32;
        }
        flag[e] = keep_e;
        e += nt;
    }
    sync_cube();

    let mut e = tid;
    while e < len {
        let row = b * seq + start + e;
        if flag[e] == 1u32 {
            let mut before = 0usize;
            for f in 0..e {
                before += flag[f] as usize;
            }
            let slot = b * kept_n + g * (keep as usize) + before;
            idx[slot] = I::cast_from(row as u32);
            inv[row] = I::cast_from(slot as u32);
        } else {
            inv[row] = I::cast_from(sentinel);
        }
        e += nt;
    }
}

/// One cube per output row r: `out[r] = inv[r] < kept_rows ? comp[inv[r]] : base[r]`, a
/// missing side (`with_base` / `with_comp` false) reading as zeros. Each unit copies the
/// columns `tid + i · threads`, `i < cols`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn token_merge_kernel<F: Float, I: Numeric>(
    base: &Tensor<F>,
    comp: &Tensor<F>,
    inv: &Tensor<I>,
    out: &mut Tensor<F>,
    kept_rows: u32,
    #[comptime] with_base: bool,
    #[comptime] with_comp: bool,
    #[comptime] threads: u32,
    #[comptime] cols: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = cube_index();
    if row >= out.shape(0) {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let nt = comptime!(threads as usize);
    let ncols = comptime!(cols as usize);
    let w = out.shape(1);
    let j = u32::cast_from(inv[row]);
    let kept = j < kept_rows;
    let j = j as usize;
    #[unroll]
    for i in 0..ncols {
        let c = tid + i * nt;
        if c < w {
            let mut v = F::new(0.0);
            if kept {
                if comptime!(with_comp) {
                    v = comp[j * w + c];
                }
            } else if comptime!(with_base) {
                v = base[row * w + c];
            }
            out[row * w + c] = v;
        }
    }
}
