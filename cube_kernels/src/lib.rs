//! cubecl kernels for meft's sparse adapter, plugged into burn as a backend extension.
//!
//! The sparse adapter computes, for each token t and its K slots (active neurons),
//! `z_ts = x_t · k_j`, `a_ts = relu(gate_ts · z_ts)`, `y_t = Σ_s a_ts v_j` (j the slot's row),
//! without an `M × R` score matrix. [`SparseAdapterBackend`] is the extension trait:
//! - its default methods are the plain-op reference ([`reference`]), used by ndarray and by the
//!   tests as ground truth;
//! - `CubeBackend` (cuda, wgpu) implements it with the kernels in [`kernel`] (`forward.rs`);
//! - `Fusion<B>` forwards to `B` as custom fusion operations (`fusion.rs`);
//! - `Autodiff<B>` registers the fused backward (`backward.rs`): a token kernel for `dx` and
//!   the gate gradient, and a row kernel that sums each active row's key/value gradient over
//!   the tokens that used it, in a fixed order (deterministic, no float atomics).
//!
//! [`sparse_adapter`] and [`gather_rows`] are the tensor-level entry points.

mod backward;
mod forward;
mod fusion;
pub mod kernel;
pub mod launch;
pub mod reference;

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
}

impl HostIndex {
    /// Builds the index from `slots` (`tokens × k`, values in `0..=rows`, `rows` = empty).
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
        Ok(Self {
            tokens,
            k,
            rows,
            slots: slots.iter().map(|&s| s as i32).collect(),
            row_offsets,
            row_users,
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
        ActiveIndex {
            slots: Tensor::<B, 2, Int>::from_data(slots, device).into_primitive(),
            row_offsets: int1(&self.row_offsets),
            // Zero-sized buffers are not portable: an empty list still gets one element.
            row_users: if self.row_users.is_empty() {
                int1(&[0])
            } else {
                int1(&self.row_users)
            },
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
    }
}
