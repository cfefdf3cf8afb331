//! [`SparseAdapterBackend`] for burn's fusion wrapper (the default `Wgpu` / `Cuda` types):
//! each operation is registered as a custom fusion operation that, when the stream runs,
//! calls the inner backend's implementation (the kernels).

use std::marker::PhantomData;

use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::{ActiveIndex, SparseAdapterBackend, SparseAdapterGrads};

/// The inner backend's index from the handles of a fused operation.
fn inner_index<B: FusionBackend>(
    handles: &mut HandleContainer<B::Handle>,
    ir: &[TensorIr],
    shape: &IndexShape,
) -> ActiveIndex<B> {
    ActiveIndex {
        slots: handles.get_int_tensor::<B>(&ir[0]),
        row_offsets: handles.get_int_tensor::<B>(&ir[1]),
        row_users: handles.get_int_tensor::<B>(&ir[2]),
        order: handles.get_int_tensor::<B>(&ir[3]),
        token_ranges: handles.get_int_tensor::<B>(&ir[4]),
        user_ranges: handles.get_int_tensor::<B>(&ir[5]),
        visits: handles.get_int_tensor::<B>(&ir[6]),
        visit_offsets: shape.visit_offsets.clone(),
        token_passes: shape.token_passes,
        row_passes: shape.row_passes,
        sliced: shape.sliced,
        tile_offsets: handles.get_int_tensor::<B>(&ir[7]),
        tile_entries: handles.get_int_tensor::<B>(&ir[8]),
        tiled: shape.tiled,
        rows: shape.rows,
    }
}

/// The index's plain fields, carried by the fused operation.
#[derive(Debug, Clone)]
struct IndexShape {
    rows: usize,
    token_passes: Option<usize>,
    row_passes: Option<usize>,
    sliced: bool,
    tiled: bool,
    visit_offsets: Vec<usize>,
}

impl IndexShape {
    fn of<B: FusionBackend>(index: &ActiveIndex<Fusion<B>>) -> Self {
        Self {
            rows: index.rows,
            visit_offsets: index.visit_offsets.clone(),
            token_passes: index.token_passes,
            row_passes: index.row_passes,
            sliced: index.sliced,
            tiled: index.tiled,
        }
    }
}

const INDEX_TENSORS: usize = 9;

fn index_tensors<B: FusionBackend>(
    index: &ActiveIndex<Fusion<B>>,
) -> [&FusionTensor<B::FusionRuntime>; INDEX_TENSORS] {
    [
        &index.slots,
        &index.row_offsets,
        &index.row_users,
        &index.order,
        &index.token_ranges,
        &index.user_ranges,
        &index.visits,
        &index.tile_offsets,
        &index.tile_entries,
    ]
}

fn index_ir<B: FusionBackend>(index: &ActiveIndex<Fusion<B>>) -> [TensorIr; INDEX_TENSORS] {
    index_tensors(index).map(|t| t.clone().into_ir())
}

fn out<R: FusionRuntime>(like: &FusionTensor<R>, shape: [usize; 2], dtype: DType) -> TensorIr {
    TensorIr::uninit(like.client.create_empty_handle(), Shape::new(shape), dtype)
}

#[derive(Debug)]
struct GatherOp<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + SparseAdapterBackend> Operation<B::FusionRuntime> for GatherOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let ([src, idx], [out]) = self.desc.as_fixed::<2, 1>();
        let src = handles.get_float_tensor::<B>(src);
        let idx = handles.get_int_tensor::<B>(idx);
        handles.register_float_tensor::<B>(&out.id, B::gather_rows(src, idx));
    }
}

#[derive(Debug)]
struct ProbeOp<B> {
    desc: CustomOpIr,
    sweeps: usize,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + SparseAdapterBackend> Operation<B::FusionRuntime> for ProbeOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let ([src], [out]) = self.desc.as_fixed::<1, 1>();
        let src = handles.get_float_tensor::<B>(src);
        handles.register_float_tensor::<B>(&out.id, B::read_probe(src, self.sweeps));
    }
}

#[derive(Debug)]
struct ForwardOp<B> {
    desc: CustomOpIr,
    shape: IndexShape,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + SparseAdapterBackend> Operation<B::FusionRuntime> for ForwardOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let (inputs, [y, z]) = self.desc.as_fixed::<{ 3 + INDEX_TENSORS }, 2>();
        let x = handles.get_float_tensor::<B>(&inputs[0]);
        let rows = handles.get_float_tensor::<B>(&inputs[1]);
        let gate = handles.get_float_tensor::<B>(&inputs[2]);
        let index = inner_index::<B>(handles, &inputs[3..], &self.shape);
        let (yv, zv) = B::sparse_adapter_forward(x, rows, &index, gate);
        handles.register_float_tensor::<B>(&y.id, yv);
        handles.register_float_tensor::<B>(&z.id, zv);
    }
}

