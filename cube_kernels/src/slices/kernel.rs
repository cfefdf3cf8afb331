//! The sparse adapter's kernels in d-slices (see the module docs of `slices`).
//!
//! A cube holds `tokens` groups of `lanes` units; group g handles one token (or, in the row
//! kernel, one row) and unit l of it the vector `s · lanes + l` of the hidden width, where s
//! is the cube's slice. Cubes are numbered slice-major (`s = cube / groups`), so the cubes
//! running at any moment read the same slice of the rows: a slice of every row is
//! `R · lanes` vectors (32 MiB at R = 65 536, 128 floats), which L2 holds while all tokens
//! gather from it.
//!
//! Same storage conventions as `crate::kernel`: `rows` `[R, 2d]` = `[k | v]`, slots `>= R`
//! are empty, f32 accumulation, fixed summation order (no atomics). The partial dot products
//! are stored in the float type itself, so the host slices 4-byte floats only.

// `!(p <= 0)` is meant: it is true for NaN (a NaN must propagate, not be dropped).
// Kernel code is cubecl's subset of Rust: `usize::div_ceil` is not in it.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::manual_div_ceil)]

use cubecl::prelude::*;

use crate::kernel::{cube_index, lane_sum};

/// The cube's slice and first token (or row) of its group of `per_cube`, over `count` items.
#[cube]
fn slice_and_first(count: usize, #[comptime] per_cube: usize) -> (usize, usize) {
    let groups = (count + per_cube - 1) / per_cube;
    let c = cube_index();
    (c / groups, (c % groups) * per_cube)
}

/// Partial dot products over one slice: `parts[s, t, i] = h_t[slice s] · rows[slot(t, i)]
/// [half, slice s]` (0 for an empty slot and, with `active_only`, for a slot whose
/// `gate · z <= 0`). Per group: each unit multiplies its vector, then the products are
/// summed over the group's `lanes` units: with `plane` (the group is one plane of 32 units)
/// by plane shuffles, `values` (32, 16 or 8) slots at a time; else by a shared-memory tree,
/// `chunk` at a time.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn slice_dots_kernel<F: Float, I: Numeric, N: Size>(
    h: &Tensor<Vector<F, N>>,
    rows: &Tensor<Vector<F, N>>,
    slots: &Tensor<I>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    parts: &mut Tensor<F>,
    half: u32,
    #[comptime] k: u32,
    #[comptime] lanes: u32,
    #[comptime] tokens: u32,
    #[comptime] chunk: u32,
    #[comptime] active_only: bool,
    #[comptime] plane: bool,
    #[comptime] values: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let kk = comptime!(k as usize);
    let nl = comptime!(lanes as usize);
    let np = comptime!(values as usize);
    let ng = comptime!(tokens as usize);
    let nchunk = comptime!(chunk as usize);
    let nt = comptime!(lanes as usize * tokens as usize);
    let m = h.shape(0);
    let dv = h.shape(1) / N::value();
    let n_rows = rows.shape(0);
    let (s, g0) = slice_and_first(m, ng);
    // The 2-D grid (`launch::grid`) may hold cubes past the last slice.
    if s * nl >= dv {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let (gi, l) = (tid / nl, tid % nl);
    let t = g0 + gi;
    let col = s * nl + l;

    let mut row_of = SharedMemory::<u32>::new(comptime!(tokens as usize * k as usize));
    let mut i = tid;
    while i < ng * kk {
        let tt = g0 + i / kk;
        let mut r = n_rows as u32;
        if tt < m {
            let e = tt * kk + i % kk;
            let rr = u32::cast_from(slots[e]);
            if (rr as usize) < n_rows {
                r = rr;
                if active_only {
                    let p = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
                    if p <= f32::new(0.0) {
                        r = n_rows as u32;
                    }
                }
            }
        }
        row_of[i] = r;
        i += nt;
    }
    let mut hr = Vector::<f32, N>::new(f32::new(0.0));
    if t < m && col < dv {
        hr = Vector::<f32, N>::cast_from(h[t * dv + col]);
    }
    sync_cube();

    let off = half as usize * dv + col;
    if plane {
        // One group = one plane of 32 units: `values` slots at a time, each unit's products
        // summed over the plane by a transposed butterfly (no shared memory, no barrier),
        // after which unit l < values holds slot c0 + l's.
        let mut c0 = 0usize.runtime();
        while c0 < kk {
            let mut vals = Array::<f32>::new(np);
            #[unroll]
            for j in 0..np {
                vals[j] = slot_product(&hr, rows, &row_of, gi * kk, c0 + j, off, col < dv, kk);
            }
            plane_transposed_sums(&mut vals, l as u32, values);
            if t < m && l < np && c0 + l < kk {
                parts[(s * m + t) * kk + c0 + l] = F::cast_from(vals[0]);
            }
            c0 += np;
        }
    } else {
        let mut part =
            SharedMemory::<f32>::new(comptime!(tokens as usize * lanes as usize * chunk as usize));
        let mut c0 = 0usize.runtime();
        while c0 < kk {
            #[unroll]
            for j in 0..nchunk {
                part[(gi * nchunk + j) * nl + l] =
                    slot_product(&hr, rows, &row_of, gi * kk, c0 + j, off, col < dv, kk);
            }
            sync_cube();
            tree_sums(&mut part, gi, l, nl, nchunk);
            if l < nchunk && t < m {
                let i = c0 + l;
                if i < kk {
                    parts[(s * m + t) * kk + i] = F::cast_from(part[(gi * nchunk + l) * nl]);
                }
            }
            sync_cube();
            c0 += nchunk;
        }
    }
}

