//! [`TokenSparsityBackend`] for burn's cubecl backends (cuda, wgpu): kernel launches.

use burn::tensor::{DType, Element, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::CubeDim;

use super::kernel::{segment_select_kernel, token_merge_kernel};
use super::{kept_per_input, TokenSparsityBackend};
use crate::launch::{grid, LaunchShape};

/// An uninitialised contiguous tensor of `shape` and `dtype` on `like`'s device.
pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> TokenSparsityBackend
    for CubeBackend<R, F, I, BT>
{
    fn segment_select(
        scores: CubeTensor<R>,
        segment: usize,
        keep: usize,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let scores = into_contiguous(scores);
        let [batch, seq] = scores.shape().dims::<2>();
        let kept = kept_per_input(seq, segment, keep);
        let int = <I as Element>::dtype();
        // Zero-sized buffers are not portable: keep at least one element.
        let idx = empty(&scores, vec![(batch * kept).max(1)], int);
        let inv = empty(&scores, vec![(batch * seq).max(1)], int);
        if batch * seq > 0 {
            let threads = segment.next_power_of_two().clamp(32, 256) as u32;
            let dtypes = [scores.dtype.into(), int.into()];
            segment_select_kernel::launch::<R>(
                &scores.client.clone(),
                grid(batch * seq.div_ceil(segment)),
                CubeDim::new_1d(threads),
                scores.into_tensor_arg(),
                idx.clone().into_tensor_arg(),
                inv.clone().into_tensor_arg(),
                keep as u32,
                kept as u32,
                segment as u32,
                threads,
                dtypes,
            );
        }
        (idx, inv)
    }

    fn token_merge(
        base: Option<CubeTensor<R>>,
        comp: Option<CubeTensor<R>>,
        inv: CubeTensor<R>,
        kept_rows: usize,
        width: usize,
    ) -> CubeTensor<R> {
        let inv = into_contiguous(inv);
        let rows = inv.shape().num_elements();
        let (with_base, with_comp) = (base.is_some(), comp.is_some());
        let base = base.map(into_contiguous);
        let comp = comp.map(into_contiguous);
        let like = base
            .as_ref()
            .or(comp.as_ref())
            .expect("token_merge needs base or comp");
        let dtype = like.dtype;
        let out = empty(like, vec![rows, width], dtype);
        if rows * width == 0 {
            return out;
        }
        // A missing side is never read; any tensor of the right dtype stands in for it.
        let base = base.unwrap_or_else(|| out.clone());
        let comp = comp.unwrap_or_else(|| out.clone());
        let shape = LaunchShape::scalar(width);
        let dtypes = [dtype.into(), inv.dtype.into()];
        token_merge_kernel::launch::<R>(
            &out.client.clone(),
            grid(rows),
            CubeDim::new_1d(shape.threads),
            base.into_tensor_arg(),
            comp.into_tensor_arg(),
            inv.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            kept_rows as u32,
            with_base,
            with_comp,
            shape.threads,
            shape.cols,
            dtypes,
        );
        out
    }
}
