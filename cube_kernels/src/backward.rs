//! [`SparseAdapterBackend`] for `Autodiff<B>`: the forward of `B`, and a backward node that
//! calls `B::sparse_adapter_backward` (the fused kernels on cubecl backends).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;

use crate::{ActiveIndex, SparseAdapterBackend, SparseAdapterGrads};

/// What the backward needs: the inputs, the forward's per-slot scores `z`, and the index.
#[derive(Debug, Clone)]
struct SavedState<B: SparseAdapterBackend> {
    x: FloatTensor<B>,
    rows: FloatTensor<B>,
    gate: FloatTensor<B>,
    z: FloatTensor<B>,
    index: ActiveIndex<B>,
}

#[derive(Debug)]
struct SparseAdapterBackward;

impl<B: SparseAdapterBackend> Backward<B, 3> for SparseAdapterBackward {
    type State = SavedState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_rows, node_gate] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let g = B::sparse_adapter_backward(s.x, s.rows, &s.index, s.gate, s.z, dy);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, g.x);
        }
        if let Some(node) = node_rows {
            grads.register::<B>(node.id, g.rows);
        }
        if let Some(node) = node_gate {
            grads.register::<B>(node.id, g.gate);
        }
    }
}

fn inner<B: SparseAdapterBackend, C: CheckpointStrategy>(
    index: &ActiveIndex<Autodiff<B, C>>,
) -> ActiveIndex<B> {
    ActiveIndex {
        slots: index.slots.clone(),
        row_offsets: index.row_offsets.clone(),
        row_users: index.row_users.clone(),
        order: index.order.clone(),
        token_ranges: index.token_ranges.clone(),
        user_ranges: index.user_ranges.clone(),
        visits: index.visits.clone(),
        visit_offsets: index.visit_offsets.clone(),
        token_passes: index.token_passes,
        row_passes: index.row_passes,
        sliced: index.sliced,
        tile_offsets: index.tile_offsets.clone(),
        tile_entries: index.tile_entries.clone(),
        tiled: index.tiled,
        rows: index.rows,
    }
}

impl<B: SparseAdapterBackend, C: CheckpointStrategy> SparseAdapterBackend for Autodiff<B, C> {
    fn gather_rows(
        src: FloatTensor<Self>,
        indices: burn::tensor::ops::IntTensor<Self>,
    ) -> FloatTensor<Self> {
        // Not differentiable (staged rows are leaves): the result is a fresh untracked tensor.
        let out = B::gather_rows(src.primitive, indices);
        <Self as burn::tensor::backend::AutodiffBackend>::from_inner(out)
    }

    fn sparse_adapter_forward(
        x: FloatTensor<Self>,
        rows: FloatTensor<Self>,
        index: &ActiveIndex<Self>,
        gate: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let index = inner(index);
        let prep = SparseAdapterBackward
            .prepare::<C>([x.node.clone(), rows.node.clone(), gate.node.clone()])
            .compute_bound()
            .stateful();
        let (xp, rp, gp) = (x.primitive, rows.primitive, gate.primitive);
        let (y, z) = B::sparse_adapter_forward(xp.clone(), rp.clone(), &index, gp.clone());
        let z_out = <Self as burn::tensor::backend::AutodiffBackend>::from_inner(z.clone());
        let y = match prep {
            OpsKind::Tracked(prep) => {
                let state = SavedState {
                    x: xp,
                    rows: rp,
                    gate: gp,
                    z,
                    index,
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, z_out)
    }

    fn sparse_adapter_backward(
        x: FloatTensor<Self>,
        rows: FloatTensor<Self>,
        index: &ActiveIndex<Self>,
        gate: FloatTensor<Self>,
        z: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> SparseAdapterGrads<Self> {
        use burn::tensor::backend::AutodiffBackend;
        let g = B::sparse_adapter_backward(
            x.primitive,
            rows.primitive,
            &inner(index),
            gate.primitive,
            z.primitive,
            dy.primitive,
        );
        SparseAdapterGrads {
            x: Self::from_inner(g.x),
            rows: Self::from_inner(g.rows),
            gate: Self::from_inner(g.gate),
        }
    }

    fn read_probe(src: FloatTensor<Self>, sweeps: usize) -> FloatTensor<Self> {
        use burn::tensor::backend::AutodiffBackend;
        Self::from_inner(B::read_probe(src.primitive, sweeps))
    }
}
