//! Fine-tuning runs end to end on the tiny GGUF (CPU): resume equals an uninterrupted run,
//! a writer killed mid-checkpoint leaves a loadable checkpoint, bad inputs are clear errors.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::NdArray;
use meft::backend::BackendTask;
use meft::train::{TrainConfig, TrainTask};

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meft-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 60 arithmetic questions as JSONL.
fn qa_file(dir: &Path) -> PathBuf {
    let path = dir.join("qa.jsonl");
    let lines: Vec<String> = (0..60)
        .map(|i| {
            format!(
                r#"{{"prompt": "What is {i} plus one?", "answer": "{}"}}"#,
                i + 1
            )
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn config(dir: &Path, data: &Path, steps: usize, extra: &[&str]) -> TrainConfig {
    let text = format!(
        r#"
model = "{}"
output = "{}"
steps = {steps}
batch = 4
eval_every = 500
checkpoint_every = 250
display = "plain"
seed = 7
[data]
source = "jsonl"
path = "{}"
[adapter]
kind = "meft"
neurons = 512
top_k = 8
experts_per_token = 4
value_init_std = 0.02
[optimizer]
lr = 0.01
weight_decay = 0.01
warmup_steps = 20
min_lr_ratio = 0.1
"#,
        common::tinycoder().display(),
        dir.join("run").display(),
        data.display()
    );
    let set: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    TrainConfig::parse(&text, "test", &set).unwrap()
}

/// `c` with its `[adapter]` table replaced by `set` (other kinds do not know MEFT's fields).
fn with_adapter(c: &TrainConfig, set: &[&str]) -> TrainConfig {
    let mut doc: toml::Table = toml::from_str(&toml::to_string(c).unwrap()).unwrap();
    doc.remove("adapter");
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    TrainConfig::parse(&toml::to_string(&doc).unwrap(), "test", &set).unwrap()
}

/// Runs the `meft` binary; returns (success, stderr).
fn run_meft(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meft"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn train(
    config: TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> meft::Result<meft::train::TrainOutcome> {
    TrainTask {
        config,
        resume,
        stop_after,
        skip_eval: true,
    }
    .run::<NdArray<f32>>(NdArrayDevice::Cpu)
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    let dir = workdir("resume");
    let data = qa_file(&dir);
    let straight_dir = dir.join("straight");
    let split_dir = dir.join("split");
    let straight = train(config(&straight_dir, &data, 2000, &[]), false, None).unwrap();
    let first = train(config(&split_dir, &data, 2000, &[]), false, Some(1000)).unwrap();
    assert_eq!(first.steps, 1000);
    let resumed = train(config(&split_dir, &data, 2000, &[]), true, None).unwrap();
    assert_eq!(resumed.resumed_from, 1000);
    assert_eq!(straight.losses.len(), 2000);
    assert_eq!(resumed.losses.len(), 2000);
    for (i, (a, b)) in straight.losses.iter().zip(&resumed.losses).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "step {}: {a} vs {b}", i + 1);
    }
    // The loss moved down. (Only a little: the tiny model's frozen head gives near-uniform
    // logits whatever the hidden state; learning is shown on SmolLM2 in BENCHMARKS.md.)
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(mean(&straight.losses[1900..]) < mean(&straight.losses[..100]));
    let a = std::fs::read(straight_dir.join("run/adapter.safetensors")).unwrap();
    let b = std::fs::read(split_dir.join("run/adapter.safetensors")).unwrap();
    assert!(a == b, "final adapters differ");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fresh_run_refuses_to_overwrite_checkpoints_and_resume_checks_the_config() {
    let dir = workdir("refuse");
    let data = qa_file(&dir);
    train(config(&dir, &data, 4, &["checkpoint_every=2"]), false, None).unwrap();
    let e = train(config(&dir, &data, 4, &[]), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let e = train(config(&dir, &data, 8, &["adapter.neurons=256"]), true, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter.neurons") && e.contains("512") && e.contains("256"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = workdir("bad");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = train(config(&dir, &empty, 4, &[]), false, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty dataset") && e.contains("empty.jsonl"),
        "{e}"
    );

    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"answer\": \"b\"}\n{\"prompt\": \"a\"\n",
    )
    .unwrap();
    let e = train(config(&dir, &bad, 4, &[]), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.jsonl:2"), "{e}");

    let long = dir.join("long.jsonl");
    let answer = "word ".repeat(200);
    std::fs::write(
        &long,
        format!("{{\"prompt\": \"q\", \"answer\": \"{answer}\"}}\n").repeat(40),
    )
    .unwrap();
    let e = train(config(&dir, &long, 4, &["data.max_len=64"]), false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit the 64-token context"), "{e}");

    let e = TrainConfig::parse("model = \"m\"\nsteps = 1\noutput = \"o\"\nbatchsize = 3\n[data]\nsource = \"jsonl\"\npath = \"p\"\n[adapter]\nkind = \"meft\"\nneurons = 64\n", "cfg.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("batchsize") && e.contains("cfg.toml"), "{e}");
    let e = TrainConfig::parse("model = \"m\"\nsteps = 1\noutput = \"o\"\n[data]\nsource = \"csv\"\npath = \"p\"\n[adapter]\nkind = \"meft\"\nneurons = 64\n", "cfg.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.source") && e.contains("csv"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads every file of the checkpoint `latest` names, as a resume would: the state, the
/// trainable tensors, the MEFT stores (every tensor) and the optimizer record.
fn assert_latest_loads(ckpt_dir: &Path) -> usize {
    use meft::train::checkpoint;
    use meft::train::tensors_file::TensorsFile;
    let path = checkpoint::latest(ckpt_dir)
        .unwrap()
        .expect("latest names a checkpoint");
    let state: checkpoint::TrainState =
        serde_json::from_slice(&std::fs::read(path.join("state.json")).unwrap()).unwrap();
    let state = checkpoint::parse_state(
        &serde_json::to_vec(&state).unwrap(),
        "s",
        &state.fingerprint,
    )
    .unwrap();
    let t = TensorsFile::open(&path.join("trainable.safetensors")).unwrap();
    assert!(!checkpoint::read_trainable(&t).unwrap().is_empty());
    let m = TensorsFile::open(&path.join("meft.safetensors")).unwrap();
    for name in m.names().unwrap() {
        if name.ends_with("row_steps") {
            m.u32(&name).unwrap();
        } else {
            m.f32(&name).unwrap();
        }
    }
    checkpoint::decode_optimizer::<burn::backend::Autodiff<NdArray<f32>>>(
        std::fs::read(path.join("optimizer.bin")).unwrap(),
        "optimizer.bin",
        &NdArrayDevice::Cpu,
    )
    .unwrap();
    state.step
}

/// Crash safety: the `meft train` process is SIGKILLed at 50 points spread over its run (with
/// a checkpoint every step, most points fall inside a checkpoint write). After every kill the
/// checkpoint `latest` names loads completely and is never older than the one before; the
/// next trial resumes from it; at the end the run resumes and finishes.
#[test]
fn killing_the_writer_leaves_a_loadable_checkpoint() {
    use std::process::{Command, Stdio};
    let dir = workdir("kill");
    let data = qa_file(&dir);
    let cfg = dir.join("run.toml");
    let c = config(
        &dir,
        &data,
        100_000,
        &["checkpoint_every=1", "keep_checkpoints=2"],
    );
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let ckpt_dir = dir.join("run/checkpoints");
    let meft = env!("CARGO_BIN_EXE_meft");
    let (mut killed_after_a_checkpoint, mut last_step) = (0, 0);
    const TRIALS: u64 = 50;
    for trial in 0..TRIALS {
        let mut resume = Vec::new();
        if ckpt_dir.join("latest").exists() {
            resume.push("--resume");
        }
        let mut child = Command::new(meft)
            .args(["train", "--config", cfg.to_str().unwrap(), "--no-eval"])
            .args(&resume)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill points spread over 0.4–2.0 s (model load, first steps, steady state).
        let ms = 400 + (trial * 7919) % 1600;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "trial {trial}: the run ended before the kill"
        );
        if ckpt_dir.join("latest").exists() {
            killed_after_a_checkpoint += 1;
            let step = assert_latest_loads(&ckpt_dir);
            assert!(
                step >= last_step,
                "trial {trial}: went back from {last_step} to {step}"
            );
            last_step = step;
        }
    }
    eprintln!(
        "kill trials: {TRIALS} SIGKILLs, {killed_after_a_checkpoint} after a checkpoint existed, every latest checkpoint loaded; newest step {last_step}"
    );
    assert!(
        killed_after_a_checkpoint >= TRIALS as usize / 2,
        "only {killed_after_a_checkpoint} of {TRIALS} trials got as far as a checkpoint"
    );
    assert!(last_step > 0);
    // Whatever state the kills left, the run resumes from its latest checkpoint and finishes.
    let steps = last_step + 20;
    let out = train(
        config(&dir, &data, steps, &["checkpoint_every=50"]),
        true,
        None,
    )
    .unwrap();
    assert_eq!(out.resumed_from, last_step);
    assert_eq!(out.steps, steps);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint with a truncated or corrupt file is refused on resume with an error naming
/// the file; the run never panics.
#[test]
fn a_damaged_checkpoint_is_refused_naming_the_file() {
    let dir = workdir("damaged");
    let data = qa_file(&dir);
    train(config(&dir, &data, 6, &["checkpoint_every=3"]), false, None).unwrap();
    let latest = meft::train::checkpoint::latest(&dir.join("run/checkpoints"))
        .unwrap()
        .unwrap();
    for (file, damage) in [
        ("state.json", "truncate"),
        ("trainable.safetensors", "truncate"),
        ("meft.safetensors", "truncate"),
        ("optimizer.bin", "truncate"),
        ("optimizer.bin", "garble"),
        ("state.json", "garble"),
    ] {
        let path = latest.join(file);
        let good = std::fs::read(&path).unwrap();
        let bad = match damage {
            "truncate" => good[..good.len() / 2].to_vec(),
            _ => good.iter().map(|b| b ^ 0x5A).collect(),
        };
        std::fs::write(&path, &bad).unwrap();
        let e = train(config(&dir, &data, 9, &["checkpoint_every=3"]), true, None)
            .expect_err(&format!("{damage}d {file} was accepted"))
            .to_string();
        assert!(e.contains(file), "{damage}d {file}: {e}");
        std::fs::write(&path, &good).unwrap();
    }
    // Restored, the checkpoint resumes.
    let out = train(config(&dir, &data, 9, &["checkpoint_every=3"]), true, None).unwrap();
    assert_eq!(out.resumed_from, 6);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two runs with the same seed give bit-identical losses and adapter files, for every
/// adapter kind; another seed gives other losses.
#[test]
fn a_fixed_seed_makes_runs_bit_identical() {
    let dir = workdir("determinism");
    let data = qa_file(&dir);
    for (kind, extra) in [
        ("meft", vec![]),
        (
            "dense",
            vec!["adapter.kind=\"dense\"", "adapter.neurons=64"],
        ),
        ("lora", vec!["adapter.kind=\"lora\"", "adapter.rank=4"]),
    ] {
        let run = |name: &str, seed: &str| {
            let sub = dir.join(format!("{kind}-{name}"));
            let mut c = config(&sub, &data, 30, &[seed]);
            if !extra.is_empty() {
                c = with_adapter(&c, &extra);
            }
            let out = train(c, false, None).unwrap();
            let adapter = std::fs::read(sub.join("run/adapter.safetensors")).unwrap();
            (out.losses, adapter)
        };
        let (la, aa) = run("a", "seed=7");
        let (lb, ab) = run("b", "seed=7");
        let (lc, _) = run("c", "seed=8");
        assert_eq!(la.len(), 30);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&la),
            bits(&lb),
            "{kind}: losses differ between equal runs"
        );
        assert!(aa == ab, "{kind}: adapter files differ between equal runs");
        assert_ne!(bits(&la), bits(&lc), "{kind}: the seed changed nothing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_answer_only_loss_equals_the_masked_loss() {
    use burn::data::dataloader::batcher::Batcher;
    use meft::data::{QaBatcher, TokenizedExample};
    use meft::model::Llama;
    type B = burn::backend::Autodiff<NdArray<f32>>;
    let device = NdArrayDevice::Cpu;
    let model = Llama::<B>::init_random(&common::tiny_llama(2), &device);
    let examples = vec![
        TokenizedExample {
            id: "a".into(),
            ids: vec![1, 5, 9, 13, 2, 7],
            prompt_len: 3,
        },
        TokenizedExample {
            id: "b".into(),
            ids: vec![1, 4, 6, 8, 10, 12, 14, 16, 3, 11, 2],
            prompt_len: 8,
        },
        TokenizedExample {
            id: "c".into(),
            ids: vec![1, 20, 21],
            prompt_len: 2,
        },
    ];
    let batch: meft::data::QaBatch<B> = QaBatcher { pad_id: 0 }.batch(examples, &device);
    assert_eq!(batch.targets, 3 + 3 + 1);
    let (masked, correct_masked) = model.loss_and_correct(&batch.lm);
    let (selected, correct_selected) = model.selected_loss_and_correct(
        batch.lm.inputs.clone(),
        batch.positions.clone(),
        batch.answer_targets.clone(),
    );
    let v = |t: burn::tensor::Tensor<B, 1>| t.into_scalar();
    let (a, b) = (v(masked), v(selected));
    assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    assert_eq!(v(correct_masked), v(correct_selected));
}

#[test]
fn every_adapter_kind_trains_and_the_export_loads_for_generation() {
    let dir = workdir("kinds");
    let data = qa_file(&dir);
    for (kind, extra) in [
        ("meft", vec![]),
        (
            "dense",
            vec!["adapter.kind=\"dense\"", "adapter.neurons=64"],
        ),
        (
            "lora",
            vec![
                "adapter.kind=\"lora\"",
                "adapter.rank=4",
                "adapter.targets=[\"q\", \"v\", \"down\"]",
            ],
        ),
    ] {
        let sub = dir.join(kind);
        let mut c = config(
            &sub,
            &data,
            6,
            &[
                "checkpoint_every=3",
                "eval.examples=3",
                "eval.max_new_tokens=4",
            ],
        );
        if !extra.is_empty() {
            c = with_adapter(&c, &extra);
        }
        let out = TrainTask {
            config: c.clone(),
            resume: false,
            stop_after: None,
            skip_eval: false,
        }
        .run::<NdArray<f32>>(NdArrayDevice::Cpu)
        .unwrap();
        assert_eq!(out.losses.len(), 6, "{kind}");
        assert!(out.before.is_some() && out.after.is_some(), "{kind}");
        let adapter = sub.join("run/adapter.safetensors");
        let (ok, err) = run_meft(&[
            "generate",
            "--model",
            common::tinycoder().to_str().unwrap(),
            "--prompt",
            "What is 3 plus one?",
            "--max-tokens",
            "3",
            "--adapter",
            adapter.to_str().unwrap(),
        ]);
        assert!(ok && err.contains("added the adapter"), "{kind}: {err}");
        // `meft eval` on the same config and adapter scores the same eval examples.
        let cfg = sub.join("run.toml");
        std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
        let report = sub.join("eval.json");
        let (ok, err) = run_meft(&[
            "eval",
            "--config",
            cfg.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            report.to_str().unwrap(),
        ]);
        assert!(ok, "{kind}: {err}");
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(r["examples"], 3, "{kind}");
        let after: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sub.join("run/eval-after.json")).unwrap())
                .unwrap();
        assert_eq!(
            r["predictions"], after["predictions"],
            "{kind}: eval after training vs meft eval"
        );
    }
    // A file that is not an adapter export is refused with a message naming it.
    let bogus = dir.join("bogus.safetensors");
    std::fs::copy(
        dir.join("meft/run/checkpoints/step-00000006/trainable.safetensors"),
        &bogus,
    )
    .unwrap();
    let (ok, err) = run_meft(&[
        "generate",
        "--model",
        common::tinycoder().to_str().unwrap(),
        "--prompt",
        "x",
        "--adapter",
        bogus.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is not a meft adapter export"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_nonfinite_gradient_stops_the_run_or_skips_the_step() {
    let dir = workdir("nonfinite");
    let data = qa_file(&dir);
    // Stop (the default): the error names the step and the parameter; the checkpoint before
    // it is kept, and the run resumes from it (without the injected fault) to the end.
    let stop = dir.join("stop");
    let e = train(
        config(
            &stop,
            &data,
            6,
            &["checkpoint_every=2", "inject_nonfinite=[5]"],
        ),
        false,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("at step 5") && e.contains("router") && e.contains("NaN"),
        "{e}"
    );
    let resumed = train(config(&stop, &data, 6, &["checkpoint_every=2"]), true, None).unwrap();
    assert_eq!((resumed.resumed_from, resumed.steps), (4, 6));
    // Skip: steps 3 and 4 update nothing; the run goes on to the end.
    let skip = dir.join("skip");
    let out = train(
        config(
            &skip,
            &data,
            6,
            &["nonfinite=\"skip\"", "inject_nonfinite=[3, 4]"],
        ),
        false,
        None,
    )
    .unwrap();
    assert_eq!(out.skipped, vec![3, 4]);
    assert_eq!(out.steps, 6);
    assert_eq!(out.losses.len(), 4, "losses of the applied steps");
    assert!(out.losses.iter().all(|l| l.is_finite()));
    // Too many in a row is still an error.
    let e = train(
        config(
            &dir.join("many"),
            &data,
            14,
            &[
                "nonfinite=\"skip\"",
                "inject_nonfinite=[1,2,3,4,5,6,7,8,9,10,11,12]",
            ],
        ),
        false,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("11 steps in a row"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
