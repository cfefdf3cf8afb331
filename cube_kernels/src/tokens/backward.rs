//! [`TokenSparsityBackend`] for `Autodiff<B>`: gather and merge with their backward.
//!
//! - gather `c = x[idx]`: `dx = merge(none, dc)` (each kept row's gradient back at its row,
//!   zeros where eliminated);
//! - merge `y = kept ? c[inv] : base`: `dbase = merge(dy, none)` (the eliminated rows'
//!   gradients), `dc = dy[idx]`.
//!
//! Each row receives at most one value, so there is no reduction and the backward is exact.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::TensorMetadata;

use super::TokenSparsityBackend;

#[derive(Debug, Clone)]
struct Pattern<B: TokenSparsityBackend> {
    idx: IntTensor<B>,
    inv: IntTensor<B>,
    kept_rows: usize,
    width: usize,
}

#[derive(Debug)]
struct GatherBackward;

impl<B: TokenSparsityBackend> Backward<B, 1> for GatherBackward {
    type State = Pattern<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dc = grads.consume::<B>(&ops.node);
        let p = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(
                node.id,
                B::token_merge(None, Some(dc), p.inv, p.kept_rows, p.width),
            );
        }
    }
}

#[derive(Debug)]
struct MergeBackward;

impl<B: TokenSparsityBackend> Backward<B, 2> for MergeBackward {
    type State = Pattern<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_base, node_comp] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let p = ops.state;
        if let Some(node) = node_comp {
            grads.register::<B>(node.id, B::gather_rows(dy.clone(), p.idx));
        }
        if let Some(node) = node_base {
            grads.register::<B>(
                node.id,
                B::token_merge(Some(dy), None, p.inv, p.kept_rows, p.width),
            );
        }
    }
}

impl<B: TokenSparsityBackend, C: CheckpointStrategy> TokenSparsityBackend for Autodiff<B, C> {
    fn segment_select(
        scores: FloatTensor<Self>,
        segment: usize,
        keep: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        B::segment_select(scores.primitive, segment, keep)
    }

    fn token_merge(
        base: Option<FloatTensor<Self>>,
        comp: Option<FloatTensor<Self>>,
        inv: IntTensor<Self>,
        kept_rows: usize,
        width: usize,
    ) -> FloatTensor<Self> {
        let out = B::token_merge(
            base.map(|t| t.primitive),
            comp.map(|t| t.primitive),
            inv,
            kept_rows,
            width,
        );
        Self::from_inner(out)
    }

    fn gather_tokens(
        x: FloatTensor<Self>,
        idx: IntTensor<Self>,
        inv: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let width = x.primitive.shape().dims::<2>()[1];
        let kept_rows = idx.shape().num_elements();
        let prep = GatherBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful();
        let out = B::gather_rows(x.primitive, idx.clone());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(
                Pattern {
                    idx,
                    inv,
                    kept_rows,
                    width,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn merge_tokens(
        base: FloatTensor<Self>,
        comp: FloatTensor<Self>,
        idx: IntTensor<Self>,
        inv: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let kept_rows = comp.primitive.shape().dims::<2>()[0];
        let width = base.primitive.shape().dims::<2>()[1];
        let prep = MergeBackward
            .prepare::<C>([base.node.clone(), comp.node.clone()])
            .compute_bound()
            .stateful();
        let out = B::token_merge(
            Some(base.primitive),
            Some(comp.primitive),
            inv.clone(),
            kept_rows,
            width,
        );
        match prep {
            OpsKind::Tracked(prep) => prep.finish(
                Pattern {
                    idx,
                    inv,
                    kept_rows,
                    width,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
