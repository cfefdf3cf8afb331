//! Library use in a few lines: load a GGUF model and its tokenizer, then continue a prompt
//! greedily on the CPU.
//!
//! ```sh
//! cargo run --release --example generate -- assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "The capital of France is"
//! ```

use burn::backend::NdArray;
use meft::generate::{generate, Sampling};
use meft::gguf::GgufFile;
use meft::model::Llama;
use meft::tokenizer::TextTokenizer;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args.next().unwrap_or("The capital of France is".into());

    let device = Default::default();
    let gguf = GgufFile::open(&path)?;
    let tokenizer = TextTokenizer::from_gguf(&gguf)?;
    let (model, config) = Llama::<NdArray<f32>>::from_gguf(&gguf, &device)?;
    println!("{} layers, d = {}", config.n_layers, config.d_model);

    let ids = tokenizer.encode(&prompt)?;
    let out = generate(
        &model,
        &ids,
        8,
        Sampling::Greedy,
        tokenizer.eos_id,
        &device,
        |_| {},
    )?;
    println!("{prompt}{}", tokenizer.decode(&out)?);
    Ok(())
}
