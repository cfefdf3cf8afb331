//! Resource preflight: before a run allocates anything large, the memory it needs at least
//! is computed from the model geometry and the adapter config and compared with what the host
//! and the GPU have free. A shortfall is an error that states both sizes, instead of an
//! allocation failure (or the OOM killer) minutes into the run.
//!
//! The figures are lower bounds: weights, trainable parameters with their gradients and both
//! AdamW moments, and the MEFT host stores; activations and allocator slack come on top.

use crate::adapter::{AdapterConfig, LoraTarget};
use crate::model::LlamaConfig;
use crate::{Error, Result};

/// The least memory a run needs, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Frozen base-model weights at the run's float type.
    pub weights: u64,
    /// Trainable device parameters × 4 (value, gradient, two AdamW moments), f32.
    pub trainable: u64,
    /// MEFT host stores: rows and both sparse-AdamW moments (f32) plus per-row step counts.
    pub stores: u64,
}

impl Needs {
    /// What must fit on the compute device (on the CPU backend that is host memory too).
    pub fn device(&self) -> u64 {
        self.weights + self.trainable
    }
}

/// Parameters of the base model (embeddings, every block, final norm, untied output head).
pub fn model_params(m: &LlamaConfig) -> u64 {
    let (d, f, v) = (m.d_model as u64, m.ffn_hidden as u64, m.vocab_size as u64);
    let kv = (m.n_kv_heads * m.head_dim()) as u64;
    let block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d;
    let head = if m.tie_embeddings { 0 } else { v * d };
    v * d + m.n_layers as u64 * block + d + head
}

/// Trainable device parameters the adapter adds on `layers` layers.
pub fn adapter_device_params(m: &LlamaConfig, adapter: &AdapterConfig, layers: usize) -> u64 {
    let (d, f) = (m.d_model as u64, m.ffn_hidden as u64);
    let kv = (m.n_kv_heads * m.head_dim()) as u64;
    let per_layer = match adapter {
        AdapterConfig::Meft(c) => c.expert_count() as u64 * d,
        AdapterConfig::Dense(c) => 2 * c.neurons as u64 * d,
        AdapterConfig::Lora(c) => c
            .targets
            .iter()
            .map(|t| {
                let (inp, out) = match t {
                    LoraTarget::Q | LoraTarget::O => (d, d),
                    LoraTarget::K | LoraTarget::V => (d, kv),
                    LoraTarget::Gate | LoraTarget::Up => (d, f),
                    LoraTarget::Down => (f, d),
                };
                c.rank as u64 * (inp + out)
            })
            .sum(),
    };
    per_layer * layers as u64
}

/// Bytes of one layer's MEFT store: rows and both sparse-AdamW moments (f32, `2·d` per row)
/// and the per-row step counts (u32).
pub fn store_bytes(neurons: usize, d_model: usize) -> u64 {
    (3 * neurons as u64 * 2 * d_model as u64 + neurons as u64) * 4
}

/// The least memory of a run of `adapter` on `layers` layers of `model`, base weights held at
/// `weight_bytes` bytes per parameter.
pub fn estimate(
    model: &LlamaConfig,
    adapter: &AdapterConfig,
    layers: usize,
    weight_bytes: u64,
) -> Needs {
    let stores = match adapter {
        AdapterConfig::Meft(c) => store_bytes(c.neurons, model.d_model) * layers as u64,
        _ => 0,
    };
    Needs {
        weights: model_params(model) * weight_bytes,
        trainable: adapter_device_params(model, adapter, layers) * 16,
        stores,
    }
}

/// Host memory available to new allocations (Linux `MemAvailable`), bytes; `None` elsewhere.
pub fn host_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Where the device part of a run lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    /// Everything in host memory (the ndarray backend).
    Host,
    /// Weights and trainable parameters on a GPU with this many bytes free (`None`: unknown).
    Gpu(Option<u64>),
}

/// Fails, naming the required and available sizes, when `needs` cannot fit.
pub fn check(needs: &Needs, residence: Residence, host_free: Option<u64>) -> Result<()> {
    let host_need = match residence {
        Residence::Host => needs.stores + needs.device(),
        Residence::Gpu(_) => needs.stores,
    };
    if let Some(free) = host_free {
        if host_need > free {
            let parts = match residence {
                Residence::Host => format!(
                    "base weights {}, trainable parameters with gradients and AdamW moments {}, MEFT stores {}",
                    gib(needs.weights),
                    gib(needs.trainable),
                    gib(needs.stores)
                ),
                Residence::Gpu(_) => "the MEFT adapter stores (rows and two moments)".into(),
            };
            return Err(Error::Resources(format!(
                "host memory: the run needs at least {} ({parts}), {} available — use fewer adapter neurons or layers",
                gib(host_need),
                gib(free)
            )));
        }
    }
    if let Residence::Gpu(Some(free)) = residence {
        if needs.device() > free {
            return Err(Error::Resources(format!(
                "GPU memory: the run needs at least {} (base weights {}, trainable parameters with gradients and AdamW moments {}; activations come on top), {} free on the device — use a smaller adapter, bf16, or fewer layers",
                gib(needs.device()),
                gib(needs.weights),
                gib(needs.trainable),
                gib(free)
            )));
        }
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{DenseAdapterConfig, LoraConfig, MeftConfig};

    #[test]
    fn smollm2_parameter_count_matches_the_model_card() {
        // SmolLM2-135M: 134.5 M parameters with tied embeddings.
        let p = model_params(&LlamaConfig::smollm2_135m());
        assert!((134_000_000..135_000_000).contains(&p), "{p}");
    }

    #[test]
    fn stores_and_trainable_bytes_follow_the_config() {
        let m = LlamaConfig::smollm2_135m();
        let meft = estimate(&m, &AdapterConfig::Meft(MeftConfig::new(65536)), 30, 4);
        assert_eq!(meft.stores, (3 * 65536 * 2 * 576 * 4 + 65536 * 4) * 30);
        let dense = estimate(
            &m,
            &AdapterConfig::Dense(DenseAdapterConfig::new(4096)),
            30,
            4,
        );
        assert_eq!(dense.trainable, 2 * 4096 * 576 * 30 * 16);
        assert_eq!(dense.stores, 0);
        let lora = estimate(&m, &AdapterConfig::Lora(LoraConfig::new(8)), 30, 2);
        assert!(lora.trainable > 0 && lora.trainable < dense.trainable);
        assert_eq!(lora.weights, model_params(&m) * 2);
    }

    #[test]
    fn a_shortfall_names_both_sizes() {
        let n = Needs {
            weights: 1 << 30,
            trainable: 3 << 30,
            stores: 8 << 30,
        };
        let e = check(&n, Residence::Gpu(Some(2 << 30)), Some(64 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPU memory") && e.contains("4.00 GiB") && e.contains("2.00 GiB"),
            "{e}"
        );
        let e = check(&n, Residence::Gpu(None), Some(4 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host memory") && e.contains("8.00 GiB") && e.contains("4.00 GiB"),
            "{e}"
        );
        let e = check(&n, Residence::Host, Some(10 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("12.00 GiB"), "{e}");
        check(&n, Residence::Gpu(Some(5 << 30)), Some(9 << 30)).unwrap();
        check(&n, Residence::Host, None).unwrap();
    }
}
