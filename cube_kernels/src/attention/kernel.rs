//! Row kernels of the chunked attention: the causal softmax of a chunk's scores (forward) and
//! the scores' gradient (backward). One cube per score row; the causal mask comes from the
//! row's last visible key (`limit`), never from a mask tensor, and each kernel is a single
//! launch where the plain ops take six to eight passes over the `rows × keys` scores.
//!
//! The scores are read through their strides (a matmul's output may come pitched), and the
//! results are written in key blocks `[b·kv, nb, rc, bs]`, so that the products with the
//! values and keys run as `nb` independent matmuls (see `mod.rs`).

use cubecl::prelude::*;

use crate::kernel::cube_index;

/// Keys `0..n` that row `row` sees: `min(limit[row] + 1, keys)`.
#[cube]
fn visible<I: Numeric>(limit: &Tensor<I>, row: usize, keys: usize) -> usize {
    let mut n = u32::cast_from(limit[row]) as usize + 1;
    if n > keys {
        n = keys;
    }
    n
}

/// Offset of row `row`'s first score in `s` `[b, kv, rc, keys]` (any strides): rows are
/// numbered over `(b, kv, rc)`.
#[cube]
fn row_offset<F: Float>(s: &Tensor<F>, row: usize) -> usize {
    let kv = s.shape(1);
    let rc = s.shape(2);
    let bi = row / (kv * rc);
    let ki = (row / rc) % kv;
    let r = row % rc;
    bi * s.stride(0) + ki * s.stride(1) + r * s.stride(2)
}

/// Row `r` of the scores `s` `[b, kv, rc, keys]` (rows over `(b, kv, rc)`, any strides):
/// `lse[r] = log Σ_{j<n} exp(scale·s[r, j])`, and the probabilities `exp(scale·s[r, j] −
/// lse[r])` for `j < n`, 0 for the masked and padded keys (`n` = [`visible`]), written in key
/// blocks: `p` `[b·kv, nb, rc, bs]`, key `j` of row r at `[r / rc, j / bs, r % rc, j % bs]`.
/// Each unit keeps a running (max, sum) over its columns (the online softmax), the cube
/// combines them in a tree, then each unit writes its columns: two reads of the row and one
/// write. Arithmetic in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_kernel<F: Float, P: Float, L: Float, I: Numeric>(
    s: &Tensor<F>,
    limit: &Tensor<I>,
    p: &mut Tensor<P>,
    lse: &mut Tensor<L>,
    scale: f32,
    #[comptime] threads: u32,
    #[define(F, P, L, I)] _dtypes: [StorageType; 4],
) {
    let row = cube_index();
    if row >= lse.shape(0) {
        terminate!();
    }
    let keys = s.shape(3);
    let sj = s.stride(3);
    let nt = comptime!(threads as usize);
    let tid = UNIT_POS_X as usize;
    let n = visible::<I>(limit, row, keys);
    let base = row_offset::<F>(s, row);

    // A finite stand-in for −∞: exp(low − x) is 0 and never ∞ − ∞.
    let low = f32::new(-3.0e38);
    let mut m = low;
    let mut l = f32::new(0.0);
    let mut j = tid;
    while j < n {
        let x = f32::cast_from(s[base + j * sj]) * scale;
        if x > m {
            l = l * f32::exp(m - x) + f32::new(1.0);
            m = x;
        } else {
            l += f32::exp(x - m);
        }
        j += nt;
    }

    let mut pm = SharedMemory::<f32>::new(nt);
    let mut pl = SharedMemory::<f32>::new(nt);
    pm[tid] = m;
    pl[tid] = l;
    sync_cube();
    let mut stride = (nt / 2).runtime();
    while stride > 0 {
        if tid < stride {
            let m1 = pm[tid];
            let m2 = pm[tid + stride];
            let mut mx = m1;
            if m2 > m1 {
                mx = m2;
            }
            pl[tid] = pl[tid] * f32::exp(m1 - mx) + pl[tid + stride] * f32::exp(m2 - mx);
            pm[tid] = mx;
        }
        sync_cube();
        stride /= 2;
    }
    let z = pm[0] + f32::ln(pl[0]);
    if tid == 0 {
        lse[row] = L::cast_from(z);
    }

    let nb = p.shape(1);
    let rc = p.shape(2);
    let bs = p.shape(3);
    let pbase = (row / rc) * nb * rc * bs + (row % rc) * bs;
    for blk in 0..nb {
        let out = pbase + blk * rc * bs;
        let mut o = tid;
        while o < bs {
            let j = blk * bs + o;
            let mut v = f32::new(0.0);
            if j < n {
                v = f32::exp(f32::cast_from(s[base + j * sj]) * scale - z);
            }
            p[out + o] = P::cast_from(v);
            o += nt;
        }
    }
}

/// Row `r` of the backward: the recomputed probabilities `p[r, j] = exp(scale·s[r, j] −
/// lse[r])` and the scores' gradient `ds[r, j] = p[r, j] · (dp[r, j] − delta[r]) · scale`
/// for `j < n`, both 0 on the masked and padded keys. `s`, `dp` `[b, kv, rc, keys]` (any
/// strides); `p`, `ds` in key blocks `[b·kv, nb, rc, bs]` as in [`causal_softmax_kernel`].
/// One read of `s` and `dp`, one write of `p` and `ds`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_grad_kernel<F: Float, P: Float, L: Float, I: Numeric>(
    s: &Tensor<F>,
    dp: &Tensor<F>,
    lse: &Tensor<L>,
    delta: &Tensor<L>,
    limit: &Tensor<I>,
    p: &mut Tensor<P>,
    ds: &mut Tensor<P>,
    scale: f32,
    #[comptime] threads: u32,
    #[define(F, P, L, I)] _dtypes: [StorageType; 4],
) {
    let row = cube_index();
    if row >= lse.shape(0) {
        terminate!();
    }
    let keys = s.shape(3);
    let sj = s.stride(3);
    let dj = dp.stride(3);
    let nt = comptime!(threads as usize);
    let tid = UNIT_POS_X as usize;
    let n = visible::<I>(limit, row, keys);
    let sbase = row_offset::<F>(s, row);
    let dbase = row_offset::<F>(dp, row);
    let z = f32::cast_from(lse[row]);
    let d = f32::cast_from(delta[row]);
    let nb = p.shape(1);
    let rc = p.shape(2);
    let bs = p.shape(3);
    let pbase = (row / rc) * nb * rc * bs + (row % rc) * bs;
    for blk in 0..nb {
        let out = pbase + blk * rc * bs;
        let mut o = tid;
        while o < bs {
            let j = blk * bs + o;
            let mut pv = f32::new(0.0);
            let mut dv = f32::new(0.0);
            if j < n {
                pv = f32::exp(f32::cast_from(s[sbase + j * sj]) * scale - z);
                dv = pv * (f32::cast_from(dp[dbase + j * dj]) - d) * scale;
            }
            p[out + o] = P::cast_from(pv);
            ds[out + o] = P::cast_from(dv);
            o += nt;
        }
    }
}
