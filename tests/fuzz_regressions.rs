//! Every fuzz seed and every minimised crasher the fuzzers found (fuzz/seeds/<target>/,
//! fuzz/regressions/<target>/) goes through the same entry point the fuzz target calls
//! (`meft::fuzz`), so a fixed crash stays fixed without nightly or cargo-fuzz in CI.

use std::path::Path;

#[test]
fn every_seed_and_minimised_crasher_returns_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (target, entry) in meft::fuzz::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "fuzz target {target} has no file"
        );
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(target);
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files {
                let path = f.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let t0 = std::time::Instant::now();
                let outcome = std::panic::catch_unwind(|| entry(&bytes));
                assert!(outcome.is_ok(), "{} panicked", path.display());
                assert!(
                    t0.elapsed().as_secs() < 30,
                    "{} took {:?}",
                    path.display(),
                    t0.elapsed()
                );
                ran += 1;
            }
        }
    }
    assert!(ran >= 20, "only {ran} inputs found");
}
