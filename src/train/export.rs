//! Adapter export: the trained adapter alone, as one safetensors file — the trainable device
//! parameters by module path, each MEFT layer's store rows (`[k | v]`, no optimizer state),
//! and the adapter config and layers in the metadata — and its loading onto a base model
//! (`meft generate --adapter PATH`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::tensor::backend::Backend;

use super::checkpoint::{read_trainable, write_atomic};
use super::params;
use super::tensors_file::{self, Entry, TensorsFile};
use crate::adapter::{self, AdapterConfig, Adapters, Layers};
use crate::model::Llama;
use crate::{Error, Result};

const KIND: &str = "meft-adapter/1";

/// Writes the adapter of `model` (wrapped with `config` on `layers`; its trainable parameters
/// at `paths`, see [`params::trainable_paths`]) to `path` atomically.
pub fn export_adapter<B: Backend>(
    path: &Path,
    model: &Llama<B>,
    paths: &BTreeSet<String>,
    adapters: &Adapters,
    config: &AdapterConfig,
    layers: &Layers,
) -> Result<()> {
    adapters.wait_updates()?;
    let trainable = params::at_paths(model, paths)?;
    let guards: Vec<_> = adapters
        .sparse
        .iter()
        .map(|a| a.read_store())
        .collect::<Result<_>>()?;
    let mut entries: Vec<Entry<'_>> = trainable
        .iter()
        .map(|(k, v)| Entry::f32(format!("param.{k}"), v.shape.clone(), &v.values))
        .collect();
    for (a, s) in adapters.sparse.iter().zip(&guards) {
        let (p, ..) = s.training_state();
        entries.push(Entry::f32(
            format!("meft.layer{}", a.layer()),
            vec![s.neurons(), 2 * s.d_model()],
            p,
        ));
    }
    // One metadata entry (a JSON object with sorted keys): safetensors writes its metadata
    // map in hash order, and equal adapters should be equal files.
    let meta = serde_json::json!({ "format": KIND, "adapter": config, "layers": layers });
    let metadata = HashMap::from([("meft".to_string(), meta.to_string())]);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".tmp-export-{}", std::process::id()));
    tensors_file::write(&tmp, entries, metadata)?;
    drop(guards);
    let bytes =
        std::fs::read(&tmp).map_err(|e| Error::Other(format!("reading {}: {e}", tmp.display())))?;
    let _ = std::fs::remove_file(&tmp);
    write_atomic(path, &bytes)
}

/// Adds the adapter saved at `path` to a frozen base `model`: wraps it with the saved config
/// and loads the saved values. Errors name what does not fit (file kind, layer, shape).
pub fn load_adapter<B: Backend>(model: Llama<B>, path: &Path) -> Result<(Llama<B>, Adapters)> {
    let file = TensorsFile::open(path)?;
    let not_ours = || {
        Error::Other(format!(
            "{} is not a meft adapter export (no {KIND} metadata)",
            path.display()
        ))
    };
    let meta: serde_json::Value = file
        .metadata()?
        .get("meft")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(not_ours)?;
    if meta.get("format").and_then(|f| f.as_str()) != Some(KIND) {
        return Err(not_ours());
    }
    let parse = |k: &str| -> Result<serde_json::Value> {
        meta.get(k)
            .cloned()
            .ok_or_else(|| Error::Other(format!("{}: metadata has no {k}", path.display())))
    };
    let config: AdapterConfig = serde_json::from_value(parse("adapter")?)
        .map_err(|e| Error::Other(format!("{}: adapter config: {e}", path.display())))?;
    let layers: Layers = serde_json::from_value(parse("layers")?)
        .map_err(|e| Error::Other(format!("{}: layers: {e}", path.display())))?;
    let (model, adapters) = adapter::wrap(model, &config, &layers)?;
    let all = read_trainable(&file)?;
    let trainable = all
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("param.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let model = params::load_trainable(model, &trainable)?;
    for a in &adapters.sparse {
        let name = format!("meft.layer{}", a.layer());
        let (shape, p) = file.f32(&name)?;
        a.with_store_mut(|s| {
            if shape != [s.neurons(), 2 * s.d_model()] {
                return Err(Error::AdapterConfig(format!(
                    "{name}: shape {shape:?} does not match the store"
                )));
            }
            let len = p.len();
            s.restore(p, vec![0.0; len], vec![0.0; len], vec![0; s.neurons()])
        })??;
    }
    Ok((model, adapters))
}
