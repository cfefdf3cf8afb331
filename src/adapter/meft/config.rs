//! [`MeftConfig`]: the sparse adapter's size, routing and initialisation.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Settings of one MEFT sparse adapter (the same for every wrapped layer).
///
/// Defaults follow the paper's best setting (arXiv 2406.04984): K = 64 active neurons per
/// token, E = 4·sqrt(N) experts, 8 experts probed per token, keys N(0, 0.02), values zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeftConfig {
    /// Adapter neurons per layer (N; key/value pairs).
    pub neurons: usize,
    /// Experts (contiguous groups of `neurons / experts` neurons). `None`: 4·sqrt(N), rounded
    /// to the nearest divisor of N.
    #[serde(default)]
    pub experts: Option<usize>,
    /// Experts probed per token by the router.
    #[serde(default = "default_probe")]
    pub experts_per_token: usize,
    /// Active neurons per token (top-K of the probed experts' neuron scores).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Optional cap on distinct active neurons per forward call (bounds what crosses PCIe).
    /// When the union of per-token active sets exceeds it, the neurons with the lowest
    /// batch-wide score are dropped from every token that chose them.
    #[serde(default)]
    pub max_active_per_batch: Option<usize>,
    /// Whether a neuron's score is multiplied by its expert's router score (the paper's MoE
    /// gate, through which the router learns). With `false` the router only selects experts.
    #[serde(default = "default_true")]
    pub router_gate: bool,
    /// Router rows start at this multiple of their expert's mean key (paper: 50).
    #[serde(default = "default_router_init_scale")]
    pub router_init_scale: f64,
    /// Standard deviation of the key init (paper: 0.02).
    #[serde(default = "default_key_std")]
    pub key_init_std: f64,
    /// Standard deviation of the value init (paper: 0, so training starts from the base model).
    #[serde(default)]
    pub value_init_std: f64,
    /// Seed of the adapter's random init (layer `i` uses `seed + i`).
    #[serde(default)]
    pub seed: u64,
}

fn default_probe() -> usize {
    8
}
fn default_top_k() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_router_init_scale() -> f64 {
    50.0
}
fn default_key_std() -> f64 {
    0.02
}

impl MeftConfig {
    /// The paper's best setting for `neurons` neurons per layer.
    pub fn new(neurons: usize) -> Self {
        Self {
            neurons,
            experts: None,
            experts_per_token: default_probe(),
            top_k: default_top_k(),
            max_active_per_batch: None,
            router_gate: true,
            router_init_scale: default_router_init_scale(),
            key_init_std: default_key_std(),
            value_init_std: 0.0,
            seed: 0,
        }
    }

    /// The number of experts: the configured one, or the divisor of N closest to 4·sqrt(N).
    pub fn expert_count(&self) -> usize {
        if let Some(e) = self.experts {
            return e;
        }
        let target = 4.0 * (self.neurons as f64).sqrt();
        (1..=self.neurons.max(1))
            .filter(|e| self.neurons.is_multiple_of(*e))
            .min_by(|a, b| {
                let da = (*a as f64 - target).abs();
                let db = (*b as f64 - target).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(1)
    }

    /// Neurons per expert.
    pub fn expert_size(&self) -> usize {
        self.neurons / self.expert_count().max(1)
    }

    /// Checks the config against the model width `d_model`; every problem is named.
    pub fn validate(&self, d_model: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::AdapterConfig(msg));
        let n = self.neurons;
        if n == 0 || n > u32::MAX as usize {
            return bad(format!("meft: neurons must be in 1..=2^32-1, got {n}"));
        }
        if d_model == 0 {
            return bad("meft: the model width is 0".into());
        }
        let e = self.expert_count();
        if e == 0 || e > n {
            return bad(format!(
                "meft: experts must be in 1..={n} (neurons), got {e}"
            ));
        }
        if !n.is_multiple_of(e) {
            return bad(format!(
                "meft: {e} experts do not divide {n} neurons into equal contiguous groups"
            ));
        }
        let p = self.experts_per_token;
        if p == 0 || p > e {
            return bad(format!(
                "meft: experts_per_token must be in 1..={e} (experts), got {p}"
            ));
        }
        let k = self.top_k;
        if k == 0 || k > n {
            return bad(format!("meft: top_k must be in 1..={n} (neurons), got {k}"));
        }
        let candidates = p * (n / e);
        if k > candidates {
            return bad(format!(
                "meft: top_k = {k} exceeds the {candidates} neurons of the {p} probed experts \
                 ({} neurons each)",
                n / e
            ));
        }
        if self.max_active_per_batch == Some(0) {
            return bad("meft: max_active_per_batch must be at least 1".into());
        }
        for (name, v) in [
            ("router_init_scale", self.router_init_scale),
            ("key_init_std", self.key_init_std),
            ("value_init_std", self.value_init_std),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("meft: {name} must be finite and >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_experts_follow_four_sqrt_n() {
        assert_eq!(MeftConfig::new(65536).expert_count(), 1024);
        assert_eq!(MeftConfig::new(8464).expert_count(), 368);
        assert_eq!(MeftConfig::new(8464).expert_size(), 23);
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = MeftConfig::new(64);
        c.top_k = 65;
        assert!(c.validate(8).unwrap_err().to_string().contains("top_k"));
        let mut c = MeftConfig::new(64);
        c.experts = Some(5);
        assert!(c.validate(8).unwrap_err().to_string().contains("divide"));
        let mut c = MeftConfig::new(64);
        c.experts = Some(8);
        c.experts_per_token = 9;
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .contains("experts_per_token"));
        let mut c = MeftConfig::new(64);
        c.experts = Some(8);
        c.experts_per_token = 1;
        c.top_k = 9;
        assert!(c.validate(8).unwrap_err().to_string().contains("probed"));
        assert!(MeftConfig::new(4096).validate(8).is_ok());
        // 32 experts of 2 neurons, 8 probed: 16 candidates cannot fill K = 64.
        assert!(MeftConfig::new(64).validate(8).is_err());
    }
}
