//! The `meft` command-line tool.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use clap::{Args, Parser, Subcommand};

use meft::adapter::MeftConfig;
use meft::backend::{run_on, BackendKind, BackendTask, FloatType};
use meft::bench::{
    AdapterBench, AdapterBenchResult, AdapterMethod, KernelBench, KernelBenchResult, LemoBench,
    LemoBenchMode, LemoBenchRow, ModelBench, ModelBenchResult, Preset, SlotPattern, TrainBench,
    TrainBenchResult, TrainBenchRow, TransferBench, TransferBenchResult,
};
use meft::generate::{generate, Sampling};
use meft::gguf::GgufFile;
use meft::model::{Llama, LlamaConfig};
use meft::tokenizer::TextTokenizer;
use meft::train::{TrainConfig, TrainTask};

/// Memory-efficient fine-tuning of LLMs on burn.
#[derive(Parser)]
#[command(name = "meft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt with a GGUF model.
    Generate(GenerateArgs),
    /// Print a GGUF model's config and tensor types.
    Info {
        /// Path to a GGUF file.
        #[arg(long)]
        model: PathBuf,
    },
    /// Measure speed (writes JSON, prints a Markdown table).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fine-tune a model with an adapter (MEFT, dense or LoRA) on QA data; evaluates EM/F1
    /// before and after, checkpoints atomically, exports the adapter.
    Train(TrainArgs),
    /// Evaluate a model (optionally with a trained adapter) on a config's eval split (EM/F1).
    Eval(EvalArgs),
}

/// The main job's default config (`configs/countryinfo-smollm2.toml`).
const DEFAULT_CONFIG: &str = include_str!("../configs/countryinfo-smollm2.toml");

#[derive(Args)]
struct ConfigArgs {
    /// Run config (TOML). Default: the embedded `configs/countryinfo-smollm2.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field: `--set optimizer.lr=3e-4 --set adapter.neurons=8192`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Override `model`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override `output`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Override `steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Override `batch`.
    #[arg(long)]
    batch: Option<usize>,
    /// Override `seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override `backend`.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Override `dtype`.
    #[arg(long, value_enum)]
    dtype: Option<FloatType>,
    /// Override `display` (auto, tui, plain).
    #[arg(long)]
    display: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<TrainConfig> {
        let mut set = Vec::new();
        let q = |v: &dyn std::fmt::Display| {
            format!(
                "\"{}\"",
                v.to_string().replace('\\', "\\\\").replace('"', "\\\"")
            )
        };
        if let Some(v) = &self.model {
            set.push(format!("model={}", q(&v.display())));
        }
        if let Some(v) = &self.output {
            set.push(format!("output={}", q(&v.display())));
        }
        if let Some(v) = self.steps {
            set.push(format!("steps={v}"));
        }
        if let Some(v) = self.batch {
            set.push(format!("batch={v}"));
        }
        if let Some(v) = self.seed {
            set.push(format!("seed={v}"));
        }
        if let Some(v) = self.backend {
            set.push(format!("backend={}", q(&format!("{v:?}").to_lowercase())));
        }
        if let Some(v) = self.dtype {
            set.push(format!("dtype={}", q(&format!("{v:?}").to_lowercase())));
        }
        if let Some(v) = &self.display {
            set.push(format!("display={}", q(v)));
        }
        set.extend(self.set.iter().cloned());
        Ok(match &self.config {
            Some(path) => TrainConfig::load(path, &set)?,
            None => TrainConfig::parse(DEFAULT_CONFIG, "<embedded default config>", &set)?,
        })
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Skip the EM/F1 evaluations.
    #[arg(long)]
    no_eval: bool,
    /// Stop (after writing a checkpoint) at this step, as if interrupted.
    #[arg(long)]
    stop_after: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// A trained adapter (`adapter.safetensors` from `meft train`); none: the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "eval.json")]
    out: PathBuf,
}

#[derive(Args, Clone, Copy)]
struct DeviceArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Float type of weights and activations.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: FloatType,
}

