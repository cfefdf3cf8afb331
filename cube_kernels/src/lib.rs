//! cubecl kernels for meft's sparse adapter, plugged into burn as a backend extension.
//!
//! The sparse adapter computes, for each token t and its K slots (active neurons),
//! `z_ts = x_t · k_j`, `a_ts = relu(gate_ts · z_ts)`, `y_t = Σ_s a_ts v_j` (j the slot's row),
//! without an `M × R` score matrix. [`SparseAdapterBackend`] is the extension trait:
//! - its default methods are the plain-op reference ([`reference`]), used by ndarray and by the
//!   tests as ground truth;
//! - `CubeBackend` (cuda, wgpu) implements it with the kernels in [`kernel`] (`forward.rs`),
//!   or the same sums in d-slices ([`slices`]: slice-major cubes, so the rows' repeats are L2 hits);
//! - `Fusion<B>` forwards to `B` as custom fusion operations (`fusion.rs`);
//! - `Autodiff<B>` registers the fused backward (`backward.rs`): a token kernel for `dx` and
//!   the gate gradient, and a row kernel that sums each active row's key/value gradient over
//!   the tokens that used it, in a fixed order (deterministic, no float atomics).
//!
//! [`sparse_adapter`] and [`gather_rows`] are the tensor-level entry points. LeMo's token
//! elimination kernels (segment selection, gather, merge) are in [`tokens`]; the chunked causal
//! attention with its row kernels in [`attention`]; the fused LM head + cross-entropy with its
//! row kernels in [`loss`].

pub mod attention;
mod backward;
mod forward;
mod fusion;
pub mod kernel;
pub mod launch;
pub mod loss;
pub mod probe;
pub mod reference;
pub mod slices;
pub mod tokens;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

/// Errors in building a [`HostIndex`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// The slot list is not `tokens × k` long.
    #[error("slot list has {got} entries, expected tokens × K = {expected}")]
    Length {
        /// Entries given.
        got: usize,
        /// `tokens · k`.
        expected: usize,
    },
    /// A slot names a row past the empty-slot value `rows`.
    #[error("token {token} slot {slot} names row {row}, but there are {rows} rows (empty slot = {rows})")]
    OutOfRange {
        /// Token.
        token: usize,
        /// Slot within the token.
        slot: usize,
        /// Row named.
        row: u32,
        /// Number of rows.
        rows: usize,
    },
    /// A token names the same row in two slots. A token's active rows are a set (the top-K
    /// of distinct neurons): the kernels would count such a row once per slot and the
    /// plain-op reference once, with the gates summed.
    #[error("token {token} names row {row} in slots {first} and {second}; a token's active rows must be distinct")]
    Repeated {
        /// Token.
        token: usize,
        /// Row named twice.
        row: u32,
        /// The first slot naming it.
        first: usize,
        /// The second.
        second: usize,
    },
    /// An index does not fit the backend's 32-bit int tensors.
    #[error("{0} entries exceed the 32-bit index range")]
    TooLarge(usize),
}

/// The active-neuron index of one forward call, on the host: per token its K slots, and the
/// transposed view (for each row, the entries that use it) the deterministic backward needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIndex {
    /// Tokens M.
    pub tokens: usize,
    /// Slots per token K.
    pub k: usize,
    /// Active rows R (a slot value of R is an empty slot).
    pub rows: usize,
    /// `[M, K]` row per slot.
    pub slots: Vec<i32>,
    /// `[R + 1]` offsets into `row_users`.
    pub row_offsets: Vec<i32>,
    /// Entries `t · K + s` grouped by row, ascending within a row.
    pub row_users: Vec<i32>,
    /// Token kernels in passes over blocks of rows (see [`HostIndex::plan`]).
    pub token_passes: Option<TokenPasses>,
    /// Row kernel in passes over blocks of tokens (see [`HostIndex::plan`]).
    pub row_passes: Option<RowPasses>,
    /// Run the kernels in d-slices ([`slices`]; see [`HostIndex::plan`]).
    pub sliced: bool,
    /// In d-slices, the partial dots over row tiles ([`slices::tiles`]).
    pub tiles: Option<slices::tiles::RowTiles>,
}

