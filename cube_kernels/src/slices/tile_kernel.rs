//! The partial dot products of d-slices over row tiles (see `tiles`): one cube per (slice,
//! tile), numbered slice-major like the other sliced kernels.
//!
//! The cube stages its tile's row slices in shared memory, then walks the tile's entries
//! (token order) in rounds of one entry per unit: each round stages the entries' token and
//! local row, and each group of `lanes` units computes `lanes` of them, every unit its vector
//! of the product, summed over the group as in `kernel::slice_dots_kernel` (plane butterfly,
//! or a shared-memory tree `chunk` entries at a time). Consecutive entries of one token reuse
//! its hidden-state vector in registers; or, staged, every round first loads the slices of
//! its tokens into shared memory, all at once.

// `usize::div_ceil` is not in cubecl's kernel subset.
#![allow(clippy::manual_div_ceil)]

use cubecl::prelude::*;

use crate::kernel::{cube_index, lane_sum};
use crate::slices::kernel::{plane_transposed_sums, tree_sums};

/// Local-row marker of a staged position past the tile's entries.
const NONE: u32 = 0x7fff_ffff;

/// `parts[s · M · K + e] = h_t[slice s] · rows[slot e][half, slice s]` for the entries e =
/// (t, i) of each tile, active or not (the backward's sum kernel drops the inactive ones, so
/// the gates are not read here). Entries without a row are not written (the sum kernel gives
/// them 0). `tile_offsets` is `[2, tiles + 1]`: offsets into `tile_entries` and into
/// `tile_tokens`.
///
/// With `staged` > 0 the hidden-state slices come from shared memory: a round takes the
/// next entries (at most one per unit) whose tokens are among the next `staged` of the
/// tile's tokens (`tile_tokens`, `entry_local`), and stages those tokens' slices first, all
/// loads at once, instead of loading a token's slice when a group reaches it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn tile_dots_kernel<F: Float, I: Numeric, N: Size>(
    h: &Tensor<Vector<F, N>>,
    rows: &Tensor<Vector<F, N>>,
    slots: &Tensor<I>,
    tile_offsets: &Tensor<I>,
    tile_entries: &Tensor<I>,
    tile_tokens: &Tensor<I>,
    entry_local: &Tensor<I>,
    parts: &mut Tensor<F>,
    half: u32,
    #[comptime] k: u32,
    #[comptime] lanes: u32,
    #[comptime] groups: u32,
    #[comptime] tile_rows: u32,
    #[comptime] chunk: u32,
    #[comptime] plane: bool,
    #[comptime] staged: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let kk = comptime!(k as usize);
    let nl = comptime!(lanes as usize);
    let nt = comptime!(lanes as usize * groups as usize);
    let tr = comptime!(tile_rows as usize);
    let nchunk = comptime!(chunk as usize);
    let m = h.shape(0);
    let dv = h.shape(1) / N::value();
    let w = rows.shape(1) / N::value();
    let n_rows = rows.shape(0);
    let stride = tile_offsets.shape(1);
    let (s, tile) = slice_and_tile(stride - 1);
    // The 2-D grid (`launch::grid`) may hold cubes past the last slice.
    if s * nl >= dv {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let (gi, l) = (tid / nl, tid % nl);
    let col = s * nl + l;
    let r0 = tile * tr;
    let begin = u32::cast_from(tile_offsets[tile]) as usize;
    let end = u32::cast_from(tile_offsets[tile + 1]) as usize;
    // The first round's entry, local row and token, loaded before the row staging waits.
    let mut base = begin;
    let (mut e, mut lr, mut lt) = tile_entry(
        slots,
        tile_entries,
        entry_local,
        base + tid,
        end,
        r0,
        staged > 0,
    );

    let mut tile_smem =
        SharedMemory::<Vector<f32, N>>::new(comptime!(tile_rows as usize * lanes as usize));
    let mut i = tid;
    while i < tr * nl {
        let (rr, cc) = (r0 + i / nl, s * nl + i % nl);
        let mut v = Vector::<f32, N>::new(f32::new(0.0));
        if rr < n_rows && cc < dv {
            v = Vector::<f32, N>::cast_from(rows[rr * w + half as usize * dv + cc]);
        }
        tile_smem[i] = v;
        i += nt;
    }

    let mut ent = SharedMemory::<u32>::new(nt);
    let mut loc = SharedMemory::<u32>::new(nt);
    // Staged mode: the entries' local tokens, the round's length, the tokens' slices.
    let mut tl = SharedMemory::<u32>::new(comptime!(if staged > 0 { nt } else { 1usize }));
    let mut count = SharedMemory::<u32>::new(1usize);
    let mut hs = SharedMemory::<Vector<f32, N>>::new(comptime!(if staged > 0 {
        staged as usize * lanes as usize
    } else {
        1usize
    }));
    // The shared-memory sums' buffer (one element with plane sums, which need none).
    let mut part = SharedMemory::<f32>::new(comptime!(if plane {
        1usize
    } else {
        groups as usize * lanes as usize * chunk as usize
    }));
    let mut tok0 = 0usize.runtime();
    if staged > 0 {
        tok0 = u32::cast_from(tile_offsets[stride + tile]) as usize;
    }
    while base < end {
        // Also orders the row staging (first round) and the previous round's reads.
        sync_cube();
        ent[tid] = e;
        loc[tid] = lr;
        if staged > 0 {
            tl[tid] = lt;
        }
        sync_cube();
        let mut n = nt.runtime();
        let mut first = 0u32.runtime();
        if staged > 0 {
            // The round: the loaded entries whose tokens are below `first + staged` (a
            // prefix, as entries are in token order); the rest wait for the next round.
            let mut avail = end - base;
            if avail > nt {
                avail = nt;
            }
            first = tl[0];
            let lim = first + staged;
            let mut stop = tl[avail - 1] + 1;
            if stop > lim {
                stop = lim;
            }
            if tid < avail && lt < lim && (tid + 1 == avail || tl[tid + 1] >= lim) {
                count[0] = (tid + 1) as u32;
            }
            if tid < avail && lt >= lim {
                loc[tid] = NONE;
            }
            let mut i = tid;
            while i < (stop - first) as usize * nl {
                let cc = s * nl + i % nl;
                let mut v = Vector::<f32, N>::new(f32::new(0.0));
                if cc < dv {
                    let t = u32::cast_from(tile_tokens[tok0 + first as usize + i / nl]) as usize;
                    v = Vector::<f32, N>::cast_from(h[t * dv + cc]);
                }
                hs[i] = v;
                i += nt;
            }
            sync_cube();
            n = count[0] as usize;
        }
        // The next round's entries, loaded while this one computes.
        (e, lr, lt) = tile_entry(
            slots,
            tile_entries,
            entry_local,
            base + n + tid,
            end,
            r0,
            staged > 0,
        );

        let q0 = gi * nl;
        if plane {
            // A group (one plane) past the round's entries has nothing to do.
            if q0 < n {
                let mut vals = Array::<f32>::new(nl);
                let mut last = NONE.runtime();
                let mut hr = Vector::<f32, N>::new(f32::new(0.0));
                #[unroll]
                for j in 0..nl {
                    let lj = loc[q0 + j];
                    let mut v = f32::new(0.0);
                    if (lj as usize) < tr && col < dv {
                        if staged > 0 {
                            hr = hs[(tl[q0 + j] - first) as usize * nl + l];
                        } else {
                            let t = ent[q0 + j] / k;
                            if t != last {
                                hr = Vector::<f32, N>::cast_from(h[t as usize * dv + col]);
                                last = t;
                            }
                        }
                        v = lane_sum(hr * tile_smem[lj as usize * nl + l]);
                    }
                    vals[j] = v;
                }
                plane_transposed_sums(&mut vals, l as u32);
                if loc[q0 + l] != NONE {
                    parts[s * m * kk + ent[q0 + l] as usize] = F::cast_from(vals[0]);
                }
            }
        } else {
            let mut c0 = 0usize.runtime();
            while c0 < nl {
                #[unroll]
                for j in 0..nchunk {
                    let lj = loc[q0 + c0 + j];
                    let mut v = f32::new(0.0);
                    if (lj as usize) < tr && col < dv {
                        let row = tile_smem[lj as usize * nl + l];
                        if staged > 0 {
                            v = lane_sum(hs[(tl[q0 + c0 + j] - first) as usize * nl + l] * row);
                        } else {
                            let t = ent[q0 + c0 + j] as usize / kk;
                            v = lane_sum(Vector::<f32, N>::cast_from(h[t * dv + col]) * row);
                        }
                    }
                    part[(gi * nchunk + j) * nl + l] = v;
                }
                sync_cube();
                tree_sums(&mut part, gi, l, nl, nchunk);
                if l < nchunk && loc[q0 + c0 + l] != NONE {
                    parts[s * m * kk + ent[q0 + c0 + l] as usize] =
                        F::cast_from(part[(gi * nchunk + l) * nl]);
                }
                sync_cube();
                c0 += nchunk;
            }
        }
        base += n;
    }
}

/// The cube's slice and row tile, cubes numbered slice-major over `tiles` tiles.
#[cube]
pub(crate) fn slice_and_tile(tiles: usize) -> (usize, usize) {
    let c = cube_index();
    (c / tiles, c % tiles)
}

/// Entry `p` of the tile's list, its row's position in the tile (`NONE` at `p >= end`) and,
/// with `local`, its token's position among the tile's tokens.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_entry<I: Numeric>(
    slots: &Tensor<I>,
    tile_entries: &Tensor<I>,
    entry_local: &Tensor<I>,
    p: usize,
    end: usize,
    r0: usize,
    #[comptime] local: bool,
) -> (u32, u32, u32) {
    let mut e = 0u32.runtime();
    let mut lr = NONE.runtime();
    let mut lt = 0u32.runtime();
    if p < end {
        e = u32::cast_from(tile_entries[p]);
        lr = u32::cast_from(slots[e as usize]) - r0 as u32;
        if local {
            lt = u32::cast_from(entry_local[e as usize]);
        }
    }
    (e, lr, lt)
}