#[derive(Args)]
struct GenerateArgs {
    /// Path to a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a ChatML user turn (for instruct models).
    #[arg(long)]
    chat: bool,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus (top-p) mass when sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A trained adapter to add (`adapter.safetensors` from `meft train`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Draws the PNG plots of a `meft bench train` JSON file again (beside it, same stem).
    Plot {
        /// The JSON written by `meft bench train`.
        input: PathBuf,
    },
    /// Whole fine-tuning steps (forward, loss on every position, backward, optimizer) of a
    /// LLaMA-shaped model with each adapter kind side by side: step time, tokens/s, GPU memory
    /// split (weights / adapter / optimizer / activations / peak), MEFT host store, PCIe bytes
    /// and exposed transfer time (random weights). Optional search for the largest adapter
    /// that fits a GPU memory budget. JSON, a Markdown table, and PNG plots of the sweeps.
    Train {
        /// Model geometry (ignored with --model).
        #[arg(long, value_enum, default_value = "smollm2-135m")]
        preset: Preset,
        /// Take the geometry from this GGUF's metadata instead (weights stay random).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Number of layers (default: the preset's or the GGUF's).
        #[arg(long)]
        layers: Option<usize>,
        /// Sequences per batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence; several give a sequence-length sweep.
        #[arg(long, value_delimiter = ',', default_value = "512")]
        seqs: Vec<usize>,
        /// Adapters, in order: none, lora:R, dense:N, meft:N or meft:N:K (K 64 by default);
        /// several N or K of one kind give a sweep.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,lora:8,dense:4096,meft:4096"
        )]
        kinds: Vec<meft::bench::AdapterKind>,
        /// Experts probed per token (MEFT).
        #[arg(long, default_value_t = 8)]
        experts_per_token: usize,
        /// Also find the largest dense and MEFT adapter (per kind listed) whose step fits this
        /// much GPU memory (GiB; CUDA only), at the first sequence length.
        #[arg(long)]
        budget_gib: Option<f64>,
        /// Untimed steps (at least 1; the last reads memory).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to write the JSON results (plots go beside it, same stem).
        #[arg(long, default_value = "bench-train.json")]
        out: PathBuf,
        /// Do not write PNG plots.
        #[arg(long)]
        no_plots: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Forward and forward+backward tokens/s of the base model (random weights).
    Model {
        /// Model geometry.
        #[arg(long, value_enum, default_value = "smollm2-135m")]
        preset: Preset,
        /// Number of layers (default: the preset's; LLaMA-7B has 32).
        #[arg(long)]
        layers: Option<usize>,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// Untimed iterations.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed iterations.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-model.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Long-context training steps with and without LeMo token elimination (and with
    /// activation checkpointing): step time, activation and peak memory per context length
    /// (random weights, LoRA on q/v).
    Lemo {
        /// Model geometry.
        #[arg(long, value_enum, default_value = "smollm2-135m")]
        preset: Preset,
        /// Number of layers (default: the preset's).
        #[arg(long)]
        layers: Option<usize>,
        /// Sequences per batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Context lengths.
        #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
        seqs: Vec<usize>,
        /// Modes per context length, in order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "full,checkpoint,lemo,lemo-layer,lemo-kept"
        )]
        modes: Vec<LemoBenchMode>,
        /// LeMo: share of each segment kept.
        #[arg(long, default_value_t = 0.5)]
        keep_ratio: f64,
        /// LeMo: tokens per segment.
        #[arg(long, default_value_t = 256)]
        segment: usize,
        /// LeMo: the layers that eliminate tokens (default: all but the first two).
        #[arg(long, value_delimiter = ',')]
        lemo_layers: Option<Vec<usize>>,
        /// LoRA rank (q and v).
        #[arg(long, default_value_t = 8)]
        lora_rank: usize,
        /// Untimed steps.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-lemo.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// LeMo's device operations (selection, gather/merge, chunked attention, with backward)
    /// against the host oracle and the f64 reference; exits non-zero on a mismatch.
    LemoCheck {
        /// Where to write the JSON results.
        #[arg(long, default_value = "lemo-check.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Adapter rows host → device and gradients back: the adapter's transfer path (pinned
    /// staging on un-fused CUDA f32) vs burn's from_data/into_data vs a raw pinned copy; every
    /// transfer is checked byte for byte.
    Transfer {
        /// Model width d (a row is 2·d floats).
        #[arg(long, default_value_t = 4096)]
        d_model: usize,
        /// Store size N.
        #[arg(long, default_value_t = 65536)]
        neurons: usize,
        /// Row counts to ship.
        #[arg(long, value_delimiter = ',', default_value = "2048,16384,41216")]
        rows: Vec<usize>,
        /// Timed repeats per size.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-transfer.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// cube_kernels (row gather, fused sparse forward and backward) vs the generic-op path at
    /// one geometry, with the device's bandwidth and compute ceilings measured in the same run
    /// (random positive inputs: every slot active).
    Kernels {
        /// Model width d.
        #[arg(long, default_value_t = 4096)]
        d_model: usize,
        /// Tokens M.
        #[arg(long, default_value_t = 8192)]
        tokens: usize,
        /// Active rows on the device R.
        #[arg(long, default_value_t = 65536)]
        neurons: usize,
        /// Slots per token K to measure.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
        top_k: Vec<usize>,
        /// Untimed repeats per op.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed repeats per op (median).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Skip the generic path (it needs ~10 M × R buffers of memory).
        #[arg(long)]
        skip_generic: bool,
        /// Slot patterns to measure, side by side: `random` (uniform over the R rows) and/or
        /// `routed` (rows among the neurons of each token's probed experts, as MEFT's router
        /// picks them).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "random")]
        slots: Vec<SlotPattern>,
        /// Experts E of the routed pattern (0: the divisor of R nearest 4·√R, the paper's).
        #[arg(long, default_value_t = 0)]
        experts: usize,
        /// Experts each token probes in the routed pattern.
        #[arg(long, default_value_t = 8)]
        probes: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-kernels.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// A stack of FFN layers with adapters: a full training step, MEFT (host store; overlapped
    /// or serial) and/or the dense on-device adapter of the same N, side by side (random weights).
    Adapter {
        /// Which adapters to measure, in order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "meft,meft-serial,dense"
        )]
        methods: Vec<AdapterMethod>,
        /// Stacked layers (each with its own FFN and adapter).
        #[arg(long, default_value_t = 1)]
        layers: usize,
        /// Also write the MEFT runs' timelines (timed steps) to this JSON file, for
        /// `scripts/plot_timeline.py`.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// Model width d (LLaMA-7B: 4096).
        #[arg(long, default_value_t = 4096)]
        d_model: usize,
        /// Base FFN hidden size (LLaMA-7B: 11008).
        #[arg(long, default_value_t = 11008)]
        ffn_hidden: usize,
        /// Adapter neurons N.
        #[arg(long, default_value_t = 65536)]
        neurons: usize,
        /// Active neurons per token K.
        #[arg(long, default_value_t = 64)]
        top_k: usize,
        /// Experts E (default 4·sqrt(N)).
        #[arg(long)]
        experts: Option<usize>,
        /// Experts probed per token.
        #[arg(long, default_value_t = 8)]
        experts_per_token: usize,
        /// Cap on distinct active neurons per step.
        #[arg(long)]
        max_active: Option<usize>,
        /// Sequences per batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Untimed steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-adapter.json")]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

struct GenerateTask {
    shown_prompt: String,
    gguf: GgufFile,
    tokenizer: TextTokenizer,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    adapter: Option<PathBuf>,
}

impl BackendTask for GenerateTask {
    type Output = Vec<u32>;

    fn run<B: Backend>(self, device: B::Device) -> meft::Result<Vec<u32>> {
        let t = Instant::now();
        let (model, _) = Llama::<B>::from_gguf(&self.gguf, &device)?;
        drop(self.gguf);
        let model = match &self.adapter {
            Some(path) => {
                let (model, _) = meft::train::load_adapter(model, path)?;
                eprintln!("added the adapter {}", path.display());
                model
            }
            None => model,
        };
        eprintln!("loaded model in {:.2}s", t.elapsed().as_secs_f64());
        print!("{}", self.shown_prompt);
        let mut shown = String::new();
        let mut ids = Vec::new();
        let t = Instant::now();
        let out = generate(
            &model,
            &self.prompt_ids,
            self.max_tokens,
            self.sampling,
            self.tokenizer.eos_id,
            &device,
            |id| {
                if Some(id) == self.tokenizer.eos_id {
                    return;
                }
                ids.push(id);
                if let Ok(text) = self.tokenizer.decode(&ids) {
                    if let Some(new) = text.strip_prefix(shown.as_str()) {
                        print!("{new}");
                        let _ = std::io::stdout().flush();
                    }
                    shown = text;
                }
            },
        )?;
        println!();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "generated {} tokens in {:.2}s ({:.1} tok/s); ids: {:?}",
            out.len(),
            secs,
            out.len() as f64 / secs,
            out
        );
        Ok(out)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => {
            let gguf = GgufFile::open(&a.model)?;
            let tokenizer = TextTokenizer::from_gguf(&gguf)
                .with_context(|| format!("building the tokenizer of {}", a.model.display()))?;
            let text = if a.chat {
                tokenizer.chatml_prompt(&a.prompt)
            } else {
                a.prompt.clone()
            };
            let prompt_ids = tokenizer.encode(&text)?;
            let sampling = if a.temperature > 0.0 {
                Sampling::TopP {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                }
            } else {
                Sampling::Greedy
            };
            let task = GenerateTask {
                shown_prompt: a.prompt.clone(),
                gguf,
                tokenizer,
                prompt_ids,
                max_tokens: a.max_tokens,
                sampling,
                adapter: a.adapter.clone(),
            };
            run_on(a.device.backend, a.device.dtype, task)?;
        }
        Command::Train(a) => {
            let config = a.config.load()?;
            let task = TrainTask {
                resume: a.resume,
                stop_after: a.stop_after,
                skip_eval: a.no_eval,
                config: config.clone(),
            };
            let out = run_on(config.backend, config.dtype, task)?;
            let show = |r: &Option<meft::eval::EvalReport>| {
                r.as_ref().map_or("-".to_string(), |r| r.summary())
            };
            println!(
                "trained {} steps (from step {}): loss {:.3} → {:.3}, {:.0} tokens/s",
                out.steps,
                out.resumed_from,
                out.losses.first().copied().unwrap_or(f64::NAN),
                out.losses.last().copied().unwrap_or(f64::NAN),
                out.tokens_per_sec
            );
            println!("eval before: {}", show(&out.before));
            println!("eval after:  {}", show(&out.after));
            println!("outputs in {}", config.output.display());
        }
        Command::Eval(a) => {
            let config = a.config.load()?;
            let task = meft::train::run::EvalTask {
                config: config.clone(),
                adapter: a.adapter.clone(),
            };
            let report = run_on(config.backend, config.dtype, task)?;
            write_json(&a.out, &report)?;
            println!("{}", report.summary());
        }
        Command::Info { model } => {
            let gguf = GgufFile::open(&model)?;
            let cfg = LlamaConfig::from_gguf(&gguf)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            let mut types = std::collections::BTreeMap::<String, usize>::new();
            for t in gguf.tensors.values() {
                *types.entry(format!("{:?}", t.ggml_type)).or_default() += 1;
            }
            println!(
                "GGUF v{}, {} tensors: {types:?}",
                gguf.version,
                gguf.tensors.len()
            );
        }
        Command::Bench(BenchCommand::Model {
            preset,
            layers,
            batch,
            seq,
            warmup,
            iters,
            out,
            device,
        }) => {
            let config = preset_config(preset, layers);
            let label = format!("burn {:?} {:?}", device.backend, device.dtype).to_lowercase();
            let bench = ModelBench {
                config,
                preset,
                batch,
                seq,
                warmup,
                iters,
                label,
            };
            let result = run_on(device.backend, device.dtype, bench)?;
            write_json(&out, &result)?;
            print!("{}", ModelBenchResult::table(&[result]));
        }
        Command::Bench(BenchCommand::Plot { input }) => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let result: TrainBenchResult = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a `meft bench train` result", input.display())
            })?;
            for p in result.write_plots(&input)? {
                println!("{}", p.display());
            }
        }
        Command::Bench(BenchCommand::Train {
            preset,
            model,
            layers,
            batch,
            seqs,
            kinds,
            experts_per_token,
            budget_gib,
            warmup,
            iters,
            out,
            no_plots,
            device,
        }) => {
            let (mut config, name) = match &model {
                Some(path) => {
                    let gguf = GgufFile::open(path)?;
                    let c = LlamaConfig::from_gguf(&gguf)
                        .with_context(|| format!("reading the geometry of {}", path.display()))?;
                    (c, path.display().to_string())
                }
                None => (
                    preset_config(preset, None),
                    format!("{preset:?}").to_lowercase(),
                ),
            };
            if let Some(n) = layers {
                config.n_layers = n;
            }
            if budget_gib.is_some() && device.backend != BackendKind::Cuda {
                anyhow::bail!("--budget-gib reads GPU memory: it needs --backend cuda");
            }
            let label = format!("burn {:?} {:?}", device.backend, device.dtype).to_lowercase();
            let bench = TrainBench {
                config,
                model: name,
                batch,
                seqs,
                kinds,
                experts_per_token,
                warmup,
                iters,
                label,
                budget_gib,
                cuda: device.backend == BackendKind::Cuda,
            };
            let result: TrainBenchResult = run_on(device.backend, device.dtype, bench)?;
            write_json(&out, &result)?;
            print!("{}", TrainBenchRow::table(&result.rows));
            if result.rows.iter().any(|r| r.meft_stages.is_some()) {
                println!();
                print!("{}", TrainBenchRow::stage_table(&result.rows));
            }
            if !result.budget.is_empty() {
                println!();
                print!("{}", meft::bench::BudgetResult::table(&result.budget));
            }
            if !no_plots {
                for p in result.write_plots(&out)? {
                    eprintln!("plot: {}", p.display());
                }
            }
        }
        Command::Bench(BenchCommand::Lemo {
            preset,
            layers,
            batch,
            seqs,
            modes,
            keep_ratio,
            segment,
            lemo_layers,
            lora_rank,
            warmup,
            iters,
            out,
            device,
        }) => {
            let config = preset_config(preset, layers);
            let label = format!("burn {:?} {:?}", device.backend, device.dtype).to_lowercase();
            let lemo = meft::lemo::LemoConfig {
                keep_ratio,
                segment,
                layers: lemo_layers.map(meft::adapter::Layers::Only),
                ..Default::default()
            };
            let bench = LemoBench {
                config,
                preset,
                batch,
                seqs,
                modes,
                lemo,
                lora_rank,
                warmup,
                iters,
                label,
            };
            let rows = run_on(device.backend, device.dtype, bench)?;
            write_json(&out, &rows)?;
            print!("{}", LemoBenchRow::table(&rows));
        }
        Command::Bench(BenchCommand::LemoCheck { out, device }) => {
            let rows = run_on(device.backend, device.dtype, meft::bench::LemoCheck)?;
            write_json(&out, &rows)?;
            print!("{}", meft::bench::CheckRow::table(&rows));
            if let Some(bad) = rows.iter().find(|r| !r.pass) {
                anyhow::bail!("{} ({}) is off by {:.2e}", bad.check, bad.case, bad.max_err);
            }
        }
        Command::Bench(BenchCommand::Transfer {
            d_model,
            neurons,
            rows,
            iters,
            out,
            device,
        }) => {
            let label = format!("burn {:?} {:?}", device.backend, device.dtype).to_lowercase();
            let bench = TransferBench {
                d_model,
                neurons,
                rows,
                iters,
                label,
            };
            let results = run_on(device.backend, device.dtype, bench)?;
            write_json(&out, &results)?;
            print!("{}", TransferBenchResult::table(&results));
        }
        Command::Bench(BenchCommand::Kernels {
            d_model,
            tokens,
            neurons,
            top_k,
            warmup,
            iters,
            skip_generic,
            slots,
            experts,
            probes,
            out,
            device,
        }) => {
            let label = format!("{:?} {:?}", device.backend, device.dtype).to_lowercase();
            let bench = KernelBench {
                patterns: slots,
                experts,
                probes,
                d_model,
                tokens,
                neurons,
                top_k,
                warmup,
                iters,
                skip_generic,
                label,
            };
            let results = run_on(device.backend, device.dtype, bench)?;
            write_json(&out, &results)?;
            print!("{}", KernelBenchResult::table(&results));
        }
        Command::Bench(BenchCommand::Adapter {
            methods,
            layers,
            timeline,
            d_model,
            ffn_hidden,
            neurons,
            top_k,
            experts,
            experts_per_token,
            max_active,
            batch,
            seq,
            warmup,
            iters,
            out,
            device,
        }) => {
            let meft = MeftConfig {
                experts,
                experts_per_token,
                top_k,
                max_active_per_batch: max_active,
                ..MeftConfig::new(neurons)
            };
            let mut results = Vec::new();
            for method in methods {
                let label = format!("burn {:?} {:?}", device.backend, device.dtype).to_lowercase();
                let bench = AdapterBench {
                    method,
                    d_model,
                    ffn_hidden,
                    layers,
                    keep_timeline: timeline.is_some(),
                    meft: meft.clone(),
                    batch,
                    seq,
                    warmup,
                    iters,
                    cuda: device.backend == BackendKind::Cuda,
                    label,
                };
                results.push(run_on(device.backend, device.dtype, bench)?);
                // Write after each method, so a later failure keeps what was measured.
                if let Some(path) = &timeline {
                    let runs: Vec<_> = results
                        .iter()
                        .filter(|r| !r.timeline.is_empty())
                        .map(|r| {
                            serde_json::json!({"method": r.method, "layers": r.layers,
                            "batch": r.batch, "seq": r.seq, "step_ms": r.step_ms,
                            "exposed_transfer_ms": r.exposed_transfer_ms,
                            "transfer_ms": r.transfer_ms, "step_starts": r.step_starts,
                            "spans": r.timeline})
                        })
                        .collect();
                    write_json(path, &runs)?;
                }
                let light: Vec<_> = results
                    .iter()
                    .cloned()
                    .map(|mut r| {
                        r.timeline.clear();
                        r.step_starts.clear();
                        r
                    })
                    .collect();
                write_json(&out, &light)?;
            }
            print!("{}", AdapterBenchResult::table(&results));
        }
    }
    Ok(())
}

/// A preset's geometry, with its layer count replaced when `layers` is given.
fn preset_config(preset: Preset, layers: Option<usize>) -> LlamaConfig {
    let mut config = match preset {
        Preset::Smollm2_135m => LlamaConfig::smollm2_135m(),
        Preset::Llama7b => LlamaConfig::llama_7b(32),
    };
    if let Some(n) = layers {
        config.n_layers = n;
    }
    config
}

/// Writes benchmark results as pretty JSON.
fn write_json(out: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", out.display()))
}
