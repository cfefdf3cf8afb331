//! The row gradients of d-slices over row tiles (see `tiles`): one cube per (slice, tile),
//! numbered slice-major like the other sliced kernels.
//!
//! Group g of the cube owns the tile's rows `g, g + groups, …` and keeps their gradients in
//! registers. The cube stages the slices of x and dy of the tile's tokens in shared memory,
//! `chunk` tokens at a time; then each group walks its rows' users (ascending, so in token
//! order) as far as the staged tokens reach and adds their terms from shared memory. A
//! token's slices are loaded once per tile, not once per (row, token) pair as in
//! `kernel::slice_grad_rows_kernel`, and each group only touches its own rows' users.

use cubecl::prelude::*;

use crate::slices::tile_kernel::slice_and_tile;

/// `dk_j = Σ dz_e x_t` and `dv_j = Σ relu(gate_e z_e) dy_t` over the entries e = (t, s)
/// whose slot is row j, in ascending order: the same sums, in the same order, as
/// `kernel::slice_grad_rows_kernel`. `tile_offsets` is `[2, tiles + 1]`: row 0 unused here
/// (offsets into the tile entries), row 1 offsets into `tile_tokens`; `entry_local[e]` is
/// the position of e's token in its tile's tokens.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn tile_grad_rows_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    gate: &Tensor<F>,
    z: &Tensor<F>,
    dz: &Tensor<F>,
    row_offsets: &Tensor<I>,
    row_users: &Tensor<I>,
    tile_offsets: &Tensor<I>,
    tile_tokens: &Tensor<I>,
    entry_local: &Tensor<I>,
    drows: &mut Tensor<Vector<F, N>>,
    #[comptime] lanes: u32,
    #[comptime] groups: u32,
    #[comptime] tile_rows: u32,
    #[comptime] chunk: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let nl = comptime!(lanes as usize);
    let ng = comptime!(groups as usize);
    let nt = comptime!(lanes as usize * groups as usize);
    let nc = comptime!(chunk as usize);
    let per = comptime!((tile_rows / groups) as usize);
    let n_rows = drows.shape(0);
    let dv = x.shape(1) / N::value();
    let w = drows.shape(1) / N::value();
    let stride = tile_offsets.shape(1);
    let (s, tile) = slice_and_tile(stride - 1);
    // The 2-D grid (`launch::grid`) may hold cubes past the last slice.
    if s * nl >= dv {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let (gi, l) = (tid / nl, tid % nl);
    let col = s * nl + l;
    let r0 = tile * comptime!(tile_rows as usize);

    // Per owned row: the next user to add and the end of its users.
    let mut next = Array::<usize>::new(per);
    let mut last = Array::<usize>::new(per);
    let mut ak = Array::<Vector<f32, N>>::new(per);
    let mut av = Array::<Vector<f32, N>>::new(per);
    #[unroll]
    for q in 0..per {
        let r = r0 + q * ng + gi;
        let mut b = 0usize.runtime();
        let mut e = 0usize.runtime();
        if r < n_rows {
            b = u32::cast_from(row_offsets[r]) as usize;
            e = u32::cast_from(row_offsets[r + 1]) as usize;
        }
        next[q] = b;
        last[q] = e;
        ak[q] = Vector::<f32, N>::new(f32::new(0.0));
        av[q] = Vector::<f32, N>::new(f32::new(0.0));
    }

    let mut xs = SharedMemory::<Vector<f32, N>>::new(comptime!(chunk as usize * lanes as usize));
    let mut ds = SharedMemory::<Vector<f32, N>>::new(comptime!(chunk as usize * lanes as usize));
    let begin = u32::cast_from(tile_offsets[stride + tile]) as usize;
    let end = u32::cast_from(tile_offsets[stride + tile + 1]) as usize;
    let mut c0 = begin;
    while c0 < end {
        // Orders the previous chunk's reads before this chunk's staging.
        sync_cube();
        let mut i = tid;
        while i < nc * nl {
            let (p, cc) = (c0 + i / nl, s * nl + i % nl);
            let mut xv = Vector::<f32, N>::new(f32::new(0.0));
            let mut dyv = Vector::<f32, N>::new(f32::new(0.0));
            if p < end && cc < dv {
                let t = u32::cast_from(tile_tokens[p]) as usize;
                xv = Vector::<f32, N>::cast_from(x[t * dv + cc]);
                dyv = Vector::<f32, N>::cast_from(dy[t * dv + cc]);
            }
            xs[i] = xv;
            ds[i] = dyv;
            i += nt;
        }
        sync_cube();
        // Users whose token's position is below `hi` are staged, at `position - lo`.
        let lo = c0 - begin;
        let hi = lo + nc;
        #[unroll]
        for q in 0..per {
            let mut p = next[q];
            let stop = last[q];
            let mut going = p < stop;
            while going {
                let e = u32::cast_from(row_users[p]) as usize;
                let at = u32::cast_from(entry_local[e]) as usize;
                if at >= hi {
                    going = false;
                } else {
                    let j = (at - lo) * nl + l;
                    let cz = f32::cast_from(dz[e]);
                    let mut ca = f32::cast_from(gate[e]) * f32::cast_from(z[e]);
                    if ca <= f32::new(0.0) {
                        ca = f32::new(0.0);
                    }
                    if cz != f32::new(0.0) {
                        ak[q] += Vector::<f32, N>::new(cz) * xs[j];
                    }
                    if ca != f32::new(0.0) {
                        av[q] += Vector::<f32, N>::new(ca) * ds[j];
                    }
                    p += 1;
                    going = p < stop;
                }
            }
            next[q] = p;
        }
        c0 += nc;
    }
    if col < dv {
        #[unroll]
        for q in 0..per {
            let r = r0 + q * ng + gi;
            if r < n_rows {
                drows[r * w + col] = Vector::<F, N>::cast_from(ak[q]);
                drows[r * w + dv + col] = Vector::<F, N>::cast_from(av[q]);
            }
        }
    }
}
