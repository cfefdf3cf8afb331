//! Row kernels of the chunked attention: the causal softmax of a chunk's scores (forward) and
//! the scores' gradient (backward). One cube per score row; the causal mask comes from the
//! row's last visible key (`limit`), never from a mask tensor, and each kernel is a single
//! launch where the plain ops take six to eight passes over the `rows × keys` scores.

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

/// Row `r` of `s` `[rows, keys]`: `lse[r] = log Σ_{j<n} exp(scale·s[r, j])` and
/// `p[r, j] = exp(scale·s[r, j] − lse[r])` for `j < n`, 0 for the masked keys `j >= n`
/// (`n` = [`visible`]). Each unit keeps a running (max, sum) over its columns (the online
/// softmax), the cube combines them in a tree, then each unit writes its columns: two reads
/// and one write of the row. Arithmetic in f32.
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
    let keys = s.shape(1);
    let nt = comptime!(threads as usize);
    let tid = UNIT_POS_X as usize;
    let n = visible::<I>(limit, row, keys);
    let base = row * keys;

    // A finite stand-in for −∞: exp(low − x) is 0 and never ∞ − ∞.
    let low = f32::new(-3.0e38);
    let mut m = low;
    let mut l = f32::new(0.0);
    let mut j = tid;
    while j < n {
        let x = f32::cast_from(s[base + j]) * scale;
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

    let mut j = tid;
    while j < keys {
        let mut v = f32::new(0.0);
        if j < n {
            v = f32::exp(f32::cast_from(s[base + j]) * scale - z);
        }
        p[base + j] = P::cast_from(v);
        j += nt;
    }
}

/// Row `r` of the backward: the recomputed probabilities `p[r, j] = exp(scale·s[r, j] −
/// lse[r])` and the scores' gradient `ds[r, j] = p[r, j] · (dp[r, j] − delta[r]) · scale`
/// for `j < n`, both 0 on the masked keys. One read of `s` and `dp`, one write of `p` and `ds`.
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
    let keys = s.shape(1);
    let nt = comptime!(threads as usize);
    let tid = UNIT_POS_X as usize;
    let n = visible::<I>(limit, row, keys);
    let base = row * keys;
    let z = f32::cast_from(lse[row]);
    let d = f32::cast_from(delta[row]);
    let mut j = tid;
    while j < keys {
        let mut pv = f32::new(0.0);
        let mut dv = f32::new(0.0);
        if j < n {
            pv = f32::exp(f32::cast_from(s[base + j]) * scale - z);
            dv = pv * (f32::cast_from(dp[base + j]) - d) * scale;
        }
        p[base + j] = P::cast_from(pv);
        ds[base + j] = P::cast_from(dv);
        j += nt;
    }
}
