//! Backward through the full model: autodiff gradients against finite differences (f64).

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData};
use meft::gguf::GgufFile;
use meft::model::{CausalLmBatch, Llama};

type Inner = NdArray<f64>;
type B = Autodiff<Inner>;

fn batch<Bk: burn::tensor::backend::Backend>(device: &Bk::Device) -> CausalLmBatch<Bk> {
    let inputs = [
        [1, 450, 4996, 17354, 1701, 29916],
        [1, 29871, 13, 1576, 2, 2],
    ];
    let targets = [
        [450, 4996, 17354, 1701, 29916, 13],
        [29871, 13, 1576, 2, 2, 2],
    ];
    // Prompt positions and padding are masked out of the loss.
    let mask = [[0., 0., 1., 1., 1., 1.], [0., 1., 1., 1., 0., 0.]];
    CausalLmBatch {
        inputs: Tensor::<Bk, 2, Int>::from_data(TensorData::from(inputs), device),
        targets: Tensor::<Bk, 2, Int>::from_data(TensorData::from(targets), device),
        target_mask: Tensor::from_data(TensorData::from(mask), device),
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let device = Default::default();
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let (mut model, cfg) = Llama::<B>::from_gguf(&gguf, &device).unwrap();
    // Train only the first block's FFN norm scale: its gradient flows back from the loss
    // through every later block, the final norm and the LM head.
    let gamma = model.blocks[0].ffn_norm.gamma.val().detach().require_grad();
    model.blocks[0].ffn_norm.gamma = Param::from_tensor(gamma.clone());
    let batch = batch::<B>(&device);
    let loss = model.loss(&batch);
    let grads = loss.backward();
    let analytic: Vec<f64> = model.blocks[0]
        .ffn_norm
        .gamma
        .val()
        .grad(&grads)
        .unwrap()
        .into_data()
        .into_vec()
        .unwrap();
    assert_eq!(analytic.len(), cfg.d_model);

    let base: Vec<f64> = gamma.into_data().into_vec().unwrap();
    let loss_at = |g: &[f64]| -> f64 {
        let mut m = model.clone();
        m.blocks[0].ffn_norm.gamma = Param::from_tensor(Tensor::from_data(
            TensorData::new(g.to_vec(), [g.len()]),
            &device,
        ));
        m.loss(&batch).into_scalar()
    };
    let eps = 1e-5;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += eps;
        down[i] -= eps;
        let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * eps);
        let err = (numeric - analytic[i]).abs() / analytic[i].abs().max(1e-3);
        worst = worst.max(err);
    }
    assert!(
        analytic.iter().any(|g| g.abs() > 1e-6),
        "gradient is all zero"
    );
    assert!(worst < 1e-5, "worst relative error {worst}");
}

#[test]
fn masked_targets_do_not_change_the_loss() {
    let device = Default::default();
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let (model, _) = Llama::<Inner>::from_gguf(&gguf, &device).unwrap();
    let a = batch::<Inner>(&device);
    let mut b = a.clone();
    // Change a target at a masked-out position (row 1, position 5).
    b.targets = Tensor::from_data(
        TensorData::from([
            [450, 4996, 17354, 1701, 29916, 13],
            [29871, 13, 1576, 2, 2, 7],
        ]),
        &device,
    );
    let (la, lb): (f64, f64) = (model.loss(&a).into_scalar(), model.loss(&b).into_scalar());
    assert_eq!(la, lb);
    // ...while changing a counted target does.
    b.targets = Tensor::from_data(
        TensorData::from([
            [450, 4996, 17354, 1701, 29916, 13],
            [29871, 14, 1576, 2, 2, 2],
        ]),
        &device,
    );
    assert_ne!(la, model.loss(&b).into_scalar());
}
