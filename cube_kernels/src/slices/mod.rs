//! The sparse adapter in d-slices: the token and row kernels split the hidden width into
//! slices of [`LANES`] vectors (128 floats) and run slice by slice, so the rows every token
//! gathers from come from L2 instead of memory.
//!
//! One cube per token (`crate::kernel`) streams each of its K rows whole: at K = 64 and
//! R = 65 536 that reads 7–8× the rows' bytes from memory (each row serves ~8 tokens, and
//! 1 GiB of rows does not stay in a 60 MB L2). Here the cubes are numbered slice-major, so at
//! any moment they gather from one slice of every row (`R · 512` bytes: 32 MiB at
//! R = 65 536), which L2 keeps in good part: most repeats are L2 hits (the tile dots read
//! each row about once; the output kernel, whose cubes in flight span about that whole
//! working set, read the rows 2.4–3× from memory on the H100 at routed K = 64, against the
//! 7–8× of whole rows). The price: a dot product needs the whole width, so the scores are
//! summed from per-slice partials (`[S, M, K]`, written once and read once) by a second
//! kernel. Forward and the backward's token side are the same three launches:
//!
//! | step | forward | backward (token side) |
//! |---|---|---|
//! | [`kernel::slice_dots_kernel`] | `x_t · k_j` per slice | `dy_t · v_j` per slice, active slots |
//! | [`kernel::slice_sum_kernel`] | `z` | `dz`, `dgate` |
//! | [`kernel::slice_rows_kernel`] | `y = Σ relu(gate·z) v_j` | `dx = Σ dz k_j` |
//!
//! (the last in slices of [`rows_lanes`] vectors: 64 floats by default), and the row
//! gradients run as [`kernel::user_coefs_kernel`] (each row user's token and coefficients,
//! once, in user order) then [`kernel::slice_grad_rows_kernel`] (one group per row, a cube
//! per [`grad_rows_per_group`]` · groups` consecutive rows, 64 by default, the tokens' x and
//! dy slices hot in L1 and L2). Used
//! when `HostIndex::plan` chooses it
//! (`ActiveIndex::sliced`): 4-byte floats, K ≤ [`MAX_K`] (the staged slot lists fill shared
//! memory), and no L2 passes.
//!
//! Row tiles ([`tiles`], `ActiveIndex::tiled`): where the tokens of a tile of 32 rows use
//! several of its rows each (MEFT's routed rows), the partial dots run as
//! [`tile_kernel::tile_dots_kernel`] — one cube per (slice, tile) with the tile's row slices
//! in shared memory, reading each token's slice once per tile. On the H200 (routed rows,
//! LLaMA-7B geometry) that cuts forward+backward by 12 % at K = 64 and 15 % at K = 256.
//! Two variants measured slower there and were removed (BENCHMARKS.md, 2026-12-05): row
//! gradients per (slice, tile) and tile dots from token slices staged in shared memory.

pub mod kernel;
pub mod tile_kernel;
pub mod tiles;

use burn::tensor::TensorMetadata;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::features::Plane;
use cubecl::prelude::ComputeClient;
use cubecl::CubeDim;

use crate::launch::grid;
use kernel::{
    slice_dots_kernel, slice_grad_rows_kernel, slice_rows_kernel, slice_sum_kernel,
    user_coefs_kernel,
};
use tile_kernel::tile_dots_kernel;

/// Vectors per slice (= units per token group): 128 floats with 16-byte vectors.
pub const LANES: u32 = 32;
/// Token (or row) groups per cube: 256 units.
pub const GROUPS: u32 = 8;
/// Slots scored at once by the dot-product kernel.
const CHUNK: u32 = 16;
/// Entries scored at once by the row-tile dot kernel's shared-memory sums (its tile of row
/// slices takes 16 KiB; lavapipe allows 32 KiB of shared memory).
const TILE_CHUNK: u32 = 8;
/// Largest K the sliced kernels take: each cube stages its tokens' K slots in shared memory
/// (`GROUPS · K` row ids and coefficients: 16 KiB at K = 256; the output kernel's 16 tokens
/// take 32 KiB there, lavapipe's limit).
pub const MAX_K: usize = 256;
/// Slots (row id and coefficient, 8 bytes) the output kernel stages per cube: 32 KiB.
const ROWS_STAGED_SLOTS: usize = 4096;

