//! Crash-safe checkpoints of the whole training state.
//!
//! A checkpoint is a folder `step-NNNNNNNN/` under the run's `checkpoints/` holding
//! - `state.json`: step, examples consumed (the data position), seed, and the fingerprint of
//!   the model and adapter config it belongs to;
//! - `trainable.safetensors`: the trainable device parameters by module path;
//! - `optimizer.bin`: the device AdamW's moments (burn's named MessagePack record);
//! - `meft.safetensors`: per MEFT layer, the store's parameters, both sparse-AdamW moments and
//!   per-row step counts.
//!
//! Writing: every file goes into a `.tmp-…` folder and is fsync'd, the folder is fsync'd and
//! renamed to its final name, then `latest` (the name of the newest checkpoint) is replaced
//! through a temp file + fsync + rename. A crash at any point leaves `latest` naming a complete
//! checkpoint (or no `latest`, before the first). Older checkpoints beyond `keep` are removed
//! only after that. No run-time randomness exists beyond the seed (data order is a function
//! of seed and position), so the data position is the RNG state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::model::AdaptedLm;
use super::optim::AdapterOptimizer;
use super::params::{self, HostTensor};
use super::tensors_file::{self, Entry, TensorsFile};
use crate::{Error, Result};

/// Format version written into `state.json`. 2: `optimizer.bin` is burn's named MessagePack
/// record (its bincode recorder panics on a damaged file instead of returning an error).
pub const FORMAT: u32 = 2;

/// The small part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Format version.
    pub format: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Training examples consumed (the data loader's position).
    pub examples: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// What the checkpoint belongs to (see [`fingerprint`]).
    pub fingerprint: serde_json::Value,
    /// Training loss of every applied step so far (skipped steps have none).
    pub losses: Vec<f64>,
    /// Steps skipped for a non-finite loss or gradient (see `nonfinite` in the run config).
    #[serde(default)]
    pub skipped: Vec<usize>,
}

/// The identity of a run's trainable state: model geometry, adapter config and layers.
/// A checkpoint with another fingerprint is refused, naming the differing field.
pub fn fingerprint(
    model: &serde_json::Value,
    adapter: &serde_json::Value,
    layers: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({ "model": model, "adapter": adapter, "layers": layers })
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Other(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing", path, e))
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename, fsync of
/// the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing", &tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into", path, e))?;
    sync_dir(dir)
}

fn step_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Saves a checkpoint under `dir` (waiting for pending sparse updates first) and keeps the
/// newest `keep`. Returns its folder.
pub fn save<B: AutodiffBackend>(
    dir: &Path,
    state: &TrainState,
    lm: &AdaptedLm<B>,
    optim: &AdapterOptimizer<B>,
    keep: usize,
) -> Result<PathBuf> {
    lm.adapters.wait_updates()?;
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    check_disk(dir, lm)?;
    let name = step_name(state.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io("removing", &tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io("creating", &tmp, e))?;
    // A failed write (disk full, I/O error) removes its partial folder, so it neither fills the
    // disk further nor looks like a checkpoint; `latest` still names the previous one.
    if let Err(e) = write_files(&tmp, state, lm, optim) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Other(format!(
            "writing checkpoint {name}: {e}; the previous checkpoint is kept"
        )));
    }

    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io("removing", &final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io("renaming into", &final_dir, e))?;
    sync_dir(dir)?;
    write_atomic(&dir.join("latest"), name.as_bytes())?;
    prune(dir, keep)?;
    Ok(final_dir)
}

/// The least free disk space a checkpoint of this run takes: trainable parameters, their two
/// AdamW moments, and the MEFT stores (rows, two moments, row step counts).
pub fn estimated_bytes<B: AutodiffBackend>(lm: &AdaptedLm<B>) -> Result<u64> {
    // From shapes (nothing is read back from the device): this runs before every checkpoint.
    let (trainable, _) = params::param_bytes(&lm.model);
    let stores: u64 = lm
        .adapters
        .sparse
        .iter()
        .map(|a| a.with_store(|s| super::preflight::store_bytes(s.neurons(), s.d_model())))
        .sum::<Result<u64>>()?;
    Ok(3 * trainable + stores)
}

