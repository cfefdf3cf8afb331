//! The partial dot products of d-slices over row tiles (see `tiles`): one cube per (slice,
//! tile), numbered slice-major like the other sliced kernels.
//!
//! The cube stages its tile's row slices in shared memory, then walks the tile's entries
//! (token order) in rounds of one entry per unit: each round stages the entries' token and
//! local row, and each group of `lanes` units computes `lanes` of them, every unit its vector
//! of the product, summed over the group as in `kernel::slice_dots_kernel` (plane butterflies
//! over `values` entries each, or a shared-memory tree `chunk` entries at a time). Consecutive entries of one token reuse
//! its hidden-state vector in registers. The next round's entries are loaded while a round
//! computes.

// `usize::div_ceil` is not in cubecl's kernel subset.
#![allow(clippy::manual_div_ceil)]
// cubecl 0.10 evaluates both sides of `&&` in kernels, so bound checks guarding an index stay
// nested `if`s.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::kernel::{cube_index, lane_sum};
use crate::slices::kernel::{plane_transposed_sums, tree_sums};

/// Local-row marker of a round's position past the tile's entries.
const NONE: u32 = 0x7fff_ffff;

/// `parts[s · M · K + e] = h_t[slice s] · rows[slot e][half, slice s]` for the entries e =
/// (t, i) of each tile, active or not (the backward's sum kernel drops the inactive ones, so
/// the gates are not read here). Entries without a row are not written (the sum kernel gives
/// them 0). `tile_offsets` is `[tiles + 1]` offsets (in entries) into `tile_entries`, which
/// holds `(entry, local row)` pairs (`tiles::RowTiles::device_entries`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn tile_dots_kernel<F: Float, I: Numeric, N: Size>(
    h: &Tensor<Vector<F, N>>,
    rows: &Tensor<Vector<F, N>>,
    tile_offsets: &Tensor<I>,
    tile_entries: &Tensor<I>,
    parts: &mut Tensor<F>,
    half: u32,
    #[comptime] k: u32,
    #[comptime] lanes: u32,
    #[comptime] groups: u32,
    #[comptime] tile_rows: u32,
    #[comptime] chunk: u32,
    #[comptime] plane: bool,
    #[comptime] values: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let kk = comptime!(k as usize);
    let nl = comptime!(lanes as usize);
    let nt = comptime!(lanes as usize * groups as usize);
    let tr = comptime!(tile_rows as usize);
    let nchunk = comptime!(chunk as usize);
    let np = comptime!(values as usize);
    let m = h.shape(0);
    let dv = h.shape(1) / N::value();
    let w = rows.shape(1) / N::value();
    let n_rows = rows.shape(0);
    let (s, tile) = slice_and_tile(tile_offsets.shape(0) - 1);
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
    // The first round's entry and local row, loaded before the row staging waits.
    let mut base = begin;
    let (mut e, mut lr) = tile_entry(tile_entries, base + tid, end);

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
    // The shared-memory sums' buffer (one element with plane sums, which need none).
    let mut part = SharedMemory::<f32>::new(comptime!(if plane {
        1usize
    } else {
        groups as usize * lanes as usize * chunk as usize
    }));
    while base < end {
        // Also orders the row staging (first round) and the previous round's reads.
        sync_cube();
        ent[tid] = e;
        loc[tid] = lr;
        sync_cube();
        // The next round's entries, loaded while this one computes.
        (e, lr) = tile_entry(tile_entries, base + nt + tid, end);

        let q0 = gi * nl;
        if plane {
            // A group (one plane) past the round's entries has nothing to do.
            if q0 < end - base {
                let mut last = NONE.runtime();
                let mut hr = Vector::<f32, N>::new(f32::new(0.0));
                // The group's `lanes` entries, `values` per butterfly.
                #[unroll]
                for p in 0..comptime!(lanes as usize / np) {
                    let qp = q0 + p * np;
                    let mut vals = Array::<f32>::new(np);
                    #[unroll]
                    for j in 0..np {
                        let lj = loc[qp + j];
                        let mut v = f32::new(0.0);
                        if (lj as usize) < tr && col < dv {
                            let t = ent[qp + j] / k;
                            if t != last {
                                hr = Vector::<f32, N>::cast_from(h[t as usize * dv + col]);
                                last = t;
                            }
                            v = lane_sum(hr * tile_smem[lj as usize * nl + l]);
                        }
                        vals[j] = v;
                    }
                    plane_transposed_sums(&mut vals, l as u32, values);
                    // Nested: cubecl 0.10 evaluates both sides of `&&`, and in the last
                    // plane `qp + l` runs past the round's entries for l >= np.
                    if l < np {
                        if loc[qp + l] != NONE {
                            parts[s * m * kk + ent[qp + l] as usize] = F::cast_from(vals[0]);
                        }
                    }
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
                        let t = ent[q0 + c0 + j] as usize / kk;
                        let row = tile_smem[lj as usize * nl + l];
                        v = lane_sum(Vector::<f32, N>::cast_from(h[t * dv + col]) * row);
                    }
                    part[(gi * nchunk + j) * nl + l] = v;
                }
                sync_cube();
                tree_sums(&mut part, gi, l, nl, nchunk);
                // Nested, as above: `q0 + c0 + l` passes the round for l >= nchunk.
                if l < nchunk {
                    if loc[q0 + c0 + l] != NONE {
                        parts[s * m * kk + ent[q0 + c0 + l] as usize] =
                            F::cast_from(part[(gi * nchunk + l) * nl]);
                    }
                }
                sync_cube();
                c0 += nchunk;
            }
        }
        base += nt;
    }
}

/// The cube's slice and row tile, cubes numbered slice-major over `tiles` tiles.
#[cube]
fn slice_and_tile(tiles: usize) -> (usize, usize) {
    let c = cube_index();
    (c / tiles, c % tiles)
}

/// Entry `p` of the tile's list and its row's position in the tile (`NONE` at `p >= end`),
/// from the `(entry, local row)` pairs of `tile_entries`.
#[cube]
fn tile_entry<I: Numeric>(tile_entries: &Tensor<I>, p: usize, end: usize) -> (u32, u32) {
    let mut e = 0u32.runtime();
    let mut lr = NONE.runtime();
    if p < end {
        e = u32::cast_from(tile_entries[2 * p]);
        lr = u32::cast_from(tile_entries[2 * p + 1]);
    }
    (e, lr)
}
