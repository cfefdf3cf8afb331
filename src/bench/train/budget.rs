//! The budget search of `meft bench train`: the largest dense or MEFT adapter whose training
//! step fits a GPU memory budget (the MEFT paper's headline: what a 24 GB GPU can train).

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::report::cell_gib;
use super::{gib, store_bytes, AdapterKind, TrainBench};

/// The largest adapter of one family that fits a GPU memory budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetResult {
    /// Backend and dtype.
    pub label: String,
    /// The family searched (`dense` or `meft`) and its settings, at the largest N that fits.
    pub adapter: String,
    /// Budget in GiB.
    pub budget_gib: f64,
    /// Largest N per layer that fitted (None: not even the smallest probe).
    pub largest_neurons: Option<usize>,
    /// Peak GPU bytes at that N.
    pub peak_bytes: Option<u64>,
    /// Host store bytes at that N.
    pub host_store_bytes: Option<u64>,
    /// Every probe: N, peak GPU bytes (None if it failed), and why it stopped the search.
    pub probes: Vec<BudgetProbe>,
    /// What bounded the search (GPU budget, host memory, search limit).
    pub limited_by: String,
}

/// One probe of the budget search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetProbe {
    /// Neurons per layer.
    pub neurons: usize,
    /// Peak GPU bytes over two steps.
    pub peak_bytes: Option<u64>,
    /// Whether it fitted the budget.
    pub fits: bool,
    /// Failure or reason it was not run.
    pub note: Option<String>,
}

impl TrainBench {
    /// Largest N of `kind`'s family (its K and P kept) whose step peaks within the budget:
    /// doubling from 4096 while it fits (and, for MEFT, while the stores fit in host memory),
    /// then three bisection steps on multiples of 1024.
    pub fn largest_fit<B: Backend>(
        &self,
        kind: AdapterKind,
        budget_gib: f64,
        dev: &B::Device,
    ) -> BudgetResult {
        let budget = (budget_gib * (1u64 << 30) as f64) as u64;
        let seq = self.seqs[0];
        let probe_bench = TrainBench {
            warmup: 2,
            iters: 1,
            ..self.clone()
        };
        let mut probes: Vec<BudgetProbe> = Vec::new();
        let probe = |n: usize| -> BudgetProbe {
            let k = kind.with_neurons(n);
            if let Err(e) = self.check_host(k) {
                return BudgetProbe {
                    neurons: n,
                    peak_bytes: None,
                    fits: false,
                    note: Some(e.to_string()),
                };
            }
            let r = probe_bench.row::<B>(seq, k, dev);
            let fits = r.error.is_none() && r.peak_bytes.is_some_and(|p| p <= budget);
            eprintln!(
                "budget {budget_gib} GiB: {k} peaks at {:?} GiB: {}",
                r.peak_bytes.map(gib),
                if fits { "fits" } else { "does not fit" }
            );
            BudgetProbe {
                neurons: n,
                peak_bytes: r.peak_bytes,
                fits,
                note: r.error,
            }
        };
        const MAX: usize = 1 << 22;
        let (mut lo, mut hi) = (None::<usize>, None::<usize>);
        let mut n = 4096;
        while n <= MAX {
            let p = probe(n);
            let fits = p.fits;
            probes.push(p);
            if fits {
                lo = Some(n);
                n *= 2;
            } else {
                hi = Some(n);
                break;
            }
        }
        if let (Some(mut a), Some(mut b)) = (lo, hi) {
            for _ in 0..3 {
                let mid = (a + b) / 2 / 1024 * 1024;
                if mid <= a || mid >= b {
                    break;
                }
                let p = probe(mid);
                if p.fits {
                    a = mid;
                } else {
                    b = mid;
                }
                probes.push(p);
            }
            lo = Some(a);
        }
        let best = lo.and_then(|n| probes.iter().find(|p| p.neurons == n && p.fits).cloned());
        let limited_by = match probes.iter().rev().find(|p| !p.fits) {
            None => format!("search limit ({MAX} neurons per layer)"),
            Some(p) => match &p.note {
                Some(note) if note.starts_with("host memory") => note.clone(),
                Some(note) => format!("N = {}: {note}", p.neurons),
                None => format!(
                    "GPU budget: N = {} peaks at {:.2} GiB",
                    p.neurons,
                    p.peak_bytes.map_or(f64::NAN, gib)
                ),
            },
        };
        BudgetResult {
            label: self.label.clone(),
            adapter: kind.with_neurons(lo.unwrap_or(0)).to_string(),
            budget_gib,
            largest_neurons: lo,
            peak_bytes: best.as_ref().and_then(|p| p.peak_bytes),
            host_store_bytes: lo.map(|n| {
                store_bytes(
                    kind.with_neurons(n),
                    self.config.n_layers,
                    self.config.d_model,
                )
            }),
            probes,
            limited_by,
        }
    }
}

impl BudgetResult {
    /// A Markdown table, one line per searched family.
    pub fn table(results: &[BudgetResult]) -> String {
        let mut s = String::from(
            "| run | budget GiB | adapter at the largest N | largest N / layer | peak GiB | host store GiB | probes (N: peak GiB) | bounded by |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in results {
            let probes = r
                .probes
                .iter()
                .map(|p| {
                    format!(
                        "{}: {}",
                        p.neurons,
                        p.peak_bytes
                            .map_or("–".into(), |b| format!("{:.2}", gib(b)))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.label,
                r.budget_gib,
                r.adapter,
                r.largest_neurons.map_or("none".into(), |n| n.to_string()),
                cell_gib(r.peak_bytes),
                r.host_store_bytes
                    .map_or("–".into(), |b| format!("{:.1}", gib(b))),
                probes,
                r.limited_by
            );
        }
        s
    }
}