#[derive(Debug)]
struct BackwardOp<B> {
    desc: CustomOpIr,
    shape: IndexShape,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + SparseAdapterBackend> Operation<B::FusionRuntime> for BackwardOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let (inputs, [dx, drows, dgate]) = self.desc.as_fixed::<{ 5 + INDEX_TENSORS }, 3>();
        let x = handles.get_float_tensor::<B>(&inputs[0]);
        let rows = handles.get_float_tensor::<B>(&inputs[1]);
        let gate = handles.get_float_tensor::<B>(&inputs[2]);
        let z = handles.get_float_tensor::<B>(&inputs[3]);
        let dy = handles.get_float_tensor::<B>(&inputs[4]);
        let index = inner_index::<B>(handles, &inputs[5..], &self.shape);
        let g = B::sparse_adapter_backward(x, rows, &index, gate, z, dy);
        handles.register_float_tensor::<B>(&dx.id, g.x);
        handles.register_float_tensor::<B>(&drows.id, g.rows);
        handles.register_float_tensor::<B>(&dgate.id, g.gate);
    }
}

impl<B: FusionBackend + SparseAdapterBackend> SparseAdapterBackend for Fusion<B> {
    fn gather_rows(
        src: FusionTensor<B::FusionRuntime>,
        indices: FusionTensor<B::FusionRuntime>,
    ) -> FusionTensor<B::FusionRuntime> {
        let client = src.client.clone();
        let streams = OperationStreams::with_inputs([&src, &indices]);
        let w = src.shape[1];
        let n = indices.shape.num_elements();
        let o = out(&src, [n, w], src.dtype);
        let desc = CustomOpIr::new(
            "meft_gather_rows",
            &[src.into_ir(), indices.into_ir()],
            &[o],
        );
        let op = GatherOp::<B> {
            desc: desc.clone(),
            _b: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .remove(0)
    }

    fn read_probe(
        src: FusionTensor<B::FusionRuntime>,
        sweeps: usize,
    ) -> FusionTensor<B::FusionRuntime> {
        let client = src.client.clone();
        let streams = OperationStreams::with_inputs([&src]);
        let o = TensorIr::uninit(client.create_empty_handle(), Shape::new([1]), src.dtype);
        let desc = CustomOpIr::new("meft_read_probe", &[src.into_ir()], &[o]);
        let op = ProbeOp::<B> {
            desc: desc.clone(),
            sweeps,
            _b: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .remove(0)
    }

    fn sparse_adapter_forward(
        x: FusionTensor<B::FusionRuntime>,
        rows: FusionTensor<B::FusionRuntime>,
        index: &ActiveIndex<Self>,
        gate: FusionTensor<B::FusionRuntime>,
    ) -> (
        FusionTensor<B::FusionRuntime>,
        FusionTensor<B::FusionRuntime>,
    ) {
        let client = x.client.clone();
        let mut inputs = vec![&x, &rows, &gate];
        inputs.extend(index_tensors(index));
        let streams = OperationStreams::with_inputs(inputs);
        let [m, d] = [x.shape[0], x.shape[1]];
        let k = gate.shape[1];
        let outputs = [out(&x, [m, d], x.dtype), out(&x, [m, k], x.dtype)];
        let mut inputs = vec![x.into_ir(), rows.into_ir(), gate.into_ir()];
        inputs.extend(index_ir(index));
        let desc = CustomOpIr::new("meft_sparse_adapter_forward", &inputs, &outputs);
        let op = ForwardOp::<B> {
            desc: desc.clone(),
            shape: IndexShape::of(index),
            _b: PhantomData,
        };
        let mut res = client.register(streams, OperationIr::Custom(desc), op);
        let z = res.pop().expect("two outputs");
        let y = res.pop().expect("two outputs");
        (y, z)
    }

    fn sparse_adapter_backward(
        x: FusionTensor<B::FusionRuntime>,
        rows: FusionTensor<B::FusionRuntime>,
        index: &ActiveIndex<Self>,
        gate: FusionTensor<B::FusionRuntime>,
        z: FusionTensor<B::FusionRuntime>,
        dy: FusionTensor<B::FusionRuntime>,
    ) -> SparseAdapterGrads<Self> {
        let client = x.client.clone();
        let mut inputs = vec![&x, &rows, &gate, &z, &dy];
        inputs.extend(index_tensors(index));
        let streams = OperationStreams::with_inputs(inputs);
        let dtype = x.dtype;
        let outputs = [
            out(&x, [x.shape[0], x.shape[1]], dtype),
            out(&x, [rows.shape[0], rows.shape[1]], dtype),
            out(&x, [gate.shape[0], gate.shape[1]], dtype),
        ];
        let mut inputs = vec![
            x.into_ir(),
            rows.into_ir(),
            gate.into_ir(),
            z.into_ir(),
            dy.into_ir(),
        ];
        inputs.extend(index_ir(index));
        let desc = CustomOpIr::new("meft_sparse_adapter_backward", &inputs, &outputs);
        let op = BackwardOp::<B> {
            desc: desc.clone(),
            shape: IndexShape::of(index),
            _b: PhantomData,
        };
        let mut res = client.register(streams, OperationIr::Custom(desc), op);
        let dgate = res.pop().expect("three outputs");
        let drows = res.pop().expect("three outputs");
        let dx = res.pop().expect("three outputs");
        SparseAdapterGrads {
            x: dx,
            rows: drows,
            gate: dgate,
        }
    }
}
