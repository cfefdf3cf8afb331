//! The plain-op reference of the sparse adapter: the "generic path" (select → matmul → mask),
//! written with burn tensor ops only. It is the default implementation of
//! [`SparseAdapterBackend`](crate::SparseAdapterBackend) (ndarray uses it) and the ground
//! truth of the kernel tests. It materialises the `M × R` score matrix the kernels avoid.

use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::{ActiveIndex, SparseAdapterGrads};

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `src[indices[i], :]` with burn's `select`.
pub fn gather_rows<B: Backend>(src: FloatTensor<B>, indices: IntTensor<B>) -> FloatTensor<B> {
    let idx = Tensor::<B, 1, Int>::from_primitive(indices);
    prim(float::<B>(src).select(0, idx))
}

/// `[1]` = `sweeps · Σ src` (the read probe's reference).
pub fn read_probe<B: Backend>(src: FloatTensor<B>, sweeps: usize) -> FloatTensor<B> {
    let src = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(src));
    src.sum()
        .mul_scalar(sweeps as f64)
        .into_primitive()
        .tensor()
}

/// Per (token, row): the token's gate where the row is one of its slots, else 0 (`[M, R]`).
/// Empty slots (value R) land in an extra column that is cut off.
fn dense_gates<B: Backend>(
    gate: Tensor<B, 2>,
    slots: Tensor<B, 2, Int>,
    rows: usize,
) -> Tensor<B, 2> {
    let [m, _] = gate.dims();
    Tensor::<B, 2>::zeros([m, rows + 1], (&gate.device(), gate.dtype()))
        .scatter(1, slots, gate, IndexingUpdateOp::Add)
        .slice([0..m, 0..rows])
}

/// `[M, R]` → per slot `[M, K]` (0 for empty slots).
fn per_slot<B: Backend>(dense: Tensor<B, 2>, slots: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [m, _] = dense.dims();
    let pad = Tensor::<B, 2>::zeros([m, 1], (&dense.device(), dense.dtype()));
    Tensor::cat(vec![dense, pad], 1).gather(1, slots)
}

/// Splits `[R, 2d]` rows into keys and values.
fn split<B: Backend>(rows: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [r, w] = rows.dims();
    let d = w / 2;
    (rows.clone().slice([0..r, 0..d]), rows.slice([0..r, d..w]))
}

/// The forward as differentiable tensor ops (any backend; autodiff gives its backward).
/// Returns `(y, z)` like [`SparseAdapterBackend::sparse_adapter_forward`](crate::SparseAdapterBackend::sparse_adapter_forward).
pub fn forward_tensors<B: Backend>(
    x: Tensor<B, 2>,
    rows: Tensor<B, 2>,
    slots: Tensor<B, 2, Int>,
    gate: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = rows.dims()[0];
    let (keys, values) = split(rows);
    let scores = x.matmul(keys.transpose());
    let z = per_slot(scores.clone().detach(), slots.clone());
    let gates = dense_gates(gate, slots, n);
    (relu(scores * gates).matmul(values), z)
}

/// Default forward of the extension trait.
pub fn forward<B: Backend>(
    x: FloatTensor<B>,
    rows: FloatTensor<B>,
    index: &ActiveIndex<B>,
    gate: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let slots = Tensor::<B, 2, Int>::from_primitive(index.slots.clone());
    let (y, z) = forward_tensors(float::<B>(x), float::<B>(rows), slots, float::<B>(gate));
    (prim(y), prim(z))
}

/// Default backward of the extension trait, written out with dense ops:
/// `P = G ⊙ (x Kᵀ)`, `A = relu(P)`, `dA = dy Vᵀ`, `dP = dA ⊙ [P > 0]`,
/// `dx = (dP ⊙ G) K`, `dK = (dP ⊙ G)ᵀ x`, `dV = Aᵀ dy`, `dgate = (dP ⊙ x Kᵀ)` per slot.
pub fn backward<B: Backend>(
    x: FloatTensor<B>,
    rows: FloatTensor<B>,
    index: &ActiveIndex<B>,
    gate: FloatTensor<B>,
    _z: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> SparseAdapterGrads<B> {
    let (x, rows, gate, dy) = (
        float::<B>(x),
        float::<B>(rows),
        float::<B>(gate),
        float::<B>(dy),
    );
    let slots = Tensor::<B, 2, Int>::from_primitive(index.slots.clone());
    let n = rows.dims()[0];
    let (keys, values) = split(rows);
    let scores = x.clone().matmul(keys.clone().transpose());
    let gates = dense_gates(gate, slots.clone(), n);
    let pre = scores.clone() * gates.clone();
    let act = relu(pre.clone());
    let dpre = dy
        .clone()
        .matmul(values.transpose())
        .mask_fill(pre.lower_equal_elem(0.0), 0.0);
    let dscores = dpre.clone() * gates;
    let dx = dscores.clone().matmul(keys);
    let dk = dscores.transpose().matmul(x);
    let dv = act.transpose().matmul(dy);
    let dgate = per_slot(dpre * scores, slots);
    SparseAdapterGrads {
        x: prim(dx),
        rows: prim(Tensor::cat(vec![dk, dv], 1)),
        gate: prim(dgate),
    }
}
