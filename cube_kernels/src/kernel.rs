//! The cubecl kernels. Host-side launch code is in `forward.rs`; shapes in `launch.rs`.
//!
//! Layout shared by all kernels (row-major, contiguous):
//! - `x`, `dy`, `dx`: `[M, d]` hidden states (one row per token);
//! - `rows`, `drows`: `[R, 2d]`, row j = `[k_j | v_j]` (key and value of active neuron j);
//! - `slots`, `gate`, `z`, `dz`, `dgate`: `[M, K]`, per token its K slots. A slot holds a row
//!   index; a value `>= R` is an empty slot (no neuron);
//! - `row_offsets` `[R + 1]`, `row_users` `[nnz]`: for row j, the entries `t * K + s` whose slot
//!   is j, ascending (CSR of the slot matrix's transpose, built on the host).
//!
//! L2 blocking (large K; `HostIndex::plan`): the token kernels can run in passes, pass p
//! handling only each token's slots whose rows lie in the p-th block of rows (`order` `[M, K]`
//! lists a token's slots by row, `token_ranges` `[M, P + 1]` where each pass starts in it), so
//! the rows of one pass stay in L2 while all tokens read them; outputs accumulate over passes.
//! A pass launches one cube per token with slots in it (`visits`), and a token's first such
//! pass writes its outputs, later ones add to them.
//! The row kernel likewise runs per block of tokens (`user_ranges` `[R, Q + 1]`).
//!
//! Every kernel accumulates in f32 whatever the storage type, and every sum runs in a fixed
//! order (no atomics), so results are deterministic run to run.

// Nested `if blocked { if runtime_condition { … } }`: the outer test is a compile-time
// branch of the kernel, the inner one runs on the device, so they cannot be merged; and
// `!(p <= 0)` is meant: it is true for NaN (a NaN must propagate, not be dropped).
#![allow(clippy::collapsible_if, clippy::neg_cmp_op_on_partial_ord)]

use cubecl::prelude::*;

/// Linear cube index over a 2-D grid (wgpu caps each grid dimension at 65 535).
#[cube]
pub(crate) fn cube_index() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// `out[i, :] = src[indices[i], :]`; an index outside `src` gives a zero row. One cube per
/// output row; each unit copies the columns `tid + i · threads`, `i < cols` (unrolled, so
/// `cols` loads are in flight per unit).
#[cube(launch)]
pub fn gather_rows_kernel<F: Float, I: Numeric>(
    src: &Tensor<F>,
    indices: &Tensor<I>,
    out: &mut Tensor<F>,
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
    let from = u32::cast_from(indices[row]) as usize;
    let valid = from < src.shape(0);
    #[unroll]
    for i in 0..ncols {
        let c = tid + i * nt;
        if c < w {
            let mut v = F::new(0.0);
            if valid {
                v = src[from * w + c];
            }
            out[row * w + c] = v;
        }
    }
}