/// Number of slices of `lanes` vectors in a width of `dv` vectors.
pub fn slice_count(dv: usize, lanes: u32) -> usize {
    dv.div_ceil(lanes as usize).max(1)
}

/// Tensors of one sliced launch: `rows` `[R, 2d]`, `slots`, `gate` `[M, K]`.
pub(crate) struct Sliced<R: CubeRuntime> {
    pub rows: CubeTensor<R>,
    pub slots: CubeTensor<R>,
    pub gate: CubeTensor<R>,
    /// (M, d, K).
    pub dims: (usize, usize, usize),
    /// Elements per vector.
    pub vector: usize,
    /// Row tiles on the device: the partial dots run per (slice, tile).
    pub tiles: Option<DeviceTiles<R>>,
}

/// [`tiles::RowTiles`] on the device (`crate::ActiveIndex`'s `tile_offsets`, `tile_entries`).
pub(crate) struct DeviceTiles<R: CubeRuntime> {
    /// `[tiles + 1]` offsets into `entries`.
    pub offsets: CubeTensor<R>,
    /// `(entry, local row)` pairs by tile.
    pub entries: CubeTensor<R>,
}

impl<R: CubeRuntime> DeviceTiles<R> {
    fn count(&self) -> usize {
        self.offsets.shape().dims::<1>()[0] - 1
    }
}

impl<R: CubeRuntime> Sliced<R> {
    fn dtypes(&self) -> [cubecl::ir::StorageType; 2] {
        [self.rows.dtype.into(), self.slots.dtype.into()]
    }

    fn slices(&self) -> usize {
        slice_count(self.dims.1 / self.vector, LANES)
    }

    fn token_cubes(&self) -> usize {
        self.slices() * self.dims.0.div_ceil(GROUPS as usize)
    }

    /// `[S, M, K]` partial dot products of `h` with the rows' `half` (0 keys, 1 values);
    /// with `z` (backward), active slots only — the tile kernel computes every slot and
    /// leaves the masking to the sum kernel, which applies it either way.
    fn dots(&self, h: &CubeTensor<R>, half: u32, z: Option<&CubeTensor<R>>) -> CubeTensor<R> {
        let (m, _, k) = self.dims;
        let parts = crate::forward::empty(h, [self.slices() * m, k], h.dtype);
        if let Some(tiles) = &self.tiles {
            let plane = plane_sums(&h.client);
            tile_dots_kernel::launch::<R>(
                &h.client,
                grid(self.slices() * tiles.count()),
                CubeDim::new_1d(LANES * GROUPS),
                self.vector,
                h.clone().into_tensor_arg(),
                self.rows.clone().into_tensor_arg(),
                tiles.offsets.clone().into_tensor_arg(),
                tiles.entries.clone().into_tensor_arg(),
                parts.clone().into_tensor_arg(),
                half,
                k as u32,
                LANES,
                GROUPS,
                tiles::TILE_ROWS as u32,
                TILE_CHUNK,
                plane,
                plane_values(),
                self.dtypes(),
            );
            return parts;
        }
        slice_dots_kernel::launch::<R>(
            &h.client,
            grid(self.token_cubes()),
            CubeDim::new_1d(LANES * GROUPS),
            self.vector,
            h.clone().into_tensor_arg(),
            self.rows.clone().into_tensor_arg(),
            self.slots.clone().into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            z.unwrap_or(&self.gate).clone().into_tensor_arg(),
            parts.clone().into_tensor_arg(),
            half,
            k as u32,
            LANES,
            GROUPS,
            CHUNK,
            z.is_some(),
            plane_sums(&h.client),
            plane_values(),
            self.dtypes(),
        );
        parts
    }

    /// Sums the partials: `z` (forward), or `(dz, dgate)` given `z` (backward).
    fn sum(
        &self,
        parts: &CubeTensor<R>,
        z: Option<&CubeTensor<R>>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (m, _, k) = self.dims;
        let out = crate::forward::empty(parts, [m, k], parts.dtype);
        let out2 = match z {
            Some(_) => crate::forward::empty(parts, [m, k], parts.dtype),
            None => out.clone(),
        };
        let threads = 256u32;
        slice_sum_kernel::launch::<R>(
            &parts.client,
            grid((m * k).div_ceil(threads as usize)),
            CubeDim::new_1d(threads),
            parts.clone().into_tensor_arg(),
            self.slots.clone().into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            z.unwrap_or(&self.gate).clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            out2.clone().into_tensor_arg(),
            self.slices() as u32,
            self.rows.shape().dims::<2>()[0] as u32,
            threads,
            z.is_some(),
            self.dtypes(),
        );
        (out, out2)
    }

