//! meft's LLaMA forward pass and tokenizer against an independent Python reference
//! (scripts/reference/llama_logits.py; the fixture records the command that made it).

mod common;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use meft::gguf::GgufFile;
use meft::model::Llama;
use meft::tokenizer::TextTokenizer;

type B = NdArray<f32>;

/// Compares logits at every position of every case; returns the worst relative error,
/// measured per position as max |ours - ref| / max |ref| over the fixture's stored ids.
fn check_model(model_key: &str, path: std::path::PathBuf) -> f64 {
    let fixture = common::reference();
    let cases = fixture["models"][model_key].as_array().unwrap().clone();
    let device = Default::default();
    let gguf = GgufFile::open(path).unwrap();
    let (model, cfg) = Llama::<B>::from_gguf(&gguf, &device).unwrap();
    let mut worst = 0f64;
    for case in &cases {
        let ids: Vec<i32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        let n = ids.len();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits: Vec<f32> = model.forward(tokens, None).into_data().into_vec().unwrap();
        for (t, pos) in case["positions"].as_array().unwrap().iter().enumerate() {
            let row = &logits[t * cfg.vocab_size..(t + 1) * cfg.vocab_size];
            let ids = pos["ids"].as_array().unwrap();
            let refs = pos["logits"].as_array().unwrap();
            let scale = refs
                .iter()
                .map(|r| r.as_f64().unwrap().abs())
                .fold(0.0, f64::max);
            let err = ids
                .iter()
                .zip(refs)
                .map(|(i, r)| {
                    (row[i.as_u64().unwrap() as usize] as f64 - r.as_f64().unwrap()).abs()
                })
                .fold(0.0, f64::max);
            worst = worst.max(err / scale);
            let argmax = meft::generate::argmax(row);
            assert_eq!(
                argmax as u64,
                pos["argmax"].as_u64().unwrap(),
                "{model_key} position {t}: argmax differs"
            );
        }
    }
    worst
}

#[test]
fn smollm2_logits_match_reference() {
    let worst = check_model(
        "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        common::smollm2(),
    );
    println!("SmolLM2 worst relative logit error: {worst:.2e}");
    assert!(worst <= 1e-3, "relative error {worst} > 1e-3");
}

#[test]
fn tinycoder_logits_match_reference() {
    let worst = check_model("assets/tinycoder/tiny.gguf", common::tinycoder());
    println!("tinycoder worst relative logit error: {worst:.2e}");
    assert!(worst <= 1e-3, "relative error {worst} > 1e-3");
}

#[test]
fn smollm2_tokenizer_matches_reference_bpe() {
    let gguf = GgufFile::open(common::smollm2()).unwrap();
    let tok = TextTokenizer::from_gguf(&gguf).unwrap();
    let fixture = common::reference();
    for case in fixture["models"]["assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
        .as_array()
        .unwrap()
    {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(prompt).unwrap();
        assert_eq!(got, want, "token ids of {prompt:?}");
        assert_eq!(tok.decode(&got).unwrap(), prompt, "decode round trip");
    }
    assert_eq!(tok.encode("<|im_start|><|im_end|>").unwrap(), vec![1, 2]);
    assert_eq!(tok.eos_id, Some(2));
    assert_eq!(
        tok.chatml_prompt("Hi"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