/// This unit's share of slot `i`'s dot product: `hr · rows[row, off]` summed over the
/// vector's lanes (0 past K, past the width, or for a row `>= R`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn slot_product<F: Float, N: Size>(
    hr: &Vector<f32, N>,
    rows: &Tensor<Vector<F, N>>,
    row_of: &SharedMemory<u32>,
    base: usize,
    i: usize,
    off: usize,
    in_width: bool,
    #[comptime] kk: usize,
) -> f32 {
    let w = rows.shape(1) / N::value();
    let mut acc = f32::new(0.0);
    if i < kk && in_width {
        let r = row_of[base + i] as usize;
        if r < rows.shape(0) {
            acc = lane_sum(*hr * Vector::<f32, N>::cast_from(rows[r * w + off]));
        }
    }
    acc
}

/// The transposed butterfly over a plane of 32 units holding `values` (32, 16 or 8) values
/// each: afterwards unit l holds the plane's sum of value `l % values`. The stages
/// `values / 2, …, 2, 1` leave unit l with that value summed over the `values` units that
/// differ from l in the low bits only; one shuffle per remaining bit (16, then 8) adds the
/// other groups' sums. 31, 16 or 9 shuffles for 32, 16 or 8 sums, no shared memory; fewer
/// values per unit take fewer registers.
#[cube]
pub(crate) fn plane_transposed_sums(vals: &mut Array<f32>, lane: u32, #[comptime] values: u32) {
    if comptime!(values >= 32) {
        butterfly(vals, lane, 16usize, 16u32);
    }
    if comptime!(values >= 16) {
        butterfly(vals, lane, 8usize, 8u32);
    }
    butterfly(vals, lane, 4usize, 4u32);
    butterfly(vals, lane, 2usize, 2u32);
    butterfly(vals, lane, 1usize, 1u32);
    if comptime!(values <= 16) {
        vals[0] += plane_shuffle_xor(vals[0], 16u32);
    }
    if comptime!(values <= 8) {
        vals[0] += plane_shuffle_xor(vals[0], 8u32);
    }
}

