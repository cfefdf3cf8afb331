//! Hostile and broken inputs give clear errors, never panics.

mod common;

use burn::backend::NdArray;
use common::GgufBuilder;
use meft::generate::{generate, Sampling};
use meft::gguf::GgufFile;
use meft::model::Llama;

fn err_of(bytes: Vec<u8>) -> String {
    GgufFile::from_bytes(bytes)
        .expect_err("parsing should fail")
        .to_string()
}

fn f32_tensor(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

#[test]
fn wrong_magic_is_named() {
    let mut bytes = GgufBuilder::default().build();
    bytes[..4].copy_from_slice(b"GGML");
    let msg = err_of(bytes);
    assert!(
        msg.contains("not a GGUF file") && msg.contains("GGUF"),
        "{msg}"
    );
    assert!(err_of(b"GG".to_vec()).contains("truncated"));
}

#[test]
fn truncated_file_is_an_error_at_every_cut() {
    // Every prefix of a real model file must fail cleanly (the header, metadata, tensor
    // table and data are each cut somewhere in this sweep).
    let bytes = std::fs::read(common::tinycoder()).unwrap();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    let step = bytes.len() / 97;
    for cut in (0..bytes.len() - 1).step_by(step).chain([bytes.len() - 1]) {
        let msg = err_of(bytes[..cut].to_vec());
        assert!(
            msg.contains("truncated") || msg.contains("corrupt"),
            "cut {cut}: {msg}"
        );
    }
}

#[test]
fn unknown_and_unsupported_tensor_types_are_named() {
    let q4k = GgufBuilder::default()
        .tensor("blk.0.attn_q.weight", &[256, 1], 12, vec![0; 144])
        .build();
    let msg = err_of(q4k);
    assert!(
        msg.contains("blk.0.attn_q.weight")
            && msg.contains("Q4_K")
            && msg.contains("cannot dequantize"),
        "{msg}"
    );
    let weird = GgufBuilder::default()
        .tensor("w", &[4], 99, vec![0; 16])
        .build();
    assert!(err_of(weird).contains("type 99 (unknown)"));
}

#[test]
fn lying_counts_do_not_allocate() {
    let mut bytes = GgufBuilder::default().build();
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err_of(bytes).contains("declares"));
    let mut bytes = GgufBuilder::default().string("k", "v").build();
    // The string length of the key claims 2^62 bytes.
    bytes[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(err_of(bytes).contains("truncated"));
}

#[test]
fn tensor_data_past_the_end_and_shape_mismatch() {
    let mut bytes = GgufBuilder::default()
        .tensor("w", &[8], 0, f32_tensor(8))
        .build();
    bytes.truncate(bytes.len() - 4);
    let msg = err_of(bytes);
    assert!(
        msg.contains("data of tensor 'w'") && msg.contains("truncated"),
        "{msg}"
    );

    let ok = GgufFile::from_bytes(
        GgufBuilder::default()
            .tensor("w", &[4, 2], 0, f32_tensor(8))
            .build(),
    )
    .unwrap();
    assert_eq!(ok.tensor_f32("w", &[2, 4]).unwrap()[5], 5.0);
    let msg = ok.tensor_f32("w", &[4, 2]).unwrap_err().to_string();
    assert!(
        msg.contains("'w'") && msg.contains("[2, 4]") && msg.contains("[4, 2]"),
        "{msg}"
    );
    assert!(ok
        .tensor_f32("missing", &[1])
        .unwrap_err()
        .to_string()
        .contains("missing"));
}

#[test]
fn non_llama_or_incomplete_model_is_refused() {
    let gguf = GgufFile::from_bytes(
        GgufBuilder::default()
            .string("general.architecture", "gemma3")
            .build(),
    )
    .unwrap();
    let msg = Llama::<NdArray<f32>>::from_gguf(&gguf, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("gemma3") && msg.contains("not supported"),
        "{msg}"
    );
    let gguf = GgufFile::from_bytes(
        GgufBuilder::default()
            .string("general.architecture", "llama")
            .build(),
    )
    .unwrap();
    let msg = Llama::<NdArray<f32>>::from_gguf(&gguf, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("llama.") && msg.contains("missing"), "{msg}");
}

#[test]
fn prompt_longer_than_context_and_bad_ids() {
    let device = Default::default();
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let (model, cfg) = Llama::<NdArray<f32>>::from_gguf(&gguf, &device).unwrap();
    let long = vec![1u32; cfg.max_seq_len + 1];
    let msg = generate(&model, &long, 1, Sampling::Greedy, None, &device, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("context") && msg.contains(&cfg.max_seq_len.to_string()),
        "{msg}"
    );
    let msg = generate(
        &model,
        &[1, cfg.vocab_size as u32],
        1,
        Sampling::Greedy,
        None,
        &device,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("out of range"), "{msg}");
    assert!(generate(&model, &[], 1, Sampling::Greedy, None, &device, |_| {}).is_err());
}

#[test]
fn unsupported_tokenizer_model_is_named() {
    let gguf = GgufFile::from_bytes(
        GgufBuilder::default()
            .string("tokenizer.ggml.model", "bert")
            .build(),
    )
    .unwrap();
    let msg = meft::tokenizer::TextTokenizer::from_gguf(&gguf)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("'bert'") && msg.contains("not supported"),
        "{msg}"
    );
}

#[test]
fn sentencepiece_tokenizer_round_trips() {
    // tinycoder ships a LLaMA SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`).
    let gguf = GgufFile::open(common::tinycoder()).unwrap();
    let tok = meft::tokenizer::TextTokenizer::from_gguf(&gguf).unwrap();
    for text in [
        "What is 3 plus one?",
        "fn main() {\n    println!(\"héllo\");\n}",
        "日本",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size));
        let body: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| Some(i) != tok.bos_id)
            .collect();
        assert_eq!(tok.decode(&body).unwrap(), text);
    }
}