/// Whether the environment switch `name` is set to `0` or `false`.
pub(crate) fn switched_off(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("0") | Ok("false"))
}

/// The token kernels' passes: pass p handles each token's slots whose rows lie in
/// `p · rows_per_pass .. (p + 1) · rows_per_pass` (empty slots in the last pass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPasses {
    /// Number of passes P.
    pub passes: usize,
    /// `[M, K]`: each token's slots ordered by row.
    pub order: Vec<i32>,
    /// `[M, P + 1]`: where each pass starts in a token's order.
    pub ranges: Vec<i32>,
    /// The tokens with slots in each pass, pass by pass (ascending within a pass): a pass
    /// launches one cube per such token, not one per token.
    pub visits: Vec<i32>,
    /// `[P + 1]`: where each pass starts in `visits`.
    pub visit_offsets: Vec<usize>,
}

/// The row kernel's passes: pass q sums the entries of tokens
/// `q · tokens_per_pass .. (q + 1) · tokens_per_pass`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPasses {
    /// Number of passes Q.
    pub passes: usize,
    /// `[R, Q + 1]`: absolute positions in `row_users` where each pass starts, per row.
    pub ranges: Vec<i32>,
}

/// The token kernels' passes must average at least half of min(M, this) cubes each (about
/// four waves of 4 cubes on a 132-SM H100/H200): a pass is a launch of its own, and a
/// launch of a few hundred cubes leaves most of the GPU idle.
const MIN_PASS_CUBES: usize = 2048;