    /// `Σ_i c_ti rows[slot][half]` into a new `[M, d]`: `c = relu(gate · coef)` with `relu`.
    fn gather(&self, coef: &CubeTensor<R>, half: u32, relu: bool) -> CubeTensor<R> {
        let (m, d, k) = self.dims;
        let out = crate::forward::empty(coef, [m, d], coef.dtype);
        let lanes = rows_lanes();
        let tokens = (LANES * GROUPS / lanes).min((ROWS_STAGED_SLOTS / k.max(1)).max(1) as u32);
        let cubes = slice_count(d / self.vector, lanes) * m.div_ceil(tokens as usize);
        slice_rows_kernel::launch::<R>(
            &coef.client,
            grid(cubes),
            CubeDim::new_1d(lanes * tokens),
            self.vector,
            self.rows.clone().into_tensor_arg(),
            self.slots.clone().into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            coef.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            half,
            k as u32,
            lanes,
            tokens,
            relu,
            self.dtypes(),
        );
        out
    }

    /// Forward: `(y, z)`.
    pub fn forward(&self, x: &CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        let parts = self.dots(x, 0, None);
        let (z, _) = self.sum(&parts, None);
        (self.gather(&z, 1, true), z)
    }

    /// Backward, token side: `(dx, dz, dgate)`.
    pub fn backward_tokens(
        &self,
        z: &CubeTensor<R>,
        dy: &CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        let parts = self.dots(dy, 1, Some(z));
        let (dz, dgate) = self.sum(&parts, Some(z));
        (self.gather(&dz, 0, false), dz, dgate)
    }

    /// Backward, row side: `drows` `[R, 2d]` from the transposed index: the users' tokens
    /// and coefficients in user order ([`kernel::user_coefs_kernel`]), then the row sums.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_rows(
        &self,
        x: &CubeTensor<R>,
        dy: &CubeTensor<R>,
        z: &CubeTensor<R>,
        dz: &CubeTensor<R>,
        offsets: &CubeTensor<R>,
        users: &CubeTensor<R>,
        drows: &CubeTensor<R>,
    ) {
        let n = drows.shape().dims::<2>()[0];
        let k = self.dims.2.max(1) as u32;
        // `users` holds at least one element (a placeholder when no row has users).
        let n_users = users.shape().dims::<1>()[0];
        let tokens = crate::forward::empty(users, [n_users, 1], users.dtype);
        let coefs = crate::forward::empty(x, [n_users, 2], x.dtype);
        let threads = 256u32;
        user_coefs_kernel::launch::<R>(
            &x.client,
            grid(n_users.div_ceil(threads as usize)),
            CubeDim::new_1d(threads),
            self.gate.clone().into_tensor_arg(),
            z.clone().into_tensor_arg(),
            dz.clone().into_tensor_arg(),
            users.clone().into_tensor_arg(),
            tokens.clone().into_tensor_arg(),
            coefs.clone().into_tensor_arg(),
            k,
            threads,
            [x.dtype.into(), users.dtype.into()],
        );
        let lanes = grad_lanes();
        let groups = LANES * GROUPS / lanes;
        let per_group = grad_rows_per_group(groups);
        let slices = slice_count(self.dims.1 / self.vector, lanes);
        let cubes = slices * n.div_ceil((groups * per_group) as usize);
        slice_grad_rows_kernel::launch::<R>(
            &x.client,
            grid(cubes),
            CubeDim::new_1d(lanes * groups),
            self.vector,
            x.clone().into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            tokens.clone().into_tensor_arg(),
            coefs.clone().into_tensor_arg(),
            drows.clone().into_tensor_arg(),
            lanes,
            groups,
            per_group,
            [x.dtype.into(), offsets.dtype.into()],
        );
    }
}