/// Bytes free to this user on the filesystem holding `path` (`None` where unknown).
pub fn disk_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Fails, naming both sizes, when `dir`'s filesystem has less free space than a checkpoint
/// of `lm` needs (checked before the run's first step and before every checkpoint).
pub fn check_disk<B: AutodiffBackend>(dir: &Path, lm: &AdaptedLm<B>) -> Result<()> {
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("."));
    check_space(estimated_bytes(lm)?, disk_free(probe), probe)
}

/// [`check_disk`]'s comparison: `need` bytes against `free` bytes (unknown: passes).
fn check_space(need: u64, free: Option<u64>, place: &Path) -> Result<()> {
    match free {
        Some(free) if need > free => Err(Error::Resources(format!(
            "disk: a checkpoint of this run needs {:.2} GB in {}, {:.2} GB free — free space, choose another output folder, or use fewer adapter neurons",
            need as f64 / 1e9,
            place.display(),
            free as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

fn write_files<B: AutodiffBackend>(
    tmp: &Path,
    state: &TrainState,
    lm: &AdaptedLm<B>,
    optim: &AdapterOptimizer<B>,
) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| io("writing", tmp, e))?;
    tensors_file::sync_file(&tmp.join("state.json"))?;

    let trainable = params::trainable(&lm.model)?;
    write_trainable(
        &tmp.join("trainable.safetensors"),
        &trainable,
        HashMap::new(),
    )?;

    let bytes = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(optim.dense_record(), ())
        .map_err(|e| Error::Other(format!("serialising the optimizer state: {e}")))?;
    std::fs::write(tmp.join("optimizer.bin"), bytes).map_err(|e| io("writing", tmp, e))?;
    tensors_file::sync_file(&tmp.join("optimizer.bin"))?;

    write_stores(&tmp.join("meft.safetensors"), lm)?;
    if let Some(table) = lm.lemo.as_ref().and_then(|l| l.difficulty.as_ref()) {
        let saved = table.lock().unwrap_or_else(|p| p.into_inner()).to_saved();
        let json = serde_json::to_vec(&saved).map_err(|e| Error::Other(e.to_string()))?;
        let path = tmp.join(DIFFICULTY_FILE);
        std::fs::write(&path, json).map_err(|e| io("writing", &path, e))?;
        tensors_file::sync_file(&path)?;
    }
    sync_dir(tmp)?;
    Ok(())
}

/// LeMo's difficulty table in a checkpoint (the sources that keep one: `difficulty`, and the
/// random shared ones for the kept-miss report).
const DIFFICULTY_FILE: &str = "lemo-difficulty.json";

/// Writes trainable parameters (by path) to a safetensors file.
pub fn write_trainable(
    path: &Path,
    values: &BTreeMap<String, HostTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let entries = values
        .iter()
        .map(|(k, v)| Entry::f32(k.clone(), v.shape.clone(), &v.values))
        .collect();
    tensors_file::write(path, entries, metadata)
}

/// Reads trainable parameters written by [`write_trainable`].
pub fn read_trainable(file: &TensorsFile) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for name in file.names()? {
        let (shape, values) = file.f32(&name)?;
        out.insert(name, HostTensor { shape, values });
    }
    Ok(out)
}

fn write_stores<B: AutodiffBackend>(path: &Path, lm: &AdaptedLm<B>) -> Result<()> {
    let guards: Vec<_> = lm
        .adapters
        .sparse
        .iter()
        .map(|a| a.read_store())
        .collect::<Result<_>>()?;
    let mut entries = Vec::new();
    for (a, s) in lm.adapters.sparse.iter().zip(&guards) {
        let (p, m1, m2, steps) = s.training_state();
        let shape = vec![s.neurons(), 2 * s.d_model()];
        let l = a.layer();
        entries.push(Entry::f32(format!("layer{l}.params"), shape.clone(), p));
        entries.push(Entry::f32(format!("layer{l}.moment1"), shape.clone(), m1));
        entries.push(Entry::f32(format!("layer{l}.moment2"), shape, m2));
        entries.push(Entry::u32(
            format!("layer{l}.row_steps"),
            vec![s.neurons()],
            steps,
        ));
    }
    tensors_file::write(path, entries, HashMap::new())
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let path = dir.join(name.trim());
            if !path.join("state.json").is_file() {
                return Err(Error::Other(format!(
                    "{} names {}, which is not a complete checkpoint",
                    pointer.display(),
                    path.display()
                )));
            }
            Ok(Some(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", &pointer, e)),
    }
}

/// Reads a checkpoint's `state.json` and checks it belongs to `fingerprint`.
pub fn read_state(path: &Path, fingerprint: &serde_json::Value) -> Result<TrainState> {
    let file = path.join("state.json");
    let bytes = std::fs::read(&file).map_err(|e| io("reading", &file, e))?;
    parse_state(&bytes, &file.display().to_string(), fingerprint)
}

/// [`read_state`] on the bytes of a `state.json` (`origin` names it in errors).
pub fn parse_state(
    bytes: &[u8],
    origin: &str,
    fingerprint: &serde_json::Value,
) -> Result<TrainState> {
    let state: TrainState = serde_json::from_slice(bytes)
        .map_err(|e| Error::Other(format!("{origin} is not a checkpoint state: {e}")))?;
    if state.format != FORMAT {
        return Err(Error::Other(format!(
            "{origin}: checkpoint format {} (this build reads {FORMAT})",
            state.format
        )));
    }
    if let Some(field) = differing_field(&state.fingerprint, fingerprint, String::new()) {
        return Err(Error::Other(format!(
            "checkpoint {origin} belongs to another run: `{field}` differs (checkpoint: {}, config: {})",
            lookup(&state.fingerprint, &field),
            lookup(fingerprint, &field)
        )));
    }
    if state.losses.len() + state.skipped.len() != state.step {
        return Err(Error::Other(format!(
            "{origin}: inconsistent checkpoint state: step {} but {} losses and {} skipped steps",
            state.step,
            state.losses.len(),
            state.skipped.len()
        )));
    }
    Ok(state)
}

/// Decodes a checkpoint's `optimizer.bin` (the device AdamW's moments) for this run's model.
pub fn decode_optimizer<B: AutodiffBackend>(
    bytes: Vec<u8>,
    origin: &str,
    device: &B::Device,
) -> Result<super::optim::DenseRecord<B>> {
    let bad =
        |e: String| Error::Other(format!("{origin}: not an optimizer state of this run: {e}"));
    check_param_ids(&bytes).map_err(bad)?;
    // burn's record conversion still panics on some malformed contents (found by fuzzing:
    // `ParamId::deserialize` expects); the decode touches no shared state, so a panic is
    // turned into this error.
    let load = std::panic::AssertUnwindSafe(|| {
        NamedMpkBytesRecorder::<FullPrecisionSettings>::default().load(bytes, device)
    });
    match std::panic::catch_unwind(load) {
        Ok(r) => r.map_err(|e| bad(e.to_string())),
        Err(_) => Err(bad("the record decoder rejected its contents".into())),
    }
}

/// Checks every parameter id key of an optimizer record before burn parses them: burn 0.21's
/// `ParamId::deserialize` panics on an id that is not base32 of at most 8 bytes (the fuzz
/// target `checkpoint` found it). Ids this build writes are 13 base32 characters.
fn check_param_ids(bytes: &[u8]) -> std::result::Result<(), String> {
    #[derive(Deserialize)]
    struct Keys {
        item: BTreeMap<String, serde::de::IgnoredAny>,
    }
    let keys: Keys = rmp_serde::from_slice(bytes).map_err(|e| e.to_string())?;
    for id in keys.item.keys() {
        // Longer strings can decode to more than 8 bytes, which burn slices into 8 (a panic).
        if id.len() > 13 || burn::module::ParamId::try_deserialize(id).is_none() {
            return Err(format!("parameter id {id:?} is not one this build writes"));
        }
    }
    Ok(())
}

fn differing_field(a: &serde_json::Value, b: &serde_json::Value, at: String) -> Option<String> {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => differing_field(u, v, p),
                    _ => Some(p),
                }
            })
        }
        _ => (a != b).then_some(at),
    }
}

