//! [`TokenSparsityBackend`] for burn's fusion wrapper: the two primitive operations are
//! registered as custom fusion operations that call the inner backend's kernels.

use std::marker::PhantomData;

use burn::tensor::{DType, Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{kept_per_input, TokenSparsityBackend};

fn out<R: FusionRuntime>(like: &FusionTensor<R>, shape: Vec<usize>, dtype: DType) -> TensorIr {
    TensorIr::uninit(like.client.create_empty_handle(), Shape::from(shape), dtype)
}

#[derive(Debug)]
struct SelectOp<B> {
    desc: CustomOpIr,
    segment: usize,
    keep: usize,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + TokenSparsityBackend> Operation<B::FusionRuntime> for SelectOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let ([scores], [idx, inv]) = self.desc.as_fixed::<1, 2>();
        let scores = handles.get_float_tensor::<B>(scores);
        let (i, v) = B::segment_select(scores, self.segment, self.keep);
        handles.register_int_tensor::<B>(&idx.id, i);
        handles.register_int_tensor::<B>(&inv.id, v);
    }
}

#[derive(Debug)]
struct MergeOp<B> {
    desc: CustomOpIr,
    with_base: bool,
    with_comp: bool,
    kept_rows: usize,
    width: usize,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + TokenSparsityBackend> Operation<B::FusionRuntime> for MergeOp<B> {
    fn execute(&self, handles: &mut HandleContainer<B::Handle>) {
        let inputs = &self.desc.inputs;
        let mut at = 0;
        let mut next = |on: bool| {
            on.then(|| {
                at += 1;
                handles.get_float_tensor::<B>(&inputs[at - 1])
            })
        };
        let base = next(self.with_base);
        let comp = next(self.with_comp);
        let inv = handles.get_int_tensor::<B>(&inputs[at]);
        let o = B::token_merge(base, comp, inv, self.kept_rows, self.width);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, o);
    }
}

impl<B: FusionBackend + TokenSparsityBackend> TokenSparsityBackend for Fusion<B> {
    fn segment_select(
        scores: FusionTensor<B::FusionRuntime>,
        segment: usize,
        keep: usize,
    ) -> (
        FusionTensor<B::FusionRuntime>,
        FusionTensor<B::FusionRuntime>,
    ) {
        let client = scores.client.clone();
        let streams = OperationStreams::with_inputs([&scores]);
        let (batch, seq) = (scores.shape[0], scores.shape[1]);
        let kept = kept_per_input(seq, segment, keep);
        let int = <B::IntElem as Element>::dtype();
        let outputs = [
            out(&scores, vec![(batch * kept).max(1)], int),
            out(&scores, vec![(batch * seq).max(1)], int),
        ];
        let desc = CustomOpIr::new("meft_segment_select", &[scores.into_ir()], &outputs);
        let op = SelectOp::<B> {
            desc: desc.clone(),
            segment,
            keep,
            _b: PhantomData,
        };
        let mut res = client.register(streams, OperationIr::Custom(desc), op);
        let inv = res.pop().expect("two outputs");
        let idx = res.pop().expect("two outputs");
        (idx, inv)
    }

    fn token_merge(
        base: Option<FusionTensor<B::FusionRuntime>>,
        comp: Option<FusionTensor<B::FusionRuntime>>,
        inv: FusionTensor<B::FusionRuntime>,
        kept_rows: usize,
        width: usize,
    ) -> FusionTensor<B::FusionRuntime> {
        let (with_base, with_comp) = (base.is_some(), comp.is_some());
        let mut tensors: Vec<FusionTensor<B::FusionRuntime>> = Vec::new();
        tensors.extend(base);
        tensors.extend(comp);
        let dtype = tensors
            .first()
            .expect("token_merge needs base or comp")
            .dtype;
        tensors.push(inv);
        let client = tensors[0].client.clone();
        let streams = OperationStreams::with_inputs(tensors.iter());
        let rows = tensors.last().map(|t| t.shape.num_elements()).unwrap_or(0);
        let o = out(&tensors[0], vec![rows, width], dtype);
        let ir: Vec<TensorIr> = tensors.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("meft_token_merge", &ir, &[o]);
        let op = MergeOp::<B> {
            desc: desc.clone(),
            with_base,
            with_comp,
            kept_rows,
            width,
            _b: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .remove(0)
    }
}