/// Forward, one cube per token t:
/// `z_ts = x_t · k_{slot(t,s)}`, `a_ts = relu(gate_ts · z_ts)`, `y_t = Σ_s a_ts v_{slot(t,s)}`.
///
/// `x`, `rows` and `y` are read in vectors of `N` elements (16-byte loads for f32 at N = 4;
/// the host picks N = 4 when d is a multiple of 4, else 1). Each unit keeps `cols` vectors of
/// `x_t` in registers (vectors `tid + i · threads`). Scores are computed `chunk` slots at a
/// time: per-unit partial dot products, then a shared-memory tree reduction. The output is
/// accumulated per unit over the slots whose activation is non-zero (value rows of inactive
/// slots are not read). With `blocked`, only the slots of pass `pass` are handled and `y`
/// accumulates over passes.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_forward_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    rows: &Tensor<Vector<F, N>>,
    slots: &Tensor<I>,
    gate: &Tensor<F>,
    order: &Tensor<I>,
    token_ranges: &Tensor<I>,
    visits: &Tensor<I>,
    y: &mut Tensor<Vector<F, N>>,
    z: &mut Tensor<F>,
    pass: u32,
    visit_start: u32,
    visit_count: u32,
    #[comptime] k: u32,
    #[comptime] threads: u32,
    #[comptime] cols: u32,
    #[comptime] chunk: u32,
    #[comptime] blocked: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (t, valid) = visited_token(visits, visit_start, visit_count, x.shape(0), blocked);
    if !valid {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let kk = comptime!(k as usize);
    let nt = comptime!(threads as usize);
    let ncols = comptime!(cols as usize);
    let nchunk = comptime!(chunk as usize);

    let (lo, hi) = slot_range(token_ranges, t, pass, kk, blocked);
    let n = hi - lo;
    // Not the token's first pass: an earlier pass handled its first slots.
    let later = lo > 0;
    if blocked {
        if later && n == 0 {
            terminate!(); // nothing of this token in this pass: y stays as it is
        }
    }

    let mut row_of = SharedMemory::<u32>::new(kk);
    let mut slot_of = SharedMemory::<u32>::new(kk);
    let mut coef = SharedMemory::<f32>::new(kk);
    let mut part = SharedMemory::<f32>::new(comptime!(chunk as usize * threads as usize));

    let mut i = tid;
    while i < n {
        let s = slot_at(order, t, lo + i, kk, blocked);
        slot_of[i] = s as u32;
        row_of[i] = u32::cast_from(slots[t * kk + s]);
        i += nt;
    }
    let mut xr = Array::<Vector<f32, N>>::new(ncols);
    load_cols(x, t, &mut xr, nt, ncols);
    sync_cube();

    // Scores, `chunk` slots at a time.
    let mut c0 = 0usize.runtime();
    while c0 < n {
        chunk_dots(&xr, rows, &row_of, &mut part, c0, n, 0, nt, ncols, nchunk);
        if tid < nchunk {
            let i = c0 + tid;
            if i < n {
                let s = slot_of[i] as usize;
                let zz = part[tid * nt];
                z[t * kk + s] = F::cast_from(zz);
                let p = f32::cast_from(gate[t * kk + s]) * zz;
                // relu that keeps NaN (a NaN must reach the loss, not vanish).
                let mut a = p;
                if p <= f32::new(0.0) {
                    a = f32::new(0.0);
                }
                coef[i] = a;
            }
        }
        sync_cube();
        c0 += nchunk;
    }

    // Output: y_t (+)= Σ_s a_ts v_s over active slots.
    let mut yr = Array::<Vector<f32, N>>::new(ncols);
    zero_cols(&mut yr, ncols);
    if blocked {
        if later {
            load_cols(y, t, &mut yr, nt, ncols);
        }
    }
    let dv = x.shape(1) / N::value();
    add_rows(&mut yr, rows, &row_of, &coef, n, dv, nt, ncols);
    store_cols(y, t, &yr, nt, ncols);
}

/// `out[q] = v[t, tid + q·threads]` (vectors; 0 past the width).
#[cube]
fn load_cols<F: Float, N: Size>(
    v: &Tensor<Vector<F, N>>,
    t: usize,
    out: &mut Array<Vector<f32, N>>,
    #[comptime] nt: usize,
    #[comptime] ncols: usize,
) {
    let tid = UNIT_POS_X as usize;
    let w = v.shape(1) / N::value();
    #[unroll]
    for q in 0..ncols {
        let c = tid + q * nt;
        let mut e = Vector::<f32, N>::new(f32::new(0.0));
        if c < w {
            e = Vector::<f32, N>::cast_from(v[t * w + c]);
        }
        out[q] = e;
    }
}

/// `out[q] = 0`.
#[cube]
fn zero_cols<N: Size>(out: &mut Array<Vector<f32, N>>, #[comptime] ncols: usize) {
    #[unroll]
    for q in 0..ncols {
        out[q] = Vector::<f32, N>::new(f32::new(0.0));
    }
}

/// `v[t, tid + q·threads] = src[q]` (vectors) within the width.
#[cube]
fn store_cols<F: Float, N: Size>(
    v: &mut Tensor<Vector<F, N>>,
    t: usize,
    src: &Array<Vector<f32, N>>,
    #[comptime] nt: usize,
    #[comptime] ncols: usize,
) {
    let tid = UNIT_POS_X as usize;
    let w = v.shape(1) / N::value();
    #[unroll]
    for q in 0..ncols {
        let c = tid + q * nt;
        if c < w {
            v[t * w + c] = Vector::<F, N>::cast_from(src[q]);
        }
    }
}

