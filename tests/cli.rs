//! The `meft` binary: bad input ends in a clear error and a non-zero exit, never a panic.

mod common;

use std::process::Command;

fn meft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meft"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[test]
fn info_prints_the_config() {
    let model = common::tinycoder();
    let (ok, stdout, _) = meft(&["info", "--model", model.to_str().unwrap()]);
    assert!(ok);
    assert!(
        stdout.contains("\"d_model\": 16") && stdout.contains("F16"),
        "{stdout}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("meft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(common::tinycoder()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let tiny = common::tinycoder();
    let smol = common::smollm2();
    // `meft generate --model M --prompt x EXTRA...` and the message it must print.
    let generate = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.display().to_string(),
        ];
        args.extend(["--prompt", "x"].iter().chain(extra).map(|a| a.to_string()));
        args
    };
    let cases = [
        (generate(&truncated, &[]), "truncated"),
        (
            generate("/nonexistent.gguf".as_ref(), &[]),
            "cannot read GGUF file",
        ),
        (
            generate(&tiny, &["--adapter", "/nonexistent.safetensors"]),
            "/nonexistent.safetensors",
        ),
        (
            generate(&smol, &["--dtype", "bf16"]),
            "bf16 is not available on the cpu",
        ),
        (
            generate(&smol, &["--max-tokens", "9000"]),
            "context is 8192 tokens",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = meft(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: stderr was {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bench_kernels_writes_every_op() {
    let out = std::env::temp_dir().join(format!("meft-kernels-{}.json", std::process::id()));
    let (ok, stdout, stderr) = meft(&[
        "bench",
        "kernels",
        "--backend",
        "cpu",
        "--d-model",
        "32",
        "--tokens",
        "16",
        "--neurons",
        "64",
        "--top-k",
        "3,8",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--slots",
        "random,routed",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| forward+backward |"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = json.as_array().unwrap();
    // Per (slots, K): gather, forward, backward, both, the three over whole rows beside the
    // planned d-slices, and where the plan took row tiles the three without them.
    let tiled: Vec<bool> = rows
        .iter()
        .filter(|r| r["op"] == "forward")
        .map(|r| r["tiled"].as_bool().unwrap())
        .collect();
    assert_eq!(tiled.len(), 4, "K = 3 and 8, random and routed");
    // K = 8 random: 8 of 64 rows fall in 2 tiles of 32 rows, ≥ 4 entries per (tile, token).
    assert!(tiled[1], "random K = 8 runs in row tiles");
    let group = |i: usize| 7 + 3 * tiled[i] as usize;
    assert_eq!(rows.len(), (0..4).map(group).sum::<usize>());
    // 64 rows: 32 experts of 2 neurons (the divisor nearest 4·√64), 8 probed per token.
    let slots: Vec<&str> = rows.iter().map(|r| r["slots"].as_str().unwrap()).collect();
    let n_random = group(0) + group(1);
    assert!(slots[..n_random].iter().all(|&s| s == "random"));
    assert!(slots[n_random..].iter().all(|&s| s == "routed 32×8"));
    let first = &rows[..group(0)];
    let ops: Vec<&str> = first.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops[..7],
        [
            "gather",
            "forward",
            "backward",
            "forward+backward",
            "forward, whole rows",
            "backward, whole rows",
            "forward+backward, whole rows"
        ]
    );
    let sliced: Vec<bool> = first
        .iter()
        .map(|r| r["sliced"].as_bool().unwrap())
        .collect();
    assert_eq!(sliced[..7], [false, true, true, true, false, false, false]);
    let second = &rows[group(0)..][..group(1)];
    let ops: Vec<&str> = second.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops[7..],
        [
            "forward, d-slices without tiles",
            "backward, d-slices without tiles",
            "forward+backward, d-slices without tiles"
        ]
    );
    let flags: Vec<(bool, bool)> = second
        .iter()
        .map(|r| {
            (
                r["sliced"].as_bool().unwrap(),
                r["tiled"].as_bool().unwrap(),
            )
        })
        .collect();
    let (t, f) = (true, false);
    assert_eq!(
        flags,
        [
            (f, f),
            (t, t),
            (t, t),
            (t, t),
            (f, f),
            (f, f),
            (f, f),
            (t, f),
            (t, f),
            (t, f)
        ]
    );
    for r in rows {
        assert!(r["kernel_ms"].as_f64().unwrap() >= 0.0);
        assert!(r["ceilings"]["read_gbps"].as_f64().unwrap() > 0.0, "{r}");
        // On ndarray both paths are the reference: identical results.
        assert_eq!(r["max_rel_diff"].as_f64(), Some(0.0), "{r}");
    }
    std::fs::remove_file(out).ok();
    // A bad K is a clear error, never a panic (the small cpu geometry plus `extra`).
    let refused = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "kernels",
            "--backend",
            "cpu",
            "--d-model",
            "8",
            "--tokens",
            "4",
            "--neurons",
            "64",
        ];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = meft(&args);
        assert!(!ok, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    // More slots than the probed experts hold.
    let stderr = refused(&[
        "--top-k",
        "5",
        "--slots",
        "routed",
        "--experts",
        "32",
        "--probes",
        "2",
    ]);
    assert!(
        stderr.contains("cannot exceed the 2 probed experts' 4 neurons"),
        "{stderr}"
    );
    // More slots than rows, after a good K: refused before anything is timed.
    let stderr = refused(&["--top-k", "3,65", "--slots", "random"]);
    assert!(
        stderr.contains("K = 65 must be at least 1 and cannot exceed the 64 rows"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ceilings:"),
        "checked before timing: {stderr}"
    );
}

#[test]
fn bench_train_smoke() {
    let dir = std::env::temp_dir().join(format!("meft-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("train.json");
    let model = common::tinycoder();
    let (ok, stdout, stderr) = meft(&[
        "bench",
        "train",
        "--backend",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "2",
        "--seqs",
        "8,16",
        "--kinds",
        "none,lora:4,dense:256,dense:512,meft:256:8,meft:1024:8",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| meft:1024:8 |"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12, "6 kinds × 2 lengths");
    for r in rows {
        let what = format!("{} seq {}", r["adapter"], r["seq"]);
        assert!(r["error"].is_null(), "{what}: {r}");
        assert!(r["step_ms"].as_f64().unwrap() > 0.0, "{what}");
        assert_eq!(r["runs_ms"].as_array().unwrap().len(), 2, "{what}");
        let tps = r["tokens_per_s"].as_f64().unwrap();
        let expect = 2.0 * r["seq"].as_f64().unwrap() / (r["step_ms"].as_f64().unwrap() / 1e3);
        assert!(
            (tps - expect).abs() <= 1e-6 * expect,
            "{what}: {tps} vs {expect}"
        );
        // No GPU pool on the CPU backend: memory figures are absent, not zero.
        assert!(r["peak_bytes"].is_null(), "{what}");
        let meft = r["family"] == "meft";
        let store = r["host_store_bytes"].as_u64().unwrap();
        let h2d = r["h2d_bytes"].as_f64().unwrap();
        assert_eq!(meft, store > 0, "{what}: host store {store}");
        assert_eq!(meft, h2d > 0.0, "{what}: H→D {h2d}");
        if meft {
            // Parameters and both moments of N rows of [k | v] per layer, at least.
            let n = r["neurons"].as_u64().unwrap();
            let min = 3 * n * 2 * 16 * 4 * r["layers"].as_u64().unwrap();
            assert!(store >= min, "{what}: {store} < {min}");
        }
    }
    // The N sweeps (dense and MEFT at two sizes) and the length sweep are plotted.
    for name in [
        "train-neurons-memory-seq8.png",
        "train-neurons-step-seq16.png",
        "train-seq-speed.png",
    ] {
        let png = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
    }
    let (ok, _, stderr) = meft(&[
        "bench",
        "train",
        "--backend",
        "cpu",
        "--kinds",
        "meft:0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("N must be a positive integer"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
}