/// Bytes of rows (or tokens) one pass keeps hot: `MEFT_KERNEL_L2_MB` (default 24 MiB, half the
/// H100's 50 MB L2, so the streamed hidden states do not evict the block).
pub fn pass_budget_bytes() -> usize {
    std::env::var("MEFT_KERNEL_L2_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(24)
        << 20
}

impl HostIndex {
    /// Chooses L2 blocking for hidden width `d` and element size `elem` bytes. Without it each
    /// token streams its K rows from memory (`M·K` row reads: optimal when rows are rarely
    /// shared). When many tokens share rows (large K·M/R), passes over L2-sized blocks of rows
    /// read each row from memory about once, at the price of re-reading x and re-writing y per
    /// pass; a side is blocked only if that moves at most half the bytes (and, for the token
    /// kernels, each pass still fills the GPU: `MIN_PASS_CUBES`). The same trade for the row
    /// kernel over blocks of tokens. `MEFT_KERNEL_BLOCKING=0` turns it off. Without passes the
    /// kernels run in d-slices ([`slices`]; 4-byte floats, K ≤ [`slices::MAX_K`];
    /// `MEFT_KERNEL_SLICES=0` keeps whole rows), with the partial dots over row tiles
    /// ([`slices::tiles`]) where tokens reuse their slice in a tile (`MEFT_KERNEL_TILES=0`
    /// turns them off).
    ///
    /// Passes are planned for 4-byte floats only: outputs accumulate over passes in their own
    /// storage type, and in bf16 that rounds once per pass (measured on the H100: 1.4e-2
    /// relative error after 100 passes).
    pub fn plan(self, d: usize, elem: usize) -> Self {
        let off = switched_off("MEFT_KERNEL_BLOCKING");
        if off || elem < 4 {
            return self.unplanned();
        }
        self.plan_with(d, elem, pass_budget_bytes(), false)
    }

    /// The index without passes or slices (every kernel in one pass over whole rows).
    pub fn unplanned(mut self) -> Self {
        self.token_passes = None;
        self.row_passes = None;
        self.sliced = false;
        self.tiles = None;
        self
    }

    /// [`HostIndex::plan`] with an explicit per-pass byte budget; `force` blocks whenever
    /// the budget needs more than one pass (for tests).
    pub fn plan_with(mut self, d: usize, elem: usize, budget: usize, force: bool) -> Self {
        self.token_passes = None;
        self.row_passes = None;
        let (m, k, r) = (self.tokens as f64, self.k as f64, self.rows as f64);
        let row_bytes = 2 * d * elem;
        let rows_per_pass = (budget / row_bytes.max(1)).max(1);
        let p = self.rows.div_ceil(rows_per_pass).max(1);
        let gathered = m * k * row_bytes as f64;
        // A pass launches only the tokens with slots in it: each visit reads x and writes y,
        // and every visit but a token's first also reads y back. With routed slots (experts
        // of contiguous rows) most tokens sit out most passes.
        let visits = self.token_pass_visits(rows_per_pass) as f64;
        let blocked = (3.0 * visits - m) * (d * elem) as f64 + r * row_bytes as f64;
        // Passes run one after another, so each must fill the GPU: with routed slots at
        // K = 64 (H200, 8 192 tokens) a pass visits ~750 tokens, about 1.4 waves of cubes,
        // and the passes lost to one pass (12.3 vs 10.2 ms forward+backward).
        let filled = visits / p as f64 >= (self.tokens.min(MIN_PASS_CUBES) / 2) as f64;
        if p > 1 && (force || (2.0 * blocked <= gathered && filled)) {
            self.token_passes = Some(self.token_passes_for(p, rows_per_pass));
        }
        let token_bytes = 2 * d * elem; // x and dy
        let tokens_per_pass = (budget / token_bytes.max(1)).max(1);
        let q = self.tokens.div_ceil(tokens_per_pass).max(1);
        let gathered = m * k * token_bytes as f64;
        let visits = self.row_pass_visits(tokens_per_pass) as f64;
        let blocked = 2.0 * visits * row_bytes as f64 + m * token_bytes as f64;
        if q > 1 && (force || 2.0 * blocked <= gathered) {
            self.row_passes = Some(self.row_passes_for(q, tokens_per_pass));
        }
        // Without passes, the kernels run in d-slices (`slices`): the rows' bytes come from
        // memory about once and the repeats from L2, for a partial-score array of 1/128 of
        // the gathered bytes. `MEFT_KERNEL_SLICES=0` keeps whole rows.
        let slices_off = switched_off("MEFT_KERNEL_SLICES");
        self.sliced = !slices_off
            && self.token_passes.is_none()
            && self.row_passes.is_none()
            && slices::supported(elem, self.k);
        // In d-slices, row tiles where tokens reuse their slice in a tile (MEFT's routed rows:
        // an expert's tokens take several of its rows each). `MEFT_KERNEL_TILES=0` turns
        // them off.
        let tiles_off = switched_off("MEFT_KERNEL_TILES");
        self.tiles = None;
        if self.sliced && !tiles_off {
            let tiles = slices::tiles::RowTiles::new(&self.slots, self.k, self.rows);
            if tiles.reuse() >= slices::tiles::MIN_TILE_REUSE {
                self.tiles = Some(tiles);
            }
        }
        self
    }

    /// Σ over passes of the tokens with at least one slot in the pass's block of rows.
    fn token_pass_visits(&self, rows_per_pass: usize) -> usize {
        let mut seen = vec![usize::MAX; self.rows.div_ceil(rows_per_pass).max(1)];
        let mut visits = 0;
        for (e, &j) in self.slots.iter().enumerate() {
            let (t, j) = (e / self.k, j as usize);
            if j < self.rows && seen[j / rows_per_pass] != t {
                seen[j / rows_per_pass] = t;
                visits += 1;
            }
        }
        visits
    }

    /// Σ over passes of the rows with at least one user in the pass's block of tokens.
    fn row_pass_visits(&self, tokens_per_pass: usize) -> usize {
        (0..self.rows)
            .map(|j| {
                let users =
                    &self.row_users[self.row_offsets[j] as usize..self.row_offsets[j + 1] as usize];
                // Users are ascending, so their token blocks are too.
                let mut last = usize::MAX;
                users
                    .iter()
                    .filter(|&&e| {
                        let q = e as usize / self.k / tokens_per_pass;
                        let new = q != last;
                        last = q;
                        new
                    })
                    .count()
            })
            .sum()
    }

    fn token_passes_for(&self, passes: usize, rows_per_pass: usize) -> TokenPasses {
        let (k, np) = (self.k, passes + 1);
        let mut order = vec![0i32; self.tokens * k];
        let mut ranges = vec![0i32; self.tokens * np];
        for t in 0..self.tokens {
            let slots = &self.slots[t * k..][..k];
            let ord = &mut order[t * k..][..k];
            for (s, o) in ord.iter_mut().enumerate() {
                *o = s as i32;
            }
            ord.sort_by_key(|&s| (slots[s as usize], s));
            let rg = &mut ranges[t * np..][..np];
            let mut i = 0;
            for (p, start) in rg.iter_mut().enumerate().take(passes) {
                while i < k && (slots[ord[i] as usize] as usize) < p * rows_per_pass {
                    i += 1;
                }
                *start = i as i32;
            }
            rg[passes] = k as i32; // empty slots (row = R) fall in the last pass
        }
        // `MEFT_KERNEL_VISITS=all`: every token in every pass (the launch before visit lists,
        // for side-by-side benchmarks; a token without slots in a pass then leaves at once).
        let all = std::env::var("MEFT_KERNEL_VISITS").is_ok_and(|v| v == "all");
        let mut visits = Vec::new();
        let mut visit_offsets = vec![0];
        for p in 0..passes {
            visits.extend(
                (0..self.tokens)
                    .filter(|&t| all || ranges[t * np + p + 1] > ranges[t * np + p])
                    .map(|t| t as i32),
            );
            visit_offsets.push(visits.len());
        }
        TokenPasses {
            passes,
            order,
            ranges,
            visits,
            visit_offsets,
        }
    }

    fn row_passes_for(&self, passes: usize, tokens_per_pass: usize) -> RowPasses {
        let nq = passes + 1;
        let mut ranges = vec![0i32; self.rows * nq];
        for j in 0..self.rows {
            let (a, b) = (
                self.row_offsets[j] as usize,
                self.row_offsets[j + 1] as usize,
            );
            let users = &self.row_users[a..b];
            let rg = &mut ranges[j * nq..][..nq];
            let mut i = 0;
            for (q, start) in rg.iter_mut().enumerate().take(passes) {
                while i < users.len() && (users[i] as usize / self.k) < q * tokens_per_pass {
                    i += 1;
                }
                *start = (a + i) as i32;
            }
            rg[passes] = b as i32;
        }
        RowPasses { passes, ranges }
    }

    /// Builds the index from `slots` (`tokens × k`, values in `0..=rows`, `rows` = empty;
    /// a token's rows distinct).
    pub fn new(slots: &[u32], tokens: usize, k: usize, rows: usize) -> Result<Self, IndexError> {
        let expected = tokens * k;
        if slots.len() != expected {
            return Err(IndexError::Length {
                got: slots.len(),
                expected,
            });
        }
        if expected > i32::MAX as usize || rows >= i32::MAX as usize {
            return Err(IndexError::TooLarge(expected.max(rows)));
        }
        let mut counts = vec![0i32; rows + 1];
        for (e, &r) in slots.iter().enumerate() {
            if r as usize > rows {
                return Err(IndexError::OutOfRange {
                    token: e / k.max(1),
                    slot: e % k.max(1),
                    row: r,
                    rows,
                });
            }
            if (r as usize) < rows {
                counts[r as usize + 1] += 1;
            }
        }
        for j in 0..rows {
            counts[j + 1] += counts[j];
        }
        let row_offsets = counts;
        let mut next = row_offsets.clone();
        let mut row_users = vec![0i32; row_offsets[rows] as usize];
        for (e, &r) in slots.iter().enumerate() {
            if (r as usize) < rows {
                let at = &mut next[r as usize];
                row_users[*at as usize] = e as i32;
                *at += 1;
            }
        }
        // A row's users ascend, so a token naming it twice shows as two neighbours.
        for (j, w) in row_offsets.windows(2).enumerate() {
            let users = &row_users[w[0] as usize..w[1] as usize];
            if let Some(p) = users
                .windows(2)
                .find(|p| p[0] as usize / k == p[1] as usize / k)
            {
                return Err(IndexError::Repeated {
                    token: p[0] as usize / k,
                    row: j as u32,
                    first: p[0] as usize % k,
                    second: p[1] as usize % k,
                });
            }
        }
        Ok(Self {
            tokens,
            k,
            rows,
            slots: slots.iter().map(|&s| s as i32).collect(),
            row_offsets,
            row_users,
            token_passes: None,
            row_passes: None,
            sliced: false,
            tiles: None,
        })
    }

    /// Copies the index to `device` as int tensors of backend `B`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> ActiveIndex<B> {
        let int1 = |v: &[i32]| {
            let data = TensorData::new(v.to_vec(), [v.len()]).convert::<B::IntElem>();
            Tensor::<B, 1, Int>::from_data(data, device).into_primitive()
        };
        let slots =
            TensorData::new(self.slots.clone(), [self.tokens, self.k]).convert::<B::IntElem>();
        let one = || int1(&[0]);
        let (order, token_ranges, token_passes) = match &self.token_passes {
            Some(p) => (int1(&p.order), int1(&p.ranges), p.passes),
            None => (one(), one(), 1),
        };
        let (visits, visit_offsets) = match &self.token_passes {
            Some(p) if !p.visits.is_empty() => (int1(&p.visits), p.visit_offsets.clone()),
            Some(p) => (one(), p.visit_offsets.clone()),
            None => (one(), Vec::new()),
        };
        let (user_ranges, row_passes) = match &self.row_passes {
            Some(p) => (int1(&p.ranges), p.passes),
            None => (one(), 1),
        };
        let reshape = |t: IntTensor<B>, shape: [usize; 2]| {
            Tensor::<B, 1, Int>::from_primitive(t)
                .reshape(shape)
                .into_primitive()
        };
        let (tile_offsets, tile_entries) = match &self.tiles {
            Some(t) if !t.entries.is_empty() => {
                (int1(&t.offsets), int1(&t.device_entries(&self.slots)))
            }
            Some(t) => (int1(&t.offsets), one()),
            None => (one(), one()),
        };
        ActiveIndex {
            slots: Tensor::<B, 2, Int>::from_data(slots, device).into_primitive(),
            row_offsets: int1(&self.row_offsets),
            // Zero-sized buffers are not portable: an empty list still gets one element.
            row_users: if self.row_users.is_empty() {
                int1(&[0])
            } else {
                int1(&self.row_users)
            },
            order: match &self.token_passes {
                Some(_) => reshape(order, [self.tokens, self.k]),
                None => reshape(order, [1, 1]),
            },
            token_ranges: match &self.token_passes {
                Some(_) => reshape(token_ranges, [self.tokens, token_passes + 1]),
                None => reshape(token_ranges, [1, 1]),
            },
            user_ranges: match &self.row_passes {
                Some(_) => reshape(user_ranges, [self.rows, row_passes + 1]),
                None => reshape(user_ranges, [1, 1]),
            },
            visits,
            visit_offsets,
            token_passes: self.token_passes.as_ref().map(|p| p.passes),
            row_passes: self.row_passes.as_ref().map(|p| p.passes),
            sliced: self.sliced,
            tile_offsets,
            tile_entries,
            tiled: self.tiles.is_some(),
            rows: self.rows,
        }
    }
}