/// The sum of a vector's lanes.
#[cube]
pub(crate) fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut sum = f32::new(0.0);
    #[unroll]
    for e in 0..N::value() {
        sum += v[e];
    }
    sum
}

/// Dot products of the unit's register vectors `vr` with the rows of slot positions
/// `c0 .. c0 + chunk` (vectors `col0 + …` of each row; positions `>= n` and rows `>= R`
/// give 0), reduced over the cube: afterwards `part[j · threads]` holds position `c0 + j`'s.
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_dots<F: Float, N: Size>(
    vr: &Array<Vector<f32, N>>,
    rows: &Tensor<Vector<F, N>>,
    row_of: &SharedMemory<u32>,
    part: &mut SharedMemory<f32>,
    c0: usize,
    n: usize,
    col0: usize,
    #[comptime] nt: usize,
    #[comptime] ncols: usize,
    #[comptime] nchunk: usize,
) {
    let tid = UNIT_POS_X as usize;
    let w = rows.shape(1) / N::value();
    let d = w / 2;
    let n_rows = rows.shape(0);
    #[unroll]
    for j in 0..nchunk {
        let i = c0 + j;
        let mut acc = Vector::<f32, N>::new(f32::new(0.0));
        if i < n {
            let r = row_of[i] as usize;
            if r < n_rows {
                let base = r * w + col0;
                #[unroll]
                for q in 0..ncols {
                    let c = tid + q * nt;
                    if c < d {
                        acc += vr[q] * Vector::<f32, N>::cast_from(rows[base + c]);
                    }
                }
            }
        }
        part[j * nt + tid] = lane_sum(acc);
    }
    sync_cube();
    let mut stride = (nt / 2).runtime();
    while stride > 0 {
        if tid < stride {
            #[unroll]
            for j in 0..nchunk {
                part[j * nt + tid] += part[j * nt + tid + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
}

/// `acc[q] += Σ_i coef[i] · rows[row_of[i], col0 + tid + q·threads]` (vectors) over
/// positions `i < n` with a non-zero coefficient (rows of zero coefficients are not read).
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_rows<F: Float, N: Size>(
    acc: &mut Array<Vector<f32, N>>,
    rows: &Tensor<Vector<F, N>>,
    row_of: &SharedMemory<u32>,
    coef: &SharedMemory<f32>,
    n: usize,
    col0: usize,
    #[comptime] nt: usize,
    #[comptime] ncols: usize,
) {
    let tid = UNIT_POS_X as usize;
    let w = rows.shape(1) / N::value();
    let d = w / 2;
    for i in 0..n {
        let g = coef[i];
        if g != f32::new(0.0) {
            let gv = Vector::<f32, N>::new(g);
            let base = row_of[i] as usize * w + col0;
            #[unroll]
            for q in 0..ncols {
                let c = tid + q * nt;
                if c < d {
                    acc[q] += gv * Vector::<f32, N>::cast_from(rows[base + c]);
                }
            }
        }
    }
}

/// This cube's token and whether there is one: the cube index among `tokens`, or with
/// `blocked` the pass's `cube`-th visited token (`visits[start + cube]`, cube < `count`).
#[cube]
fn visited_token<I: Numeric>(
    visits: &Tensor<I>,
    start: u32,
    count: u32,
    tokens: usize,
    #[comptime] blocked: bool,
) -> (usize, bool) {
    let c = cube_index();
    let mut t = c;
    let mut valid = c < tokens;
    if blocked {
        valid = c < count as usize;
        if valid {
            t = u32::cast_from(visits[start as usize + c]) as usize;
        }
    }
    (t, valid)
}

/// The slots of token `t` handled in `pass`: positions `lo..hi` of its slot order.
#[cube]
fn slot_range<I: Numeric>(
    token_ranges: &Tensor<I>,
    t: usize,
    pass: u32,
    #[comptime] kk: usize,
    #[comptime] blocked: bool,
) -> (usize, usize) {
    let mut lo = 0usize.runtime();
    let mut hi = kk.runtime();
    if blocked {
        let np = token_ranges.shape(1);
        lo = u32::cast_from(token_ranges[t * np + pass as usize]) as usize;
        hi = u32::cast_from(token_ranges[t * np + pass as usize + 1]) as usize;
    }
    (lo, hi)
}

/// The slot at position `i` of token `t`'s slot order (the identity unless blocked).
#[cube]
fn slot_at<I: Numeric>(
    order: &Tensor<I>,
    t: usize,
    i: usize,
    #[comptime] kk: usize,
    #[comptime] blocked: bool,
) -> usize {
    let mut s = i;
    if blocked {
        s = u32::cast_from(order[t * kk + i]) as usize;
    }
    s
}

/// Backward, token side, one cube per token t. With `p_ts = gate_ts · z_ts` and `dy_t`:
/// `dz_ts = [p_ts > 0] (dy_t · v_s) gate_ts`, `dgate_ts = [p_ts > 0] (dy_t · v_s) z_ts`,
/// `dx_t = Σ_s dz_ts k_s`. Slots with `p_ts <= 0` read no row. With `blocked`, pass `pass`
/// only, `dx` accumulating over passes.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_backward_tokens_kernel<F: Float, I: Numeric, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    rows: &Tensor<Vector<F, N>>,
    slots: &Tensor<I>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    order: &Tensor<I>,
    token_ranges: &Tensor<I>,
    visits: &Tensor<I>,
    dx: &mut Tensor<Vector<F, N>>,
    dz: &mut Tensor<F>,
    dgate: &mut Tensor<F>,
    pass: u32,
    visit_start: u32,
    visit_count: u32,
    #[comptime] k: u32,
    #[comptime] threads: u32,
    #[comptime] cols: u32,
    #[comptime] chunk: u32,
    #[comptime] blocked: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (t, valid) = visited_token(visits, visit_start, visit_count, dy.shape(0), blocked);
    if !valid {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let kk = comptime!(k as usize);
    let nt = comptime!(threads as usize);
    let ncols = comptime!(cols as usize);
    let nchunk = comptime!(chunk as usize);
    let dv = dy.shape(1) / N::value();
    let n_rows = rows.shape(0);

    let (lo, hi) = slot_range(token_ranges, t, pass, kk, blocked);
    let n = hi - lo;
    // Not the token's first pass: an earlier pass handled its first slots.
    let later = lo > 0;
    if blocked {
        if later && n == 0 {
            terminate!();
        }
    }

    let mut row_of = SharedMemory::<u32>::new(kk);
    let mut slot_of = SharedMemory::<u32>::new(kk);
    // First the pre-activation p_ts, then (after the scores) dz_ts.
    let mut coef = SharedMemory::<f32>::new(kk);
    let mut part = SharedMemory::<f32>::new(comptime!(chunk as usize * threads as usize));

    let mut i = tid;
    while i < n {
        let s = slot_at(order, t, lo + i, kk, blocked);
        slot_of[i] = s as u32;
        let r = u32::cast_from(slots[t * kk + s]);
        let mut p = f32::new(0.0);
        if (r as usize) < n_rows {
            p = f32::cast_from(gate[t * kk + s]) * f32::cast_from(z[t * kk + s]);
        }
        coef[i] = p;
        // Inactive slots (`p <= 0`; NaN counts as active, as in the forward's relu) point
        // past the rows, so the scores below skip them.
        let mut active_row = n_rows as u32;
        if !(p <= f32::new(0.0)) {
            active_row = r;
        }
        row_of[i] = active_row;
        i += nt;
    }
    let mut gr = Array::<Vector<f32, N>>::new(ncols);
    load_cols(dy, t, &mut gr, nt, ncols);
    sync_cube();

    let mut c0 = 0usize.runtime();
    while c0 < n {
        chunk_dots(&gr, rows, &row_of, &mut part, c0, n, dv, nt, ncols, nchunk);
        if tid < nchunk {
            let i = c0 + tid;
            if i < n {
                let s = slot_of[i] as usize;
                let da = part[tid * nt];
                let mut dzv = f32::new(0.0);
                let mut dgv = f32::new(0.0);
                if !(coef[i] <= f32::new(0.0)) {
                    dzv = da * f32::cast_from(gate[t * kk + s]);
                    dgv = da * f32::cast_from(z[t * kk + s]);
                }
                dz[t * kk + s] = F::cast_from(dzv);
                dgate[t * kk + s] = F::cast_from(dgv);
                coef[i] = dzv;
            }
        }
        sync_cube();
        c0 += nchunk;
    }

    let mut acc = Array::<Vector<f32, N>>::new(ncols);
    zero_cols(&mut acc, ncols);
    if blocked {
        if later {
            load_cols(dx, t, &mut acc, nt, ncols);
        }
    }
    add_rows(&mut acc, rows, &row_of, &coef, n, 0, nt, ncols);
    store_cols(dx, t, &acc, nt, ncols);
}

/// Backward, row side, one cube per row j: `dk_j = Σ dz_ts x_t` and
/// `dv_j = Σ relu(gate_ts z_ts) dy_t` over the entries (t, s) whose slot is j, in ascending
/// order (a deterministic scatter-add: each row is summed by one cube, no atomics). With
/// `blocked`, only the entries of token block `block`, accumulating over blocks in order.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_backward_rows_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    dz: &Tensor<F>,
    row_offsets: &Tensor<I>,
    row_users: &Tensor<I>,
    user_ranges: &Tensor<I>,
    drows: &mut Tensor<Vector<F, N>>,
    block: u32,
    #[comptime] k: u32,
    #[comptime] threads: u32,
    #[comptime] cols: u32,
    #[comptime] blocked: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let r = cube_index();
    let n_rows = drows.shape(0);
    if r >= n_rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let kk = comptime!(k as usize);
    let nt = comptime!(threads as usize);
    let ncols = comptime!(cols as usize);
    let d = x.shape(1) / N::value();
    let w = drows.shape(1) / N::value();

    let mut begin = u32::cast_from(row_offsets[r]) as usize;
    let mut end = u32::cast_from(row_offsets[r + 1]) as usize;
    if blocked {
        let nq = user_ranges.shape(1);
        begin = u32::cast_from(user_ranges[r * nq + block as usize]) as usize;
        end = u32::cast_from(user_ranges[r * nq + block as usize + 1]) as usize;
    }
    let later = block > 0;
    if blocked {
        if later && begin == end {
            terminate!(); // no user of this row in this token block
        }
    }

    let mut ak = Array::<Vector<f32, N>>::new(ncols);
    let mut av = Array::<Vector<f32, N>>::new(ncols);
    #[unroll]
    for q in 0..ncols {
        let c = tid + q * nt;
        let mut vk = Vector::<f32, N>::new(f32::new(0.0));
        let mut vv = Vector::<f32, N>::new(f32::new(0.0));
        if blocked {
            if later && c < d {
                vk = Vector::<f32, N>::cast_from(drows[r * w + c]);
                vv = Vector::<f32, N>::cast_from(drows[r * w + d + c]);
            }
        }
        ak[q] = vk;
        av[q] = vv;
    }
    for p in begin..end {
        let e = u32::cast_from(row_users[p]) as usize;
        let t = e / kk;
        let cz = f32::cast_from(dz[e]);
        let pre = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
        let mut ca = pre;
        if pre <= f32::new(0.0) {
            ca = f32::new(0.0);
        }
        if cz != f32::new(0.0) {
            let czv = Vector::<f32, N>::new(cz);
            #[unroll]
            for q in 0..ncols {
                let c = tid + q * nt;
                if c < d {
                    ak[q] += czv * Vector::<f32, N>::cast_from(x[t * d + c]);
                }
            }
        }
        if ca != f32::new(0.0) {
            let cav = Vector::<f32, N>::new(ca);
            #[unroll]
            for q in 0..ncols {
                let c = tid + q * nt;
                if c < d {
                    av[q] += cav * Vector::<f32, N>::cast_from(dy[t * d + c]);
                }
            }
        }
    }
    #[unroll]
    for q in 0..ncols {
        let c = tid + q * nt;
        if c < d {
            drows[r * w + c] = Vector::<F, N>::cast_from(ak[q]);
            drows[r * w + d + c] = Vector::<F, N>::cast_from(av[q]);
        }
    }
}
