//! [`SparseAdapterBackend`] for burn's cubecl backends (cuda, wgpu): kernel launches.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::CubeDim;

use crate::kernel::{
    gather_rows_kernel, sparse_backward_rows_kernel, sparse_backward_tokens_kernel,
    sparse_forward_kernel,
};
use crate::launch::{grid, LaunchShape, CHUNK};
use crate::slices::{DeviceTiles, Sliced};
use crate::{ActiveIndex, SparseAdapterBackend, SparseAdapterGrads};

pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: [usize; 2],
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(shape),
        dtype,
    )
}

fn dims2<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 2] {
    t.shape().dims::<2>()
}

/// The cubes of token-kernel pass `pass`: (first entry in `visits`, count); without passes
/// (0, M), one cube per token.
fn pass_visits<B: burn::tensor::backend::Backend>(
    index: &ActiveIndex<B>,
    pass: usize,
    m: usize,
) -> (usize, usize) {
    match index.visit_offsets.get(pass..pass + 2) {
        Some(&[a, b]) if index.token_passes.is_some() => (a, b - a),
        _ => (0, m),
    }
}

/// The row tiles of a tiled index on the device, for [`Sliced`].
fn row_tiles<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    index: &ActiveIndex<CubeBackend<R, F, I, BT>>,
) -> Option<DeviceTiles<R>> {
    index.tiled.then(|| DeviceTiles {
        offsets: into_contiguous(index.tile_offsets.clone()),
        entries: into_contiguous(index.tile_entries.clone()),
    })
}

