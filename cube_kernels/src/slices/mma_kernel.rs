//! Row gradients of a row tile as two small matrix products on tensor cores: with the tile's
//! pairs (`tiles::RowTiles`: runs of one token's entries, at most one per row) as the inner
//! dimension,
//!
//! `dK_tile = Cz^T · X_pairs` and `dV_tile = Ca^T · dY_pairs`,
//!
//! where `Cz[p][r]` is `dz` of pair p's entry on row r and `Ca[p][r]` its activation
//! `relu(gate · z)` (0 where the pair has no entry on r), and `X_pairs`, `dY_pairs` are the
//! pairs' tokens' x and dy. One cube per (column block, tile), numbered block-major like the
//! other sliced kernels, walks its tile's pairs in batches: it scatters the batch's
//! coefficients into dense shared-memory matrices, stages the pairs' x and dy columns, and
//! each of its 8 warps accumulates two 16 × 16 blocks of the result with `m16n16k8` TF32
//! products.
//!
//! f32 accuracy from TF32 units ("3×TF32"): every operand is split as `v = hi + lo`, `hi`
//! rounded to TF32 and `lo = v − hi` (exact in f32), and each product is accumulated as
//! `lo·hi + hi·lo + hi·hi` in f32. The dropped `lo·lo` and `lo`'s own rounding are about
//! 2⁻²² of the product, near f32's 2⁻²⁴, where one TF32 product alone errs by up to 2⁻¹¹.
//! The sums run in a fixed order (pairs in token order, the units' fixed reduction tree),
//! so the result is deterministic.

// `usize::div_ceil` is not in cubecl's kernel subset.
#![allow(clippy::manual_div_ceil)]
// cubecl 0.10 evaluates both sides of `&&` in kernels, so bound checks guarding an index stay
// nested `if`s.
#![allow(clippy::collapsible_if)]

use cubecl::cmma;
use cubecl::prelude::*;
use cubecl::tf32;

use crate::kernel::cube_index;
use crate::slices::tiles;

/// Token marker of a batch's pair slot past the tile's pairs.
const NONE: u32 = 0x7fff_ffff;
/// The local row's bits of an entry's code.
const LOCAL_MASK: u32 = (1 << tiles::LOCAL_BITS) - 1;

