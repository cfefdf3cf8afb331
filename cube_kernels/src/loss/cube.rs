//! [`ChunkedLossBackend`]'s row methods for burn's cubecl backends (cuda, wgpu): the row
//! kernels' launches. `MEFT_LOSS_KERNELS=0` runs the plain ops instead (for A/B measurements).

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::CubeDim;

use super::kernel::{loss_rows_grad_kernel, loss_rows_kernel};
use super::{plain_rows, plain_rows_grad, ChunkedLossBackend};
use crate::attention::{float, prim};
use crate::launch::{grid, row_acc, row_threads};
use crate::tokens::forward::empty;

/// False when `MEFT_LOSS_KERNELS=0` (or `false`) asks for the plain ops.
pub fn loss_kernels_enabled() -> bool {
    !matches!(
        std::env::var("MEFT_LOSS_KERNELS").as_deref(),
        Ok("0") | Ok("false")
    )
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ChunkedLossBackend
    for CubeBackend<R, F, I, BT>
{
    fn loss_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        let [rows, vocab] = logits.shape().dims::<2>();
        if !loss_kernels_enabled() || rows * vocab == 0 {
            let (nll, lse, best) =
                plain_rows::<Self>(float(logits), burn::tensor::Tensor::from_primitive(targets));
            return (prim(nll), prim(lse), best.into_primitive());
        }
        let targets = into_contiguous(targets);
        let acc = row_acc(logits.dtype);
        let nll = empty(&logits, vec![rows], acc);
        let lse = empty(&logits, vec![rows], acc);
        let best = empty(&targets, vec![rows], targets.dtype);
        let threads = row_threads(vocab);
        let dtypes = [logits.dtype.into(), acc.into(), targets.dtype.into()];
        loss_rows_kernel::launch::<R>(
            &logits.client.clone(),
            grid(rows),
            CubeDim::new_1d(threads),
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            nll.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            best.clone().into_tensor_arg(),
            threads,
            dtypes,
        );
        (nll, lse, best)
    }

    fn loss_rows_grad(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        let [rows, vocab] = logits.shape().dims::<2>();
        if !loss_kernels_enabled() || rows * vocab == 0 || lse.dtype != dnll.dtype {
            return prim(plain_rows_grad::<Self>(
                float(logits),
                float(lse),
                float(dnll),
                burn::tensor::Tensor::from_primitive(targets),
                dtype,
            ));
        }
        let lse = into_contiguous(lse);
        let dnll = into_contiguous(dnll);
        let targets = into_contiguous(targets);
        let grad = empty(&logits, vec![rows, vocab], dtype);
        let threads = row_threads(vocab);
        let dtypes = [
            logits.dtype.into(),
            dtype.into(),
            lse.dtype.into(),
            targets.dtype.into(),
        ];
        loss_rows_grad_kernel::launch::<R>(
            &logits.client.clone(),
            grid(rows),
            CubeDim::new_1d(threads),
            logits.into_tensor_arg(),
            lse.into_tensor_arg(),
            dnll.into_tensor_arg(),
            targets.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            threads,
            dtypes,
        );
        grad
    }
}
