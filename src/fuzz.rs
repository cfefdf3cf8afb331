//! Entry points of the coverage-guided fuzz targets (`fuzz/`, run with `cargo fuzz`) and of
//! their regression tests (`tests/fuzz_regressions.rs`, every minimised crasher and seed).
//!
//! Each entry takes arbitrary bytes and must return — an error is the expected outcome for
//! most inputs — without panicking, hanging or allocating more than the input can justify.
//! They exercise the loaders a user's files reach: the GGUF parser and dequantiser, the
//! tokenizer built from GGUF metadata, the run config (TOML plus `--set` overrides), the JSONL
//! data loader and the checkpoint loader (state, trainable tensors, optimizer record).

use burn::backend::{ndarray::NdArrayDevice, Autodiff, NdArray};

use crate::gguf::GgufFile;
use crate::model::LlamaConfig;
use crate::tokenizer::TextTokenizer;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::tensors_file::TensorsFile;

/// Largest tensor (elements) the GGUF entry dequantises; bigger ones are still parsed and
/// bounds-checked, only not expanded (a small input cannot hold more than this anyway).
const MAX_DEQUANT: u64 = 1 << 22;
/// Most tokens the tokenizer entry builds a vocabulary from.
const MAX_TOKENS: usize = 512;

/// A fuzz entry point: arbitrary bytes in, nothing out (it must simply return).
pub type Entry = fn(&[u8]);

/// The fuzz targets by name (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [(&str, Entry); 5] = [
    ("gguf", gguf),
    ("tokenizer", tokenizer),
    ("config", config),
    ("jsonl", jsonl),
    ("checkpoint", checkpoint),
];

/// GGUF bytes: header, metadata and tensor table; the model config read from them; every
/// tensor of at most [`MAX_DEQUANT`] elements dequantised to f32; the tokenizer.
pub fn gguf(data: &[u8]) {
    let Ok(g) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = LlamaConfig::from_gguf(&g);
    let _ = TextTokenizer::from_gguf(&g);
    for (name, info) in &g.tensors {
        if info.num_elements() <= MAX_DEQUANT {
            let _ = g.tensor_f32(name, &info.shape());
        }
    }
}

/// A tokenizer built from GGUF `tokenizer.ggml.*` metadata that the input describes, then
/// text encoded and ids (in and out of range) decoded.
///
/// Layout: byte 0 picks the tokenizer model (`gpt2`, `llama` or an unsupported name); the
/// rest is split at 0xFF into: tokens (0x00-separated), merges (0x00-separated), token types
/// (one byte each), text to encode, and two bytes of BOS/EOS ids.
pub fn tokenizer(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|&b| b == 0xFF);
    let mut strings = |max: usize| -> Vec<String> {
        parts
            .next()
            .map(|p| {
                p.split(|&b| b == 0)
                    .take(max)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let tokens = strings(MAX_TOKENS);
    let merges = strings(4 * MAX_TOKENS);
    let types: Vec<i64> = parts
        .next()
        .unwrap_or_default()
        .iter()
        .take(MAX_TOKENS)
        .map(|&b| (b % 7) as i64)
        .collect();
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let ids = parts.next().unwrap_or_default();
    let model = match head % 4 {
        0 | 1 => "gpt2",
        2 => "llama",
        _ => "bert",
    };
    let mut w = GgufWriter::default();
    w.string("tokenizer.ggml.model", model);
    w.strings("tokenizer.ggml.tokens", &tokens);
    if head & 0x10 == 0 {
        w.strings("tokenizer.ggml.merges", &merges);
    }
    if head & 0x20 == 0 {
        w.ints("tokenizer.ggml.token_type", &types);
    }
    if let [bos, eos, ..] = ids {
        w.u32("tokenizer.ggml.bos_token_id", *bos as u32);
        w.u32("tokenizer.ggml.eos_token_id", *eos as u32);
    }
    w.bool("tokenizer.ggml.add_bos_token", head & 0x40 != 0);
    let Ok(g) = GgufFile::from_bytes(w.finish()) else {
        return;
    };
    let Ok(tok) = TextTokenizer::from_gguf(&g) else {
        return;
    };
    if let Ok(ids) = tok.encode(&text) {
        let _ = tok.decode(&ids);
    }
    let _ = tok.decode(&[tok.vocab_size as u32, u32::MAX]);
    let _ = tok.chatml_prompt(&text);
}

/// A run config: the TOML text before the first NUL byte, then one `--set` override per line.
pub fn config(data: &[u8]) {
    let (text, overrides) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let overrides: Vec<String> = String::from_utf8_lossy(overrides)
        .lines()
        .take(16)
        .map(String::from)
        .collect();
    if let Ok(c) = TrainConfig::parse(&text, "fuzz.toml", &overrides) {
        let _ = c.validate();
        let _ = toml::to_string(&c);
    }
}

/// A JSONL data file.
pub fn jsonl(data: &[u8]) {
    let _ = crate::data::jsonl::parse(data, "fuzz.jsonl");
}

/// A checkpoint's three files: `state.json`, `trainable.safetensors` and `optimizer.bin`,
/// each prefixed by its length as a little-endian u32 (a short input leaves later parts
/// empty).
pub fn checkpoint(data: &[u8]) {
    let mut rest = data;
    let mut part = || -> Vec<u8> {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return std::mem::take(&mut rest).to_vec();
        };
        let n = (u32::from_le_bytes(*len) as usize).min(tail.len());
        let (p, r) = tail.split_at(n);
        rest = r;
        p.to_vec()
    };
    let (state, trainable, optimizer) = (part(), part(), part());
    let fingerprint = serde_json::json!({
        "model": {"d_model": 16, "n_layers": 2},
        "adapter": {"meft": {"neurons": 64}},
        "layers": "all",
    });
    let _ = checkpoint::parse_state(&state, "state.json", &fingerprint);
    if let Ok(f) = TensorsFile::from_bytes("trainable.safetensors", trainable) {
        let _ = f.metadata();
        let _ = checkpoint::read_trainable(&f);
        if let Ok(names) = f.names() {
            for n in names {
                let _ = f.u32(&n);
            }
        }
    }
    let _ = checkpoint::decode_optimizer::<Autodiff<NdArray<f32>>>(
        optimizer,
        "optimizer.bin",
        &NdArrayDevice::Cpu,
    );
}

/// Writes GGUF v3 metadata-only files (the tokenizer entry's input).
#[derive(Default)]
struct GgufWriter {
    kv: Vec<u8>,
    count: u64,
}

impl GgufWriter {
    fn key(&mut self, key: &str, type_id: u32) {
        self.count += 1;
        self.kv.extend((key.len() as u64).to_le_bytes());
        self.kv.extend(key.as_bytes());
        self.kv.extend(type_id.to_le_bytes());
    }
    fn raw_string(&mut self, s: &str) {
        self.kv.extend((s.len() as u64).to_le_bytes());
        self.kv.extend(s.as_bytes());
    }
    fn string(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        self.raw_string(v);
    }
    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn bool(&mut self, key: &str, v: bool) {
        self.key(key, 7);
        self.kv.push(v as u8);
    }
    fn strings(&mut self, key: &str, v: &[String]) {
        self.key(key, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            self.raw_string(s);
        }
    }
    fn ints(&mut self, key: &str, v: &[i64]) {
        self.key(key, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for &x in v {
            self.kv.extend((x as i32).to_le_bytes());
        }
    }
    fn finish(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(self.count.to_le_bytes());
        out.extend(self.kv);
        out
    }
}
