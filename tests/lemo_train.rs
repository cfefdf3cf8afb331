//! `meft train` with LeMo on a text source, end to end on the tiny GGUF (CPU): calibration
//! steps then elimination steps, held-out perplexity before and after at two context
//! lengths, and resume equal to an uninterrupted run (the calibration/elimination schedule
//! continues where it stopped).

mod common;

use std::path::{Path, PathBuf};

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::NdArray;
use meft::backend::BackendTask;
use meft::train::{TrainConfig, TrainTask};

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meft-lemo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A few thousand words of patterned text.
fn text_file(dir: &Path) -> PathBuf {
    let path = dir.join("doc.txt");
    let names = [
        "Adam",
        "Seth",
        "Enos",
        "Cainan",
        "Mahalaleel",
        "Jared",
        "Enoch",
    ];
    let mut s = String::new();
    for i in 0..400 {
        let a = names[i % names.len()];
        let b = names[(i * 3 + 1) % names.len()];
        s += &format!("{i} And {a} lived {} years, and begat {b}.\n", 30 + i % 70);
    }
    std::fs::write(&path, s).unwrap();
    path
}

fn config(dir: &Path, data: &Path, steps: usize) -> TrainConfig {
    let text = format!(
        r#"
model = "{}"
output = "{}"
steps = {steps}
batch = 2
eval_every = 500
checkpoint_every = 4
display = "plain"
seed = 3
[data]
source = "text"
path = "{}"
eval_fraction = 0.2
max_len = 48
[adapter]
kind = "lora"
rank = 4
[optimizer]
lr = 0.01
warmup_steps = 2
[eval]
contexts = [16, 32]
tokens = 96
[lemo]
keep_ratio = 0.5
segment = 16
sink = 1
recent = 4
predictor_hidden = 8
warmup_steps = 3
pattern = "predicted"
"#,
        common::tinycoder().display(),
        dir.join("run").display(),
        data.display()
    );
    TrainConfig::parse(&text, "test", &[]).unwrap()
}

fn train(
    cfg: TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> meft::train::run::TrainOutcome {
    TrainTask {
        config: cfg,
        resume,
        stop_after,
        skip_eval: false,
    }
    .run::<NdArray>(NdArrayDevice::Cpu)
    .unwrap()
}

#[test]
fn lemo_text_run_trains_evaluates_and_resumes_exactly() {
    let dir = workdir("straight");
    let data = text_file(&dir);
    let straight = train(config(&dir, &data, 8), false, None);
    assert_eq!(straight.steps, 8);
    assert!(
        straight.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        straight.losses
    );
    for report in [&straight.perplexity_before, &straight.perplexity_after] {
        let r = report.as_ref().expect("perplexity before and after");
        assert_eq!(
            r.contexts.iter().map(|c| c.context).collect::<Vec<_>>(),
            vec![16, 32]
        );
        assert!(r
            .contexts
            .iter()
            .all(|c| c.perplexity.is_finite() && c.perplexity > 1.0));
        assert!(r.contexts.iter().all(|c| c.targets >= 90), "{r:?}");
    }
    assert!(dir.join("run/perplexity-after.json").exists());

    let dir2 = workdir("resumed");
    let first = train(config(&dir2, &data, 8), false, Some(4));
    assert_eq!(first.steps, 4);
    let rest = train(config(&dir2, &data, 8), true, None);
    assert_eq!(rest.resumed_from, 4);
    // Equal up to float rounding (ndarray's multi-threaded reductions in the LoRA backward
    // are not bit-reproducible run to run, with or without LeMo): far below what a wrong
    // calibration/elimination schedule after the resume would change.
    assert_eq!(rest.losses.len(), straight.losses.len());
    for (i, (a, b)) in rest.losses.iter().zip(&straight.losses).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {i}: {a} vs {b}");
    }
    // Parameters likewise.
    let read = |d: &Path| {
        let bytes = std::fs::read(d.join("run/adapter.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, bytemuck::pod_collect_to_vec(v.data())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let (a, b) = (read(&dir), read(&dir2));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{ka}: {x} vs {y}");
        }
    }
}