/// The active-neuron index on a backend's device (see [`HostIndex`]).
#[derive(Debug, Clone)]
pub struct ActiveIndex<B: Backend> {
    /// `[M, K]` row per slot (`rows` = empty).
    pub slots: IntTensor<B>,
    /// `[R + 1]` offsets into `row_users`.
    pub row_offsets: IntTensor<B>,
    /// Entries `t · K + s` grouped by row (at least one element; unused when empty).
    pub row_users: IntTensor<B>,
    /// `[M, K]` slots by row when the token kernels run in passes (else `[1, 1]`, unused).
    pub order: IntTensor<B>,
    /// `[M, P + 1]` pass starts (else `[1, 1]`, unused).
    pub token_ranges: IntTensor<B>,
    /// `[R, Q + 1]` row-kernel pass starts (else `[1, 1]`, unused).
    pub user_ranges: IntTensor<B>,
    /// The tokens visited by each token-kernel pass, pass by pass (else `[1]`, unused).
    pub visits: IntTensor<B>,
    /// `[P + 1]` (host): where each pass starts in `visits` (empty without passes).
    pub visit_offsets: Vec<usize>,
    /// P, when the token kernels run in passes.
    pub token_passes: Option<usize>,
    /// Q, when the row kernel runs in passes.
    pub row_passes: Option<usize>,
    /// Whether the cubecl kernels run in d-slices ([`slices`]).
    pub sliced: bool,
    /// `[tiles + 1]` row-tile offsets into `tile_entries` (else `[1]`, unused).
    pub tile_offsets: IntTensor<B>,
    /// `(entry, local row)` pairs grouped by row tile (`RowTiles::device_entries`; else `[1]`,
    /// unused).
    pub tile_entries: IntTensor<B>,
    /// Whether the sliced partial dots run over row tiles ([`slices::tiles`]).
    pub tiled: bool,
    /// Active rows R.
    pub rows: usize,
}

