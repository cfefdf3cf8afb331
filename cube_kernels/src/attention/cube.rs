//! [`ChunkedAttentionBackend`] for burn's cubecl backends (cuda, wgpu): the row kernels'
//! launches. `MEFT_ATTN_KERNELS=0` runs the plain ops instead (for A/B measurements).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::CubeDim;

use super::kernel::{causal_softmax_grad_kernel, causal_softmax_kernel};
use super::{float, prim, reference, ChunkedAttentionBackend};
use crate::launch::{grid, row_acc, row_threads};
use crate::tokens::forward::empty;

/// False when `MEFT_ATTN_KERNELS=0` (or `false`) asks for the plain ops.
pub fn attention_kernels_enabled() -> bool {
    !matches!(
        std::env::var("MEFT_ATTN_KERNELS").as_deref(),
        Ok("0") | Ok("false")
    )
}

/// `x` as is when its keys (last dim) are adjacent in memory — any other strides are read as
/// they are, so a pitched matmul output is not copied — else a contiguous copy.
fn unit_stride<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides()[3] == 1 {
        x
    } else {
        into_contiguous(x)
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ChunkedAttentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn causal_softmax(
        s: FloatTensor<Self>,
        limit: CubeTensor<R>,
        scale: f64,
        dtype: DType,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [b, kv, rc, keys] = s.shape().dims::<4>();
        let rows = b * kv * rc;
        if !attention_kernels_enabled() || rows * keys == 0 {
            let (p, lse) = reference::causal_softmax::<Self>(
                float(s),
                burn::tensor::Tensor::from_primitive(limit),
                scale,
                dtype,
                block,
            );
            return (prim(p), prim(lse));
        }
        let s = unit_stride(s);
        let limit = into_contiguous(limit);
        let acc = row_acc(s.dtype);
        let nb = keys.div_ceil(block).max(1);
        let p = empty(&s, vec![b * kv, nb, rc, block], dtype);
        let lse = empty(&s, vec![rows], acc);
        let threads = row_threads(keys);
        let dtypes = [s.dtype.into(), dtype.into(), acc.into(), limit.dtype.into()];
        causal_softmax_kernel::launch::<R>(
            &s.client.clone(),
            grid(rows),
            CubeDim::new_1d(threads),
            s.into_tensor_arg(),
            limit.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale as f32,
            threads,
            dtypes,
        );
        (p, lse)
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_softmax_grad(
        s: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        limit: CubeTensor<R>,
        scale: f64,
        dtype: DType,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [b, kv, rc, keys] = s.shape().dims::<4>();
        let rows = b * kv * rc;
        if !attention_kernels_enabled()
            || rows * keys == 0
            || dp.dtype != s.dtype
            || delta.dtype != lse.dtype
        {
            let (p, ds) = reference::causal_softmax_grad::<Self>(
                float(s),
                float(dp),
                float(lse),
                float(delta),
                burn::tensor::Tensor::from_primitive(limit),
                scale,
                dtype,
                block,
            );
            return (prim(p), prim(ds));
        }
        let s = unit_stride(s);
        let dp = unit_stride(dp);
        let lse = into_contiguous(lse);
        let delta = into_contiguous(delta);
        let limit = into_contiguous(limit);
        let nb = keys.div_ceil(block).max(1);
        let p = empty(&s, vec![b * kv, nb, rc, block], dtype);
        let ds = empty(&s, vec![b * kv, nb, rc, block], dtype);
        let threads = row_threads(keys);
        let dtypes = [
            s.dtype.into(),
            dtype.into(),
            lse.dtype.into(),
            limit.dtype.into(),
        ];
        causal_softmax_grad_kernel::launch::<R>(
            &s.client.clone(),
            grid(rows),
            CubeDim::new_1d(threads),
            s.into_tensor_arg(),
            dp.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            limit.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            scale as f32,
            threads,
            dtypes,
        );
        (p, ds)
    }
}