fn lookup(v: &serde_json::Value, path: &str) -> String {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .map(|v| v.to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Restores the model's trainable parameters, the AdamW state and the MEFT stores.
pub fn restore<B: AutodiffBackend>(
    path: &Path,
    lm: AdaptedLm<B>,
    optim: &AdapterOptimizer<B>,
    device: &B::Device,
) -> Result<AdaptedLm<B>> {
    let trainable = read_trainable(&TensorsFile::open(&path.join("trainable.safetensors"))?)?;
    let AdaptedLm {
        model,
        adapters,
        staged,
        lemo,
    } = lm;
    if let Some(missing) = params::trainable_paths(&model)?
        .into_iter()
        .find(|p| !trainable.contains_key(p))
    {
        return Err(Error::Other(format!(
            "checkpoint {} has no value for the trainable parameter {missing}",
            path.display()
        )));
    }
    let model = params::load_trainable(model, &trainable)?;
    let file = path.join("optimizer.bin");
    let bytes = std::fs::read(&file).map_err(|e| io("reading", &file, e))?;
    let record = decode_optimizer::<B>(bytes, &file.display().to_string(), device)?;
    optim.load_dense_record(record);
    // Only MEFT runs have host stores (an empty safetensors file is not readable back).
    let stores = match adapters.sparse.is_empty() {
        true => None,
        false => Some(TensorsFile::open(&path.join("meft.safetensors"))?),
    };
    for (a, stores) in adapters
        .sparse
        .iter()
        .zip(std::iter::repeat(stores.as_ref()))
    {
        let stores = stores.expect("opened when there are stores");
        let l = a.layer();
        let (_, p) = stores.f32(&format!("layer{l}.params"))?;
        let (_, m1) = stores.f32(&format!("layer{l}.moment1"))?;
        let (_, m2) = stores.f32(&format!("layer{l}.moment2"))?;
        let (_, st) = stores.u32(&format!("layer{l}.row_steps"))?;
        a.with_store_mut(|s| s.restore(p, m1, m2, st))??;
    }
    if let Some(l) = &lemo {
        let step = read_state_step(path)?;
        l.steps.store(step, std::sync::atomic::Ordering::SeqCst);
        if let Some(table) = &l.difficulty {
            // Checkpoints from before the table existed have none: it refills from the next
            // steps' losses.
            let file = path.join(DIFFICULTY_FILE);
            if file.exists() {
                let bytes = std::fs::read(&file).map_err(|e| io("reading", &file, e))?;
                let saved = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Other(format!("checkpoint {}: {e}", file.display())))?;
                *table.lock().unwrap_or_else(|p| p.into_inner()) =
                    crate::lemo::TokenDifficulty::from_saved(saved);
            }
        }
    }
    Ok(AdaptedLm {
        model,
        adapters,
        staged,
        lemo,
    })
}

/// The step a checkpoint folder was written at (from its state.json).
fn read_state_step(path: &Path) -> Result<usize> {
    let file = path.join("state.json");
    let bytes = std::fs::read(&file).map_err(|e| io("reading", &file, e))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Other(format!("{}: {e}", file.display())))?;
    v.get("step")
        .and_then(|s| s.as_u64())
        .map(|s| s as usize)
        .ok_or_else(|| Error::Other(format!("{}: no step", file.display())))
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    let n = steps.len().saturating_sub(keep.max(1));
    for old in &steps[..n] {
        std::fs::remove_dir_all(old).map_err(|e| io("removing", old, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_disk_names_both_sizes() {
        let e = check_space(27_000_000_000, Some(5_500_000_000), Path::new("/runs"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("27.00 GB") && e.contains("5.50 GB") && e.contains("/runs"),
            "{e}"
        );
        check_space(1, Some(2), Path::new("/")).unwrap();
        check_space(u64::MAX, None, Path::new("/")).unwrap();
        let free = disk_free(&std::env::temp_dir()).expect("statvfs answers for the temp dir");
        assert!(free > 0);
    }
}
