//! Row tiles: the entries (token, slot) of the sparse adapter grouped by tiles of
//! [`TILE_ROWS`] consecutive rows, in token order within a tile. With MEFT's routed rows (an
//! expert is a block of contiguous rows, and a token takes several rows of each expert it
//! probes) the tokens of a tile use several of its rows each, so a cube that holds a tile's
//! row slices in shared memory serves all its entries from there and reads each token's
//! slice once per tile instead of once per entry (`tile_kernel::tile_dots_kernel`).

/// Rows per tile (shared memory: `TILE_ROWS` row slices of 512 bytes = 16 KiB).
pub const TILE_ROWS: usize = 32;

/// Least mean entries per (tile, token) pair for which `HostIndex::plan` picks tiles: below
/// it (e.g. rows drawn uniformly from all R) a token's slice is read about once per entry
/// either way, and the staging of row slices is extra work.
pub const MIN_TILE_REUSE: f64 = 2.0;

/// The entries grouped by row tile (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTiles {
    /// Entries `t · K + s` with a row, grouped by tile `row / TILE_ROWS`, ascending within a
    /// tile (so by token, then slot).
    pub entries: Vec<i32>,
    /// `[tiles + 1]` offsets into `entries`.
    pub offsets: Vec<i32>,
    /// Distinct (tile, token) pairs.
    pub pairs: usize,
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
        let mut last_token = vec![usize::MAX; tiles];
        let mut pairs = 0;
        for (e, &r) in slots.iter().enumerate() {
            if (r as usize) < rows {
                let tile = r as usize / TILE_ROWS;
                let at = &mut next[tile];
                entries[*at as usize] = e as i32;
                *at += 1;
                let t = e / k.max(1);
                if last_token[tile] != t {
                    last_token[tile] = t;
                    pairs += 1;
                }
            }
        }
        Self {
            entries,
            offsets,
            pairs,
        }
    }

    /// The entries as the device takes them: `(entry, local row)` pairs in tile order, the
    /// local row being the entry's row minus its tile's first, so the tile kernel reads both
    /// contiguously instead of gathering each entry's row from the slot array.
    pub fn device_entries(&self, slots: &[i32]) -> Vec<i32> {
        let mut out = Vec::with_capacity(2 * self.entries.len());
        for &e in &self.entries {
            let r = slots[e as usize] as usize;
            out.push(e);
            out.push((r % TILE_ROWS) as i32);
        }
        out
    }

    /// Tiles.
    pub fn tiles(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Mean entries per (tile, token) pair: how often a token's slice is reused in a tile.
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
        assert!((t.reuse() - 8.0 / 5.0).abs() < 1e-12);
        // Entry 1: row 1 of tile 0; entry 0: row 40 = row 8 of tile 1; entry 2: row 33 = 1.
        let dev = t.device_entries(&slots);
        assert_eq!(&dev[..4], &[1, 1, 3, 2]);
        assert_eq!(&dev[10..], &[0, 8, 2, 1, 5, 1]);
    }
}