/// `drows[r] = [Σ_p Cz[p][r] x_p, Σ_p Ca[p][r] dy_p]` over columns `s · cols ..` of each
/// row r of the cube's tile (see the module docs), every row of the tile written (0 without
/// users). `tile_offsets` and `tile_entries` as for `tile_kernel::tile_dots_kernel`; the
/// entries' codes carry their pair. Launched with 32 × 8 units; `users` (pairs per batch) a
/// multiple of 8 with `users · TILE_ROWS` a multiple of 256, `cols` a multiple of 32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn tile_grads_mma_kernel<F: Float, I: Numeric>(
    x: &Tensor<F>,
    dy: &Tensor<F>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    dz: &Tensor<F>,
    tile_offsets: &Tensor<I>,
    tile_entries: &Tensor<I>,
    drows: &mut Tensor<F>,
    #[comptime] k: u32,
    #[comptime] cols: u32,
    #[comptime] users: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let nc = comptime!(cols as usize);
    let nu = comptime!(users as usize);
    let tr = comptime!(tiles::TILE_ROWS);
    let d = x.shape(1);
    let n_rows = drows.shape(0);
    let w = drows.shape(1);
    let n_tiles = tile_offsets.shape(0) - 1;
    let c = cube_index();
    let (s, tile) = (c / n_tiles, c % n_tiles);
    // The 2-D grid (`launch::grid`) may hold cubes past the last block.
    if s * nc >= d {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    // The operands' row strides in shared memory.
    let su = users.runtime();
    let sc = cols.runtime();
    let warp = UNIT_POS_Y as usize;
    let c0 = s * nc;
    let r0 = tile * tr;
    let begin = u32::cast_from(tile_offsets[tile]) as usize;
    let end = u32::cast_from(tile_offsets[tile + 1]) as usize;
    let mut n_pairs = 0usize.runtime();
    if end > begin {
        n_pairs = (u32::cast_from(tile_entries[2 * end - 1]) >> tiles::LOCAL_BITS) as usize + 1;
    }

    // Batch operands, hi and lo parts: the pairs' columns `[users, cols]` and the
    // coefficients `[TILE_ROWS, users]` (both row-major).
    let mut xs_hi = SharedMemory::<tf32>::new(comptime!(nu * nc));
    let mut xs_lo = SharedMemory::<tf32>::new(comptime!(nu * nc));
    let mut ds_hi = SharedMemory::<tf32>::new(comptime!(nu * nc));
    let mut ds_lo = SharedMemory::<tf32>::new(comptime!(nu * nc));
    let mut cz_hi = SharedMemory::<tf32>::new(comptime!(tr * nu));
    let mut cz_lo = SharedMemory::<tf32>::new(comptime!(tr * nu));
    let mut ca_hi = SharedMemory::<tf32>::new(comptime!(tr * nu));
    let mut ca_lo = SharedMemory::<tf32>::new(comptime!(tr * nu));
    let mut tok = SharedMemory::<u32>::new(nu);
    let mut next = SharedMemory::<u32>::new(1usize);
    let mut out = SharedMemory::<f32>::new(comptime!(2 * tr * nc));

    // Warp w: half w / 4 (keys, values), row block (w / 2) % 2, column blocks 2 (w % 2) + j.
    let half = warp / 4;
    let rb = (warp / 2) % 2;
    let cb = (warp % 2) * 2;
    let acc0 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        8usize,
        cmma::MatrixLayout::Undefined,
        f32::new(0.0),
    );
    let acc1 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        8usize,
        cmma::MatrixLayout::Undefined,
        f32::new(0.0),
    );
    let a_hi = unsafe {
        cmma::Matrix::<tf32>::uninitialized(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            8usize,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let a_lo = unsafe {
        cmma::Matrix::<tf32>::uninitialized(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            8usize,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let b_hi = unsafe {
        cmma::Matrix::<tf32>::uninitialized(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            8usize,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let b_lo = unsafe {
        cmma::Matrix::<tf32>::uninitialized(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            8usize,
            cmma::MatrixLayout::RowMajor,
        )
    };

    let mut cursor = begin;
    let mut b0 = 0usize.runtime();
    while b0 < n_pairs {
        // Clear the coefficients (a pair has entries on some rows only) and the tokens.
        #[unroll]
        for i in 0..comptime!(tr * nu / 256) {
            let q = i * 256 + tid;
            let zero = zero::<tf32>();
            cz_hi[q] = zero;
            cz_lo[q] = zero;
            ca_hi[q] = zero;
            ca_lo[q] = zero;
        }
        if tid < nu {
            tok[tid] = NONE;
        }
        sync_cube();
        // Scatter the batch's entries (at most `users · TILE_ROWS`, from `cursor` on).
        #[unroll]
        for i in 0..comptime!(tr * nu / 256) {
            let p = cursor + i * 256 + tid;
            if p < end {
                let code = u32::cast_from(tile_entries[2 * p + 1]);
                let pair = (code >> tiles::LOCAL_BITS) as usize;
                if pair < b0 + nu {
                    let e = u32::cast_from(tile_entries[2 * p]) as usize;
                    let q = (code & LOCAL_MASK) as usize * nu + pair - b0;
                    let vz = f32::cast_from(dz[e]);
                    let mut va = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
                    if va <= f32::new(0.0) {
                        va = f32::new(0.0);
                    }
                    let (hz, lz) = split::<tf32>(vz);
                    let (ha, la) = split::<tf32>(va);
                    cz_hi[q] = hz;
                    cz_lo[q] = lz;
                    ca_hi[q] = ha;
                    ca_lo[q] = la;
                    // Every entry of a pair writes the same token.
                    tok[pair - b0] = (e / comptime!(k as usize)) as u32;
                    // The batch's last entry tells where the next batch starts.
                    let mut next_pair = b0 + nu;
                    if p + 1 < end {
                        let next_code = u32::cast_from(tile_entries[2 * p + 3]);
                        next_pair = (next_code >> tiles::LOCAL_BITS) as usize;
                    }
                    if next_pair >= b0 + nu {
                        next[0usize] = (p + 1) as u32;
                    }
                }
            }
        }
        sync_cube();
        // Stage the pairs' x and dy columns (zeros past the tile's pairs or the width).
        #[unroll]
        for i in 0..comptime!(2 * nu * nc / 256) {
            let q = i * 256 + tid;
            let which = q / comptime!(nu * nc);
            let at = q % comptime!(nu * nc);
            let t = tok[at / nc];
            let col = c0 + at % nc;
            let mut v = f32::new(0.0);
            if t != NONE && col < d {
                if which == 0 {
                    v = f32::cast_from(x[t as usize * d + col]);
                } else {
                    v = f32::cast_from(dy[t as usize * d + col]);
                }
            }
            let (hi, lo) = split::<tf32>(v);
            if which == 0 {
                xs_hi[at] = hi;
                xs_lo[at] = lo;
            } else {
                ds_hi[at] = hi;
                ds_lo[at] = lo;
            }
        }
        sync_cube();
        cursor = next[0usize] as usize;
        #[unroll]
        for ks in 0..comptime!(nu / 8) {
            let a_at = rb * 16 * nu + ks * 8;
            if half == 0 {
                load_split(
                    &a_hi,
                    &a_lo,
                    &cz_hi,
                    &cz_lo,
                    a_at,
                    comptime!(15 * nu + 8),
                    su,
                );
            } else {
                load_split(
                    &a_hi,
                    &a_lo,
                    &ca_hi,
                    &ca_lo,
                    a_at,
                    comptime!(15 * nu + 8),
                    su,
                );
            }
            let b_at = ks * 8 * nc + cb * 16;
            if half == 0 {
                load_split(
                    &b_hi,
                    &b_lo,
                    &xs_hi,
                    &xs_lo,
                    b_at,
                    comptime!(7 * nc + 16),
                    sc,
                );
            } else {
                load_split(
                    &b_hi,
                    &b_lo,
                    &ds_hi,
                    &ds_lo,
                    b_at,
                    comptime!(7 * nc + 16),
                    sc,
                );
            }
            mma_3xtf32(&a_hi, &a_lo, &b_hi, &b_lo, &acc0);
            if half == 0 {
                load_split(
                    &b_hi,
                    &b_lo,
                    &xs_hi,
                    &xs_lo,
                    b_at + 16,
                    comptime!(7 * nc + 16),
                    sc,
                );
            } else {
                load_split(
                    &b_hi,
                    &b_lo,
                    &ds_hi,
                    &ds_lo,
                    b_at + 16,
                    comptime!(7 * nc + 16),
                    sc,
                );
            }
            mma_3xtf32(&a_hi, &a_lo, &b_hi, &b_lo, &acc1);
        }
        // Before the next batch overwrites the operands.
        sync_cube();
        b0 += nu;
    }

    // The two halves' `[TILE_ROWS, cols]` blocks through shared memory, then out by row.
    let o_at = half * tr * nc + rb * 16 * nc + cb * 16;
    let mut o0 = out.slice_mut(o_at, o_at + 15 * nc + 16);
    cmma::store(&mut o0, &acc0, sc, cmma::MatrixLayout::RowMajor);
    let mut o1 = out.slice_mut(o_at + 16, o_at + 15 * nc + 32);
    cmma::store(&mut o1, &acc1, sc, cmma::MatrixLayout::RowMajor);
    sync_cube();
    #[unroll]
    for i in 0..comptime!(2 * tr * nc / 256) {
        let q = i * 256 + tid;
        let h = q / comptime!(tr * nc);
        let at = q % comptime!(tr * nc);
        let row = r0 + at / nc;
        let col = c0 + at % nc;
        if row < n_rows && col < d {
            drows[row * w + h * d + col] = F::cast_from(out[q]);
        }
    }
}

/// Loads a fragment's hi and lo parts from `len` elements of `hi` and `lo` at `at`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_split(
    frag_hi: &cmma::Matrix<tf32>,
    frag_lo: &cmma::Matrix<tf32>,
    hi: &SharedMemory<tf32>,
    lo: &SharedMemory<tf32>,
    at: usize,
    #[comptime] len: usize,
    stride: u32,
) {
    cmma::load(frag_hi, &hi.slice(at, at + len), stride);
    cmma::load(frag_lo, &lo.slice(at, at + len), stride);
}

/// `acc += a · b` in 3×TF32: `lo·hi + hi·lo + hi·hi`, small terms first.
#[cube]
fn mma_3xtf32(
    a_hi: &cmma::Matrix<tf32>,
    a_lo: &cmma::Matrix<tf32>,
    b_hi: &cmma::Matrix<tf32>,
    b_lo: &cmma::Matrix<tf32>,
    acc: &cmma::Matrix<f32>,
) {
    cmma::execute::<tf32, tf32, f32, f32>(a_lo, b_hi, acc, acc);
    cmma::execute::<tf32, tf32, f32, f32>(a_hi, b_lo, acc, acc);
    cmma::execute::<tf32, tf32, f32, f32>(a_hi, b_hi, acc, acc);
}

/// `v` as `hi + lo`: `hi = v` rounded to `T`, `lo = v − hi` (exact in f32) rounded to `T`.
#[cube]
fn split<T: Float>(v: f32) -> (T, T) {
    let hi = T::cast_from(v);
    let lo = T::cast_from(v - f32::cast_from(hi));
    (hi, lo)
}

/// Zero in `T`.
#[cube]
fn zero<T: Float>() -> T {
    T::new(0.0)
}