/// Gradients of [`SparseAdapterBackend::sparse_adapter_backward`].
#[derive(Debug, Clone)]
pub struct SparseAdapterGrads<B: Backend> {
    /// `[M, d]` input gradient.
    pub x: FloatTensor<B>,
    /// `[R, 2d]` key | value gradients of the active rows.
    pub rows: FloatTensor<B>,
    /// `[M, K]` gate gradient.
    pub gate: FloatTensor<B>,
}

/// burn backend extension: the sparse adapter's fused operations. The default methods are the
/// plain-op reference; cubecl backends override them with kernels.
pub trait SparseAdapterBackend: Backend {
    /// `src[indices[i], :]` for each i (`src` `[N, w]`, `indices` `[R]`): the active rows as a
    /// compact tensor. Indices may repeat.
    fn gather_rows(src: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        reference::gather_rows::<Self>(src, indices)
    }

    /// Forward: returns `(y [M, d], z [M, K])` where `z_ts = x_t · k_slot` (0 for an empty
    /// slot) is kept for the backward.
    fn sparse_adapter_forward(
        x: FloatTensor<Self>,
        rows: FloatTensor<Self>,
        index: &ActiveIndex<Self>,
        gate: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::forward::<Self>(x, rows, index, gate)
    }

    /// Backward of [`SparseAdapterBackend::sparse_adapter_forward`] for output gradient `dy`.
    fn sparse_adapter_backward(
        x: FloatTensor<Self>,
        rows: FloatTensor<Self>,
        index: &ActiveIndex<Self>,
        gate: FloatTensor<Self>,
        z: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> SparseAdapterGrads<Self> {
        reference::backward::<Self>(x, rows, index, gate, z, dy)
    }

    /// Device probe for `meft bench kernels`: reads every element of the flat `src` `sweeps`
    /// times and returns `[1]` = `sweeps · Σ src`. Cubecl backends stream the reads through
    /// [`probe::read_probe_kernel`] (16-byte loads) and sum its per-unit partials; the default
    /// is burn's sum.
    fn read_probe(src: FloatTensor<Self>, sweeps: usize) -> FloatTensor<Self> {
        reference::read_probe::<Self>(src, sweeps)
    }
}

impl SparseAdapterBackend for burn::backend::NdArray<f32> {}
impl SparseAdapterBackend for burn::backend::NdArray<f64> {}

/// The sparse adapter's output `[M, d]`: `y_t = Σ_s relu(gate_ts · x_t·k_j) v_j` over token t's
/// slots (j = `index.slots[t, s]`), with `rows` `[R, 2d]` = `[k | v]` and `gate` `[M, K]`.
/// Differentiable in `x`, `rows` and `gate` on `Autodiff` backends.
pub fn sparse_adapter<B: SparseAdapterBackend>(
    x: Tensor<B, 2>,
    rows: Tensor<B, 2>,
    index: &ActiveIndex<B>,
    gate: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let (y, _) = B::sparse_adapter_forward(
        x.into_primitive().tensor(),
        rows.into_primitive().tensor(),
        index,
        gate.into_primitive().tensor(),
    );
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// `src[indices[i], :]` for each i, on the backend's gather kernel (not differentiable: the
/// rows it gathers are leaves staged from the host).
pub fn gather_rows<B: SparseAdapterBackend>(
    src: Tensor<B, 2>,
    indices: Tensor<B, 1, Int>,
) -> Tensor<B, 2> {
    let out = B::gather_rows(src.into_primitive().tensor(), indices.into_primitive());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_groups_entries_by_row_in_order() {
        // 3 tokens, K = 2, 4 rows; slot value 4 = empty.
        let idx = HostIndex::new(&[1, 3, 1, 4, 0, 1], 3, 2, 4).unwrap();
        assert_eq!(idx.row_offsets, vec![0, 1, 4, 4, 5]);
        assert_eq!(idx.row_users, vec![4, 0, 2, 5, 1]);
    }

    #[test]
    fn passes_cover_every_slot_and_entry_once() {
        // 4 tokens, K = 3, 6 rows (value 6 = empty); d = 1, f32: a row is 8 bytes, so a
        // 16-byte budget holds 2 rows (3 passes) and 2 tokens (2 passes).
        let slots = [5, 0, 2, 1, 6, 4, 3, 2, 0, 2, 5, 6];
        let idx = HostIndex::new(&slots, 4, 3, 6)
            .unwrap()
            .plan_with(1, 4, 16, true);
        let tp = idx.token_passes.clone().unwrap();
        assert_eq!(tp.passes, 3);
        assert_eq!(&tp.order[..3], &[1, 2, 0]); // token 0: rows 0, 2, 5
        assert_eq!(&tp.ranges[..4], &[0, 1, 2, 3]);
        assert_eq!(&tp.ranges[4..8], &[0, 1, 1, 3]); // token 1: rows 1, 4, empty

        // Token 2 (rows 3, 2, 0) sits out pass 2, tokens 1 and 3 pass 1 and pass 0.
        assert_eq!(tp.visits, vec![0, 1, 2, 0, 2, 3, 0, 1, 3]);
        assert_eq!(tp.visit_offsets, vec![0, 3, 6, 9]);
        let rp = idx.row_passes.clone().unwrap();
        assert_eq!(rp.passes, 2);
        for j in 0..6 {
            let rg = &rp.ranges[j * 3..][..3];
            assert_eq!(rg[0], idx.row_offsets[j]);
            assert_eq!(rg[2], idx.row_offsets[j + 1]);
            for q in 0..2 {
                for p in rg[q]..rg[q + 1] {
                    assert_eq!(idx.row_users[p as usize] as usize / 3 / 2, q);
                }
            }
        }
    }

    #[test]
    fn plan_counts_the_tokens_each_pass_visits() {
        // 64 tokens, K = 8, 32 rows; d = 1, f32: a row is 8 bytes, a 64-byte budget holds
        // 8 rows (4 passes). Routed over two blocks: token t has 4 rows in block t % 4 and 4
        // in block (t + 1) % 4, so each pass re-reads x and y for half the tokens: blocked
        // moves (3 · 128 − 64) · 4 + 32 · 8 = 1 536 bytes, under half of the 4 096 gathered
        // (every token in every pass would be (3 · 256 − 64) · 4 + 256 = 3 072, over half).
        let two: Vec<u32> = (0..64)
            .flat_map(|t| {
                let (a, b) = (t % 4 * 8, (t + 1) % 4 * 8 + 4);
                (0..4).map(move |s| a + s).chain((0..4).map(move |s| b + s))
            })
            .map(|j| j as u32)
            .collect();
        let idx = HostIndex::new(&two, 64, 8, 32).unwrap();
        assert_eq!(idx.token_pass_visits(8), 128);
        let idx = idx.plan_with(1, 4, 64, false);
        assert_eq!(idx.token_passes.map(|p| p.passes), Some(4));
        // Routed into one block: the bytes would pay, but a pass visits 16 of 64 tokens,
        // under half of min(M, MIN_PASS_CUBES): it would not fill the GPU. Forced, it blocks.
        let one: Vec<u32> = (0..64)
            .flat_map(|t| (0..8).map(move |s| (t % 4 * 8 + s) as u32))
            .collect();
        let idx = HostIndex::new(&one, 64, 8, 32).unwrap();
        assert_eq!(idx.token_pass_visits(8), 64);
        assert!(idx
            .clone()
            .plan_with(1, 4, 64, false)
            .token_passes
            .is_none());
        assert!(idx.clone().plan_with(1, 4, 64, true).token_passes.is_some());
        // Row visits: row j's users in each block of 8 tokens (2 per block, 8 blocks).
        assert_eq!(idx.row_pass_visits(8), 32 * 8);
    }

    #[test]
    fn plan_runs_in_slices_without_passes() {
        // 8 tokens, K = 4 over 64 rows at d = 16: no passes with the default budget, so
        // 4-byte floats run in d-slices; 2-byte floats, K past `MAX_K` and passes do not.
        let slots: Vec<u32> = (0..32).map(|e| (e * 7 % 64) as u32).collect();
        let idx = HostIndex::new(&slots, 8, 4, 64).unwrap();
        assert!(idx.clone().plan_with(16, 4, 1 << 20, false).sliced);
        assert!(!idx.clone().plan_with(16, 2, 1 << 20, false).sliced);
        assert!(
            !idx.clone()
                .plan_with(16, 4, 1 << 20, false)
                .unplanned()
                .sliced
        );
        let forced = idx.plan_with(16, 4, 2 * 16 * 4 * 8, true);
        assert!(forced.token_passes.is_some() && !forced.sliced);
        let wide: Vec<u32> = (0..=slices::MAX_K as u32).collect();
        let idx = HostIndex::new(&wide, 1, slices::MAX_K + 1, slices::MAX_K + 1).unwrap();
        assert!(!idx.plan_with(16, 4, 1 << 20, false).sliced);
    }

    #[test]
    fn plan_uses_row_tiles_where_tokens_reuse_them() {
        // 64 tokens × 8 slots over 4 096 rows at d = 16 (no passes, so d-slices).
        // Routed: each token's 8 rows lie in one tile of 32 rows → 8 entries per pair.
        let routed: Vec<u32> = (0..64u32)
            .flat_map(|t| (0..8u32).map(move |s| (t * 64 + s * 3) % 4096))
            .collect();
        let idx = HostIndex::new(&routed, 64, 8, 4096).unwrap();
        let planned = idx.clone().plan_with(16, 4, 1 << 20, false);
        assert!(planned.sliced);
        let tiles = planned.tiles.expect("routed rows run in tiles");
        assert_eq!(tiles.pairs, 64);
        assert!(idx
            .clone()
            .plan_with(16, 4, 1 << 20, false)
            .unplanned()
            .tiles
            .is_none());
        // Spread: token t's slot s at row (t + 97 s) · 5 mod 4 096 → one entry per pair.
        let spread: Vec<u32> = (0..64u32)
            .flat_map(|t| (0..8u32).map(move |s| ((t + 97 * s) * 5) % 4096))
            .collect();
        let idx = HostIndex::new(&spread, 64, 8, 4096).unwrap();
        let planned = idx.plan_with(16, 4, 1 << 20, false);
        assert!(planned.sliced && planned.tiles.is_none());
    }

    #[test]
    fn index_rejects_bad_input() {
        assert_eq!(
            HostIndex::new(&[0, 1, 2], 2, 2, 4),
            Err(IndexError::Length {
                got: 3,
                expected: 4
            })
        );
        assert!(matches!(
            HostIndex::new(&[0, 9], 1, 2, 4),
            Err(IndexError::OutOfRange {
                row: 9,
                slot: 1,
                ..
            })
        ));
        // Token 1 names row 2 in slots 0 and 2; token 0's row 2 and empty slots (4) repeat
        // across tokens or as empties, which is fine.
        let err = HostIndex::new(&[2, 4, 4, 2, 1, 2], 2, 3, 4).unwrap_err();
        assert_eq!(
            err,
            IndexError::Repeated {
                token: 1,
                row: 2,
                first: 0,
                second: 2
            }
        );
        assert!(err
            .to_string()
            .contains("token 1 names row 2 in slots 0 and 2"));
        assert!(HostIndex::new(&[2, 4, 4, 2, 1, 4], 2, 3, 4).is_ok());
    }
}
