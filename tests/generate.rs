//! End-to-end greedy generation with the real pretrained model on the CPU.

mod common;

use burn::backend::NdArray;
use meft::generate::{generate, Sampling};
use meft::gguf::GgufFile;
use meft::model::Llama;
use meft::tokenizer::TextTokenizer;

#[test]
fn smollm2_says_paris() {
    let device = Default::default();
    let gguf = GgufFile::open(common::smollm2()).unwrap();
    let tok = TextTokenizer::from_gguf(&gguf).unwrap();
    let (model, _) = Llama::<NdArray<f32>>::from_gguf(&gguf, &device).unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    let out = generate(
        &model,
        &prompt,
        8,
        Sampling::Greedy,
        tok.eos_id,
        &device,
        |_| {},
    )
    .unwrap();
    let text = tok.decode(&out).unwrap();
    assert!(text.starts_with(" Paris"), "continuation was {text:?}");

    // The KV-cache path must agree with recomputing the whole sequence each step.
    let mut ids = prompt.clone();
    for &expected in &out[..3] {
        let full = generate(&model, &ids, 1, Sampling::Greedy, None, &device, |_| {}).unwrap();
        assert_eq!(full[0], expected);
        ids.push(expected);
    }
}