/// Whether the dot-product kernel sums over planes (`kernel::slice_dots_kernel`'s `plane`):
/// the runtime has plane operations and every plane is [`LANES`] units wide (CUDA's warps;
/// not lavapipe, which has none). `MEFT_KERNEL_SLICE_PLANES=0` keeps the shared-memory sums.
pub fn plane_sums<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    let off = crate::switched_off("MEFT_KERNEL_SLICE_PLANES");
    let props = client.properties();
    !off && props.features.plane.contains(Plane::Ops)
        && props.hardware.plane_size_min == LANES
        && props.hardware.plane_size_max == LANES
}

/// Values per unit in the partial-dot kernels' plane sums
/// (`kernel::plane_transposed_sums`): 32, 16 or 8 entries are summed per butterfly; fewer
/// take fewer registers (more cubes per SM) for a few more shuffles per sum. 8 measured
/// best on the H100 at LLaMA-7B geometry: routed K = 64 forward+backward 6.71 / 6.86 ms
/// against 6.94 / 7.08 (16) and 7.32 / 7.18 (32); the tile dots at 32 registers and 82 %
/// warps active against 64 and 41 % (BENCHMARKS.md, 2026-12-05).
/// `MEFT_KERNEL_PLANE_VALUES` (32 or 16; any other value keeps 8) overrides it.
pub fn plane_values() -> u32 {
    match std::env::var("MEFT_KERNEL_PLANE_VALUES").ok().as_deref() {
        Some("32") => 32,
        Some("16") => 16,
        _ => 8,
    }
}

/// Rows per group of the row-gradient kernel, given its `groups` per cube: a cube covers
/// `groups ·` this many consecutive rows (rows close together share users more often, whose
/// slices L1 then serves). By default 64 rows per cube: with 8 groups, 8 rows per group
/// measured best on the H200 at LLaMA-7B geometry, routed K = 64 forward+backward: with row
/// tiles 6.54 ms against 6.61 (4) and 6.83 (1), without 7.26 against 7.43 (1)
/// (BENCHMARKS.md, 2026-12-04). `MEFT_KERNEL_GRAD_ROWS` (1 to 16) overrides it.
pub fn grad_rows_per_group(groups: u32) -> u32 {
    std::env::var("MEFT_KERNEL_GRAD_ROWS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or((64 / groups).max(1))
        .clamp(1, 16)
}

/// Vectors per slice of the output kernel (`kernel::slice_rows_kernel`: y and dx): 16 by
/// default (a cube then takes 16 tokens), or 32 or 8 with `MEFT_KERNEL_ROWS_LANES`. On the
/// H100 at LLaMA-7B geometry 16 against 32 took routed K = 256 forward+backward from
/// 21.57 / 21.39 to 20.59 / 20.54 ms and was even at K = 64 (6.49 / 6.67 against
/// 6.49 / 6.70); under ncu the two output launches went from 1.32 / 1.30 to 1.25 / 1.22 ms,
/// with the rows read from memory 2.6–2.7 rather than 3.1–3.2 GB (BENCHMARKS.md,
/// 2026-12-05). 8 measured no better than 16.
pub fn rows_lanes() -> u32 {
    match std::env::var("MEFT_KERNEL_ROWS_LANES").ok().as_deref() {
        Some("32") => LANES,
        Some("8") => 8,
        _ => 16,
    }
}

/// Vectors per slice of the row-gradient kernel (units per row group; the cube keeps
/// `LANES · GROUPS` units, so narrower slices give more groups): 32, or 16 or 8 with
/// `MEFT_KERNEL_GRAD_LANES`. Narrower slices halve a cube's working set in L1 (its rows'
/// users' x and dy slices) but read the users' list and coefficients once more per slice; on
/// the H200 (routed K = 64) 16 vectors lifted L1 hits from 47 % to 70 % and took as long
/// (BENCHMARKS.md, 2026-12-05).
pub fn grad_lanes() -> u32 {
    match std::env::var("MEFT_KERNEL_GRAD_LANES").ok().as_deref() {
        Some("16") => 16,
        Some("8") => 8,
        _ => LANES,
    }
}

/// Whether the kernels may run in slices for element size `elem` and K slots.
pub fn supported(elem: usize, k: usize) -> bool {
    elem == 4 && k <= MAX_K
}