#[test]
fn lemo_config_errors_name_the_field() {
    let dir = workdir("bad");
    let data = text_file(&dir);
    let mut cfg = config(&dir, &data, 2);
    cfg.lemo.as_mut().unwrap().keep_ratio = 0.0;
    let err = TrainTask {
        config: cfg,
        resume: false,
        stop_after: None,
        skip_eval: true,
    }
    .run::<NdArray>(NdArrayDevice::Cpu)
    .unwrap_err()
    .to_string();
    assert!(err.contains("lemo.keep_ratio"), "{err}");

    // Backward elimination computes eliminated tokens exactly: it needs every key.
    let mut cfg = config(&dir, &data, 2);
    let lemo = cfg.lemo.as_mut().unwrap();
    lemo.keys = meft::lemo::KeyScope::Kept;
    lemo.eliminate = meft::lemo::Elimination::Backward;
    let err = meft::lemo::LemoPlan::new(lemo, 4).unwrap_err().to_string();
    assert!(err.contains("lemo.eliminate"), "{err}");
    lemo.eliminate = meft::lemo::Elimination::Layer;
    assert!(meft::lemo::LemoPlan::new(lemo, 4).is_ok());
    // Rescaling the gradient needs a forward that stays exact.
    lemo.keys = meft::lemo::KeyScope::All;
    lemo.rescale_gradient = true;
    let err = meft::lemo::LemoPlan::new(lemo, 4).unwrap_err().to_string();
    assert!(err.contains("lemo.rescale_gradient"), "{err}");
    lemo.eliminate = meft::lemo::Elimination::Backward;
    assert!(meft::lemo::LemoPlan::new(lemo, 4).is_ok());
    // Difficulty patterns route the gradient of an exact forward.
    lemo.rescale_gradient = false;
    lemo.pattern = meft::lemo::PatternSource::Difficulty;
    assert!(meft::lemo::LemoPlan::new(lemo, 4).is_ok());
    lemo.eliminate = meft::lemo::Elimination::Layer;
    let err = meft::lemo::LemoPlan::new(lemo, 4).unwrap_err().to_string();
    assert!(err.contains("lemo.pattern"), "{err}");
}

/// `difficulty` and `random-shared` runs train and report the share of each step's miss
/// (`Σ 1 − p(target)`) their patterns kept. The test model predicts almost uniformly (loss ≈
/// ln 32 000), so every token's miss is ≈ 1 and any pattern keeping 24 of the 48 positions
/// keeps half of it; which tokens a difficulty table picks is checked in `tests/lemo.rs` and
/// the unit tests of `lemo::difficulty` and `train::model`.
#[test]
fn difficulty_patterns_train_and_report_the_kept_miss() {
    let run = |name: &str, pattern| {
        let dir = workdir(name);
        let data = text_file(&dir);
        let mut cfg = config(&dir, &data, 8);
        cfg.lemo.as_mut().unwrap().pattern = pattern;
        TrainTask {
            config: cfg,
            resume: false,
            stop_after: None,
            skip_eval: true,
        }
        .run::<NdArray>(NdArrayDevice::Cpu)
        .unwrap()
    };
    for pattern in [
        meft::lemo::PatternSource::Difficulty,
        meft::lemo::PatternSource::RandomShared,
    ] {
        let out = run(&format!("{pattern:?}"), pattern);
        assert_eq!(out.steps, 8);
        assert!(out.losses.iter().all(|l| l.is_finite()), "{:?}", out.losses);
        let share = out.kept_miss_share.expect("measured after warm-up");
        assert!((share - 0.5).abs() < 0.02, "{pattern:?}: {share}");
    }
    // The predictors' source measures no miss share.
    let dir = workdir("predicted-share");
    let data = text_file(&dir);
    let out = train(config(&dir, &data, 4), false, None);
    assert_eq!(out.kept_miss_share, None);
}

/// The difficulty table is part of the checkpoint: a run stopped and resumed chooses the
/// same patterns (losses equal the straight run's).
#[test]
fn difficulty_lemo_resumes_exactly() {
    let cfg = |dir: &Path, data: &Path| {
        let mut cfg = config(dir, data, 8);
        cfg.lemo.as_mut().unwrap().pattern = meft::lemo::PatternSource::Difficulty;
        cfg
    };
    let dir = workdir("difficulty-straight");
    let data = text_file(&dir);
    let straight = train(cfg(&dir, &data), false, None);
    let dir2 = workdir("difficulty-resumed");
    train(cfg(&dir2, &data), false, Some(4));
    let saved = std::fs::read_dir(dir2.join("run/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.path().join("lemo-difficulty.json").exists());
    assert!(saved, "no checkpoint holds the difficulty table");
    let rest = train(cfg(&dir2, &data), true, None);
    assert_eq!(rest.resumed_from, 4);
    assert_eq!(rest.losses.len(), straight.losses.len());
    for (i, (a, b)) in rest.losses.iter().zip(&straight.losses).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {i}: {a} vs {b}");
    }
}

#[test]
fn lemo_composes_with_a_meft_adapter() {
    let dir = workdir("meft");
    let data = text_file(&dir);
    let mut cfg = config(&dir, &data, 6);
    cfg.adapter = serde_json::from_value(serde_json::json!({
        "kind": "meft", "neurons": 256, "top_k": 8, "experts_per_token": 4
    }))
    .unwrap();
    let out = TrainTask {
        config: cfg,
        resume: false,
        stop_after: None,
        skip_eval: false,
    }
    .run::<NdArray>(NdArrayDevice::Cpu)
    .unwrap();
    // 3 calibration steps, then 3 with the MEFT FFN running on the kept tokens only.
    assert_eq!(out.steps, 6);
    assert!(out.losses.iter().all(|l| l.is_finite()), "{:?}", out.losses);
    assert!(out.perplexity_after.is_some());
}
