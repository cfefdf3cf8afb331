//! Row kernels of the fused LM-head loss: per chunk of logits, the forward's log-sum-exp,
//! target log-likelihood and argmax in one read of each row (the plain ops take a max, a
//! subtract, an exp, a sum, a gather and an argmax: six passes and two `rows × vocab`
//! temporaries), and the backward's softmax gradient `(exp(L − lse) − onehot(t)) · dnll`
//! in one read and one write (the plain ops: four passes and a scatter).
//!
//! The logits are read through their strides and in their storage type; arithmetic is f32.

use cubecl::prelude::*;

use crate::kernel::cube_index;

/// Row `r` of the logits `[rows, vocab]` (any strides): `lse[r] = log Σ_j exp(L[r, j])`,
/// `nll[r] = lse[r] − L[r, t[r]]` and `best[r]` = the first index of the row's largest
/// logit. Each unit keeps a running (max, sum, argmax) over its columns (online softmax),
/// the cube combines them in a tree (ties go to the smaller index). One cube per row.
/// Targets outside `0..vocab` give `nll = lse` (callers check the range).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn loss_rows_kernel<F: Float, L: Float, I: Numeric>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    nll: &mut Tensor<L>,
    lse: &mut Tensor<L>,
    best: &mut Tensor<I>,
    #[comptime] threads: u32,
    #[define(F, L, I)] _dtypes: [StorageType; 3],
) {
    let row = cube_index();
    if row >= lse.shape(0) {
        terminate!();
    }
    let vocab = logits.shape(1);
    let sj = logits.stride(1);
    let base = row * logits.stride(0);
    let nt = comptime!(threads as usize);
    let tid = UNIT_POS_X as usize;

    // A finite stand-in for −∞: exp(low − x) is 0 and never ∞ − ∞.
    let low = f32::new(-3.0e38);
    let mut m = low;
    let mut l = f32::new(0.0);
    let mut at = vocab;
    let mut j = tid;
    while j < vocab {
        let x = f32::cast_from(logits[base + j * sj]);
        if x > m {
            l = l * f32::exp(m - x) + f32::new(1.0);
            m = x;
            at = j;
        } else {
            l += f32::exp(x - m);
        }
        j += nt;
    }

    let mut pm = SharedMemory::<f32>::new(nt);
    let mut pl = SharedMemory::<f32>::new(nt);
    let mut pa = SharedMemory::<u32>::new(nt);
    pm[tid] = m;
    pl[tid] = l;
    pa[tid] = at as u32;
    sync_cube();
    let mut stride = (nt / 2).runtime();
    while stride > 0 {
        if tid < stride {
            let m1 = pm[tid];
            let m2 = pm[tid + stride];
            let a1 = pa[tid];
            let a2 = pa[tid + stride];
            let mut mx = m1;
            let mut ax = a1;
            if m2 > m1 || (m2 == m1 && a2 < a1) {
                mx = m2;
                ax = a2;
            }
            pl[tid] = pl[tid] * f32::exp(m1 - mx) + pl[tid + stride] * f32::exp(m2 - mx);
            pm[tid] = mx;
            pa[tid] = ax;
        }
        sync_cube();
        stride /= 2;
    }
    if tid == 0 {
        let z = pm[0] + f32::ln(pl[0]);
        let t = u32::cast_from(targets[row]) as usize;
        let mut picked = z;
        if t < vocab {
            picked = f32::cast_from(logits[base + t * sj]);
        }
        lse[row] = L::cast_from(z);
        nll[row] = L::cast_from(z - picked);
        best[row] = I::cast_from(pa[0]);
    }
}

/// The softmax gradient of one chunk: `grad[r, j] = (exp(L[r, j] − lse[r]) − [j = t[r]]) ·
/// dnll[r]`, `logits` `[rows, vocab]` (any strides) read once, `grad` (contiguous, the
/// hidden states' type) written once. One cube per row, its units striding over the columns.
#[cube(launch)]
pub fn loss_rows_grad_kernel<F: Float, G: Float, L: Float, I: Numeric>(
    logits: &Tensor<F>,
    lse: &Tensor<L>,
    dnll: &Tensor<L>,
    targets: &Tensor<I>,
    grad: &mut Tensor<G>,
    #[comptime] threads: u32,
    #[define(F, G, L, I)] _dtypes: [StorageType; 4],
) {
    let row = cube_index();
    if row >= lse.shape(0) {
        terminate!();
    }
    let vocab = grad.shape(1);
    let sj = logits.stride(1);
    let base = row * logits.stride(0);
    let out = row * vocab;
    let nt = comptime!(threads as usize);
    let z = f32::cast_from(lse[row]);
    let g = f32::cast_from(dnll[row]);
    let t = u32::cast_from(targets[row]) as usize;
    let mut j = UNIT_POS_X as usize;
    while j < vocab {
        let mut v = f32::exp(f32::cast_from(logits[base + j * sj]) - z) * g;
        if j == t {
            v -= g;
        }
        grad[out + j] = G::cast_from(v);
        j += nt;
    }
}
