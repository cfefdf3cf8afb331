//! Row tiles: the entries (token, slot) of the sparse adapter grouped by tiles of
//! [`TILE_ROWS`] consecutive rows, in token order within a tile. With MEFT's routed rows (an
//! expert is a block of contiguous rows, and a token takes several rows of each expert it
//! probes) the tokens of a tile use several of its rows each, so a cube that holds a tile's
//! row slices in shared memory serves all its entries from there and reads each token's
//! slice once per tile instead of once per entry (`tile_kernel::tile_dots_kernel`).

/// Rows per tile (shared memory: `TILE_ROWS` row slices of 512 bytes = 16 KiB).
pub const TILE_ROWS: usize = 32;

/// Bits of a device entry's code that hold its local row (`RowTiles::device_entries`); the
/// bits above hold its pair within the tile.
pub const LOCAL_BITS: u32 = TILE_ROWS.trailing_zeros();

/// Most pairs a tile may hold: a pair's index must fit in a device entry's code above
/// [`LOCAL_BITS`] (a 31-bit non-negative `i32`).
pub const MAX_TILE_PAIRS: usize = 1 << (31 - LOCAL_BITS);

/// Least mean entries per (tile, token) pair for which `HostIndex::plan` picks tiles: below
/// it (e.g. rows drawn uniformly from all R) a token's slice is read about once per entry
/// either way, and the staging of row slices is extra work.
pub const MIN_TILE_REUSE: f64 = 2.0;

/// Least mean entries per pair (of [`TILE_ROWS`]) for which `HostIndex::plan` runs the row
/// gradients per tile on tensor cores (`mma_kernel`): those products cover every (pair, row)
/// of a tile, used or not, so they pay where pairs fill their tiles densely.
pub const MIN_MMA_REUSE: f64 = 8.0;

/// Whether row tiles of `reuse` entries per pair run their row gradients on tensor cores:
/// from [`MIN_MMA_REUSE`] on, or as `MEFT_KERNEL_TILE_MMA` says (`1` always, `0` never).
pub fn tile_grads_for(reuse: f64) -> bool {
    match std::env::var("MEFT_KERNEL_TILE_MMA").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => reuse >= MIN_MMA_REUSE,
    }
}

/// The entries grouped by row tile (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTiles {
    /// Entries `t · K + s` with a row, grouped by tile `row / TILE_ROWS`, ascending within a
    /// tile (so by token, then slot).
    pub entries: Vec<i32>,
    /// `[tiles + 1]` offsets into `entries`.
    pub offsets: Vec<i32>,
    /// Pairs: runs of one token's entries in a tile, in token order. A token that takes a row
    /// twice (a duplicate index) starts a new pair at the repeat, so each pair has at most
    /// one entry per row: the tile's pairs and rows form a dense `pairs × TILE_ROWS`
    /// coefficient matrix (`mma_kernel`).
    pub pairs: usize,
    /// For each element of `entries`, its pair's index within the tile (0, 1, … in order).
    pub pair_of: Vec<i32>,
    /// Most pairs in one tile.
    pub max_tile_pairs: usize,
}

impl RowTiles {
    /// Groups the entries of `slots` (`[M, k]`, values `>= rows` empty) by row tile.
    pub fn new(slots: &[i32], k: usize, rows: usize) -> Self {
        let tiles = rows.div_ceil(TILE_ROWS).max(1);
        let mut offsets = vec![0i32; tiles + 1];
        for &r in slots {
            if (r as usize) < rows {
                offsets[r as usize / TILE_ROWS + 1] += 1;
            }
        }
        for i in 0..tiles {
            offsets[i + 1] += offsets[i];
        }
        let mut next = offsets.clone();
        let mut entries = vec![0i32; offsets[tiles] as usize];
        let mut pair_of = vec![0i32; entries.len()];
        // Per tile: the current pair's token, the rows it holds, and the pairs so far.
        let mut last_token = vec![usize::MAX; tiles];
        let mut used = vec![0u32; tiles];
        let mut tile_pairs = vec![0i32; tiles];
        let mut pairs = 0;
        for (e, &r) in slots.iter().enumerate() {
            if (r as usize) < rows {
                let (tile, local) = (r as usize / TILE_ROWS, r as usize % TILE_ROWS);
                let t = e / k.max(1);
                if last_token[tile] != t || used[tile] & (1 << local) != 0 {
                    last_token[tile] = t;
                    used[tile] = 0;
                    tile_pairs[tile] += 1;
                    pairs += 1;
                }
                used[tile] |= 1 << local;
                let at = &mut next[tile];
                entries[*at as usize] = e as i32;
                pair_of[*at as usize] = tile_pairs[tile] - 1;
                *at += 1;
            }
        }
        let max_tile_pairs = tile_pairs.iter().copied().max().unwrap_or(0) as usize;
        Self {
            entries,
            offsets,
            pairs,
            pair_of,
            max_tile_pairs,
        }
    }

