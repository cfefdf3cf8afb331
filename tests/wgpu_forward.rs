//! The same model code on wgpu (Mesa lavapipe on CPU-only machines) matches ndarray.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{NdArray, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use meft::gguf::GgufFile;
use meft::model::Llama;

fn logits<B: Backend>(gguf: &GgufFile, device: &B::Device) -> Vec<f32> {
    let (model, _) = Llama::<B>::from_gguf(gguf, device).unwrap();
    let ids = TensorData::new(vec![1i32, 450, 4996, 17354, 1701, 29916, 13, 1576], [2, 4]);
    let tokens = Tensor::<B, 2, Int>::from_data(ids, device);
    model
        .forward(tokens, None)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap()
}

#[test]
fn tinycoder_forward_matches_ndarray() {
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let cpu = logits::<NdArray<f32>>(&gguf, &Default::default());
    let gpu = logits::<Wgpu<f32>>(&gguf, &Default::default());
    let scale = cpu.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(cpu.len(), gpu.len());
    assert!(
        worst / scale <= 1e-4,
        "max relative difference {} (abs {worst})",
        worst / scale
    );
}