/// Sums each group's `chunk` rows of `lanes` values in `part` (group g, value j at
/// `(g · chunk + j) · lanes + l`) by a shared-memory tree: afterwards the sum of value j
/// sits at lane 0. Called by every unit after the values are written and a barrier; ends
/// with a barrier.
#[cube]
pub(crate) fn tree_sums(
    part: &mut SharedMemory<f32>,
    gi: usize,
    l: usize,
    #[comptime] nl: usize,
    #[comptime] nchunk: usize,
) {
    let mut stride = (nl / 2).runtime();
    while stride > 0 {
        if l < stride {
            #[unroll]
            for j in 0..nchunk {
                let at = (gi * nchunk + j) * nl + l;
                part[at] += part[at + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
}

/// One stage of the transposed butterfly over `2n` values per unit: units with bit `mask`
/// set keep the upper n values, the others the lower n, each adding its partner's copy
/// (unit `lane ^ mask`).
#[cube]
fn butterfly(vals: &mut Array<f32>, lane: u32, #[comptime] n: usize, #[comptime] mask: u32) {
    let upper = (lane & mask) != 0;
    #[unroll]
    for i in 0..n {
        let lo = vals[i];
        let hi = vals[i + n];
        let send = select(upper, lo, hi);
        let keep = select(upper, hi, lo);
        vals[i] = keep + plane_shuffle_xor(send, mask);
    }
}

/// Sums each entry's partial dot products over the `slices` slices, in slice order.
/// Forward (`!backward`): `out = z`. Backward (the products are `dy_t · v`):
/// `out = dz = [p > 0] · dot · gate`, `out2 = dgate = [p > 0] · dot · z` with `p = gate · z`
/// (NaN counts as active, as in the forward's relu). One unit per entry.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn slice_sum_kernel<F: Float, I: Numeric>(
    parts: &Tensor<F>,
    slots: &Tensor<I>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    out: &mut Tensor<F>,
    out2: &mut Tensor<F>,
    slices: u32,
    n_rows: u32,
    #[comptime] threads: u32,
    #[comptime] backward: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let n = out.shape(0) * out.shape(1);
    let e = cube_index() * comptime!(threads as usize) + UNIT_POS_X as usize;
    if e >= n {
        terminate!();
    }
    let mut sum = f32::new(0.0);
    for q in 0..slices as usize {
        sum += f32::cast_from(parts[q * n + e]);
    }
    if backward {
        let mut p = f32::new(0.0);
        if u32::cast_from(slots[e]) < n_rows {
            p = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
        }
        let mut dz = f32::new(0.0);
        let mut dg = f32::new(0.0);
        if !(p <= f32::new(0.0)) {
            dz = sum * f32::cast_from(gate[e]);
            dg = sum * f32::cast_from(z[e]);
        }
        out[e] = F::cast_from(dz);
        out2[e] = F::cast_from(dg);
    } else {
        // Entries without a row have no partials in row tiles (`tile_dots_kernel`).
        if u32::cast_from(slots[e]) >= n_rows {
            sum = f32::new(0.0);
        }
        out[e] = F::cast_from(sum);
    }
}

/// `out_t[slice] = Σ_i c_ti · rows[slot(t, i)][half, slice]` over token t's slots in order,
/// with `c = relu(gate · coef)` (`relu`, forward: coef = z, rows = values) or `c = coef`
/// (backward: coef = dz, rows = keys). Rows of zero coefficients are not read.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn slice_rows_kernel<F: Float, I: Numeric, N: Size>(
    rows: &Tensor<Vector<F, N>>,
    slots: &Tensor<I>,
    gate: &Tensor<F>,
    coef: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    half: u32,
    #[comptime] k: u32,
    #[comptime] lanes: u32,
    #[comptime] tokens: u32,
    #[comptime] relu: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let kk = comptime!(k as usize);
    let nl = comptime!(lanes as usize);
    let ng = comptime!(tokens as usize);
    let nt = comptime!(lanes as usize * tokens as usize);
    let m = out.shape(0);
    let dv = out.shape(1) / N::value();
    let w = rows.shape(1) / N::value();
    let n_rows = rows.shape(0);
    let (s, g0) = slice_and_first(m, ng);
    // The 2-D grid (`launch::grid`) may hold cubes past the last slice.
    if s * nl >= dv {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let (gi, l) = (tid / nl, tid % nl);
    let t = g0 + gi;
    let col = s * nl + l;

    let mut row_of = SharedMemory::<u32>::new(comptime!(tokens as usize * k as usize));
    let mut c_of = SharedMemory::<f32>::new(comptime!(tokens as usize * k as usize));
    let mut i = tid;
    while i < ng * kk {
        let tt = g0 + i / kk;
        let mut r = n_rows as u32;
        let mut c = f32::new(0.0);
        if tt < m {
            let e = tt * kk + i % kk;
            let rr = u32::cast_from(slots[e]);
            if (rr as usize) < n_rows {
                c = f32::cast_from(coef[e]);
                if relu {
                    c *= f32::cast_from(gate[e]);
                    if c <= f32::new(0.0) {
                        c = f32::new(0.0);
                    }
                }
                if c != f32::new(0.0) {
                    r = rr;
                }
            }
        }
        row_of[i] = r;
        c_of[i] = c;
        i += nt;
    }
    sync_cube();
    if t < m && col < dv {
        let off = half as usize * dv + col;
        let mut acc = Vector::<f32, N>::new(f32::new(0.0));
        for i in 0..kk {
            let r = row_of[gi * kk + i] as usize;
            if r < n_rows {
                let cv = Vector::<f32, N>::new(c_of[gi * kk + i]);
                acc += cv * Vector::<f32, N>::cast_from(rows[r * w + off]);
            }
        }
        out[t * dv + col] = Vector::<F, N>::cast_from(acc);
    }
}

/// Each row user's token and coefficients, in the order of `row_users` (one unit per user
/// p, entry e = `row_users[p]`): `tokens[p] = e / K`, `coefs[p] = (dz_e, relu(gate_e z_e))`.
/// Run once before [`slice_grad_rows_kernel`], which then reads them contiguously instead
/// of gathering three scattered 4-byte values per user in every slice.
#[cube(launch)]
pub fn user_coefs_kernel<F: Float, I: Numeric>(
    gate: &Tensor<F>,
    z: &Tensor<F>,
    dz: &Tensor<F>,
    row_users: &Tensor<I>,
    tokens: &mut Tensor<I>,
    coefs: &mut Tensor<F>,
    #[comptime] k: u32,
    #[comptime] threads: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let p = cube_index() * comptime!(threads as usize) + UNIT_POS_X as usize;
    if p >= tokens.shape(0) {
        terminate!();
    }
    let e = u32::cast_from(row_users[p]) as usize;
    let mut ca = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
    if ca <= f32::new(0.0) {
        ca = f32::new(0.0);
    }
    tokens[p] = I::cast_from(e / comptime!(k as usize));
    coefs[2 * p] = dz[e];
    coefs[2 * p + 1] = F::cast_from(ca);
}

/// The row gradients over one slice, one group per row j: `dk_j = Σ dz_e x_t` and
/// `dv_j = Σ relu(gate_e z_e) dy_t` over the entries e = (t, s) whose slot is j, in
/// ascending order (the same sums, in the same order, as the one-cube-per-row kernel), with
/// each user's token and coefficients from [`user_coefs_kernel`]. A cube covers
/// `groups · rows_per_group` consecutive rows, group g rows `g, g + groups, …`: with routed
/// rows the rows of a cube share users, whose slices its SM's L1 then serves.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn slice_grad_rows_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    row_offsets: &Tensor<I>,
    tokens: &Tensor<I>,
    coefs: &Tensor<F>,
    drows: &mut Tensor<Vector<F, N>>,
    #[comptime] lanes: u32,
    #[comptime] groups: u32,
    #[comptime] rows_per_group: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let nl = comptime!(lanes as usize);
    let ng = comptime!(groups as usize);
    let n_rows = drows.shape(0);
    let dv = x.shape(1) / N::value();
    let w = drows.shape(1) / N::value();
    let (s, g0) = slice_and_first(n_rows, comptime!(groups as usize * rows_per_group as usize));
    let tid = UNIT_POS_X as usize;
    let col = s * nl + tid % nl;
    if col >= dv {
        terminate!();
    }
    for q in 0..rows_per_group as usize {
        let r = g0 + q * ng + tid / nl;
        if r < n_rows {
            let begin = u32::cast_from(row_offsets[r]) as usize;
            let end = u32::cast_from(row_offsets[r + 1]) as usize;
            let mut ak = Vector::<f32, N>::new(f32::new(0.0));
            let mut av = Vector::<f32, N>::new(f32::new(0.0));
            for p in begin..end {
                let t = u32::cast_from(tokens[p]) as usize;
                let cz = f32::cast_from(coefs[2 * p]);
                let ca = f32::cast_from(coefs[2 * p + 1]);
                if cz != f32::new(0.0) {
                    ak += Vector::<f32, N>::new(cz) * Vector::<f32, N>::cast_from(x[t * dv + col]);
                }
                if ca != f32::new(0.0) {
                    av += Vector::<f32, N>::new(ca) * Vector::<f32, N>::cast_from(dy[t * dv + col]);
                }
            }
            drows[r * w + col] = Vector::<F, N>::cast_from(ak);
            drows[r * w + dv + col] = Vector::<F, N>::cast_from(av);
        }
    }
}