    /// The entries as the device takes them: `(entry, code)` pairs in tile order, the code
    /// holding the local row (the entry's row minus its tile's first) in its low
    /// [`LOCAL_BITS`] and the entry's pair within the tile above them, so the tile kernels
    /// read both contiguously instead of gathering each entry's row from the slot array.
    /// Needs `max_tile_pairs <= MAX_TILE_PAIRS`.
    pub fn device_entries(&self, slots: &[i32]) -> Vec<i32> {
        let mut out = Vec::with_capacity(2 * self.entries.len());
        for (&e, &pair) in self.entries.iter().zip(&self.pair_of) {
            let r = slots[e as usize] as usize;
            out.push(e);
            out.push((r % TILE_ROWS) as i32 | (pair << LOCAL_BITS));
        }
        out
    }

    /// Tiles.
    pub fn tiles(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Mean entries per pair: how often a token's slice is reused in a tile.
    pub fn reuse(&self) -> f64 {
        self.entries.len() as f64 / self.pairs.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_group_entries_by_tile_in_token_order() {
        // 3 tokens, K = 3, 70 rows (tiles 0..32, 32..64, 64..70); 70 = empty slot.
        let slots = [40, 1, 33, 2, 70, 65, 0, 1, 31];
        let t = RowTiles::new(&slots, 3, 70);
        assert_eq!(t.tiles(), 3);
        assert_eq!(t.offsets, vec![0, 5, 7, 8]);
        assert_eq!(t.entries, vec![1, 3, 6, 7, 8, 0, 2, 5]);
        // Pairs: tile 0 {t0, t1, t2}, tile 1 {t0}, tile 2 {t1}.
        assert_eq!(t.pairs, 5);
        assert_eq!(t.pair_of, vec![0, 1, 2, 2, 2, 0, 0, 0]);
        assert_eq!(t.max_tile_pairs, 3);
        assert!((t.reuse() - 8.0 / 5.0).abs() < 1e-12);
        // Entry 1: row 1 of tile 0 in pair 0; entry 3: row 2 in pair 1; entry 0: row 40 =
        // row 8 of tile 1; entry 2: row 33 = 1.
        let dev = t.device_entries(&slots);
        assert_eq!(&dev[..4], &[1, 1, 3, 2 | 1 << LOCAL_BITS]);
        assert_eq!(&dev[10..], &[0, 8, 2, 1, 5, 1]);
    }

    #[test]
    fn a_repeated_row_starts_a_new_pair() {
        // Token 0 takes row 3 twice, then row 4; token 1 takes row 3. One tile.
        let slots = [3, 3, 4, 3, 9, 9];
        let t = RowTiles::new(&slots, 3, 9);
        assert_eq!(t.entries, vec![0, 1, 2, 3]);
        assert_eq!(t.pair_of, vec![0, 1, 1, 2]);
        assert_eq!((t.pairs, t.max_tile_pairs), (3, 3));
        let codes: Vec<i32> = t.device_entries(&slots).chunks(2).map(|c| c[1]).collect();
        assert_eq!(
            codes,
            vec![
                3,
                3 | 1 << LOCAL_BITS,
                4 | 1 << LOCAL_BITS,
                3 | 2 << LOCAL_BITS
            ]
        );
    }
}