/// Checks the shapes shared by forward and backward; returns (M, d, K).
fn check<R: CubeRuntime>(
    x: &CubeTensor<R>,
    rows: &CubeTensor<R>,
    slots: &CubeTensor<R>,
    gate: &CubeTensor<R>,
) -> (usize, usize, usize) {
    let [m, d] = dims2(x);
    let [_, w] = dims2(rows);
    let [ms, k] = dims2(slots);
    assert_eq!(
        w,
        2 * d,
        "sparse adapter: rows must be [R, 2d] for x [M, d]"
    );
    assert_eq!(ms, m, "sparse adapter: slots must be [M, K]");
    assert_eq!(dims2(gate), [m, k], "sparse adapter: gate must be [M, K]");
    assert_eq!(
        x.dtype, rows.dtype,
        "sparse adapter: x and rows differ in dtype"
    );
    (m, d, k)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SparseAdapterBackend
    for CubeBackend<R, F, I, BT>
{
    fn gather_rows(src: CubeTensor<R>, indices: CubeTensor<R>) -> CubeTensor<R> {
        let src = into_contiguous(src);
        let indices = into_contiguous(indices);
        let [_, w] = dims2(&src);
        let n = indices.shape().num_elements();
        let out = empty(&src, [n, w], src.dtype);
        if n * w == 0 {
            return out;
        }
        let shape = LaunchShape::scalar(w);
        let dtypes = [src.dtype.into(), indices.dtype.into()];
        gather_rows_kernel::launch::<R>(
            &src.client.clone(),
            grid(n),
            CubeDim::new_1d(shape.threads),
            src.into_tensor_arg(),
            indices.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            shape.threads,
            shape.cols,
            dtypes,
        );
        out
    }

    fn sparse_adapter_forward(
        x: CubeTensor<R>,
        rows: CubeTensor<R>,
        index: &ActiveIndex<Self>,
        gate: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x, rows) = (into_contiguous(x), into_contiguous(rows));
        let slots = into_contiguous(index.slots.clone());
        let gate = into_contiguous(gate);
        let (m, d, k) = check(&x, &rows, &slots, &gate);
        let dtype = x.dtype;
        let y = empty(&x, [m, d], dtype);
        let z = empty(&x, [m, k], dtype);
        if m == 0 || d == 0 || k == 0 {
            return (y, z);
        }
        let shape = LaunchShape::for_width(d);
        // The plan sets `sliced` only where the kernels take it; a hand-set flag on other
        // input (2-byte floats, K past `MAX_K`) falls back to whole rows.
        let sliced_ok = crate::slices::supported(dtype.size(), k);
        if index.sliced && sliced_ok && index.token_passes.is_none() {
            let sliced = Sliced {
                rows,
                slots,
                gate,
                dims: (m, d, k),
                vector: shape.vector,
                tiles: row_tiles(index),
            };
            return sliced.forward(&x);
        }
        let order = into_contiguous(index.order.clone());
        let ranges = into_contiguous(index.token_ranges.clone());
        let client = x.client.clone();
        let blocked = index.token_passes.is_some();
        let visits = into_contiguous(index.visits.clone());
        for pass in 0..index.token_passes.unwrap_or(1) {
            let (start, count) = pass_visits(index, pass, m);
            if count == 0 {
                continue;
            }
            sparse_forward_kernel::launch::<R>(
                &client,
                grid(count),
                CubeDim::new_1d(shape.threads),
                shape.vector,
                x.clone().into_tensor_arg(),
                rows.clone().into_tensor_arg(),
                slots.clone().into_tensor_arg(),
                gate.clone().into_tensor_arg(),
                order.clone().into_tensor_arg(),
                ranges.clone().into_tensor_arg(),
                visits.clone().into_tensor_arg(),
                y.clone().into_tensor_arg(),
                z.clone().into_tensor_arg(),
                pass as u32,
                start as u32,
                count as u32,
                k as u32,
                shape.threads,
                shape.cols,
                CHUNK,
                blocked,
                [dtype.into(), slots.dtype.into()],
            );
        }
        (y, z)
    }

    fn sparse_adapter_backward(
        x: CubeTensor<R>,
        rows: CubeTensor<R>,
        index: &ActiveIndex<Self>,
        gate: CubeTensor<R>,
        z: CubeTensor<R>,
        dy: CubeTensor<R>,
    ) -> SparseAdapterGrads<Self> {
        let (x, rows) = (into_contiguous(x), into_contiguous(rows));
        let slots = into_contiguous(index.slots.clone());
        let offsets = into_contiguous(index.row_offsets.clone());
        let users = into_contiguous(index.row_users.clone());
        let (gate, z, dy) = (
            into_contiguous(gate),
            into_contiguous(z),
            into_contiguous(dy),
        );
        let (m, d, k) = check(&x, &rows, &slots, &gate);
        let n = dims2(&rows)[0];
        let dtype = x.dtype;
        let dx = empty(&x, [m, d], dtype);
        let dz = empty(&x, [m, k], dtype);
        let dgate = empty(&x, [m, k], dtype);
        let drows = empty(&x, [n, 2 * d], dtype);
        let shape = LaunchShape::for_width(d);
        let dtypes = [dtype.into(), slots.dtype.into()];
        let client = x.client.clone();
        let sliced_ok = crate::slices::supported(dtype.size(), k);
        if index.sliced && sliced_ok && index.token_passes.is_none() && index.row_passes.is_none() {
            let sliced = Sliced {
                rows: rows.clone(),
                slots: slots.clone(),
                gate: gate.clone(),
                dims: (m, d, k),
                vector: shape.vector,
                tiles: row_tiles(index),
            };
            if m > 0 && d > 0 && k > 0 {
                let (dx, dz, dgate) = sliced.backward_tokens(&z, &dy);
                if n > 0 {
                    sliced.backward_rows(&x, &dy, &z, &dz, &offsets, &users, &drows);
                }
                return SparseAdapterGrads {
                    x: dx,
                    rows: drows,
                    gate: dgate,
                };
            }
        }
        if m > 0 && d > 0 && k > 0 {
            let order = into_contiguous(index.order.clone());
            let ranges = into_contiguous(index.token_ranges.clone());
            let blocked = index.token_passes.is_some();
            let visits = into_contiguous(index.visits.clone());
            for pass in 0..index.token_passes.unwrap_or(1) {
                let (start, count) = pass_visits(index, pass, m);
                if count == 0 {
                    continue;
                }
                sparse_backward_tokens_kernel::launch::<R>(
                    &client,
                    grid(count),
                    CubeDim::new_1d(shape.threads),
                    shape.vector,
                    dy.clone().into_tensor_arg(),
                    rows.clone().into_tensor_arg(),
                    slots.clone().into_tensor_arg(),
                    gate.clone().into_tensor_arg(),
                    z.clone().into_tensor_arg(),
                    order.clone().into_tensor_arg(),
                    ranges.clone().into_tensor_arg(),
                    visits.clone().into_tensor_arg(),
                    dx.clone().into_tensor_arg(),
                    dz.clone().into_tensor_arg(),
                    dgate.clone().into_tensor_arg(),
                    pass as u32,
                    start as u32,
                    count as u32,
                    k as u32,
                    shape.threads,
                    shape.cols,
                    CHUNK,
                    blocked,
                    dtypes,
                );
            }
        }
        if n > 0 && d > 0 {
            let user_ranges = into_contiguous(index.user_ranges.clone());
            let blocked = index.row_passes.is_some();
            for block in 0..index.row_passes.unwrap_or(1) {
                sparse_backward_rows_kernel::launch::<R>(
                    &client,
                    grid(n),
                    CubeDim::new_1d(shape.threads),
                    shape.vector,
                    x.clone().into_tensor_arg(),
                    dy.clone().into_tensor_arg(),
                    gate.clone().into_tensor_arg(),
                    z.clone().into_tensor_arg(),
                    dz.clone().into_tensor_arg(),
                    offsets.clone().into_tensor_arg(),
                    users.clone().into_tensor_arg(),
                    user_ranges.clone().into_tensor_arg(),
                    drows.clone().into_tensor_arg(),
                    block as u32,
                    k.max(1) as u32,
                    shape.threads,
                    shape.cols,
                    blocked,
                    [dtype.into(), index.row_offsets.dtype.into()],
                );
            }
        }
        SparseAdapterGrads {
            x: dx,
            rows: drows,
            gate: dgate,
        }
    }

    fn read_probe(src: CubeTensor<R>, sweeps: usize) -> CubeTensor<R> {
        match crate::probe::read_probe(src.clone(), sweeps) {
            Some(partials) => {
                let p = burn::tensor::Tensor::<Self, 1>::from_primitive(
                    burn::tensor::TensorPrimitive::Float(partials),
                );
                p.sum().into_primitive().tensor()
            }
            None => crate::reference::read_probe::<Self>(src, sweeps),
        }
    }
}
