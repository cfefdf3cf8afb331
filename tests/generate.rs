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

#[test]
fn cached_decoding_matches_full_causal_forward_across_cache_growth() {
    use burn::tensor::{Int, Tensor, TensorData};
    // 300 steps cross the cache's first capacity block (256 positions) and its regrowth.
    let device = Default::default();
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let (model, cfg) = Llama::<NdArray<f32>>::from_gguf(&gguf, &device).unwrap();
    let prompt = [1u32, 450, 4996];
    let out = generate(
        &model,
        &prompt,
        300,
        Sampling::Greedy,
        None,
        &device,
        |_| {},
    )
    .unwrap();
    let seq: Vec<i32> = prompt
        .iter()
        .chain(&out[..out.len() - 1])
        .map(|&t| t as i32)
        .collect();
    let n = seq.len();
    let tokens = Tensor::<NdArray<f32>, 2, Int>::from_data(TensorData::new(seq, [1, n]), &device);
    let logits: Vec<f32> = model.forward(tokens, None).into_data().into_vec().unwrap();
    for (i, &tok) in out.iter().enumerate() {
        let pos = prompt.len() - 1 + i;
        let row = &logits[pos * cfg.vocab_size..(pos + 1) * cfg.vocab_size];
        assert_eq!(meft::generate::argmax(row), tok, "step {i}");
    }
}
