//! Reports of `meft bench train`: the Markdown tables and the PNG plots of the sweeps.

use std::path::{Path, PathBuf};

use super::{gib, TrainBenchResult, TrainBenchRow};
use crate::bench::plot::{LinePlot, Scale, Series};
use crate::Result;

pub(super) fn cell_gib(b: Option<u64>) -> String {
    b.map_or("–".into(), |b| format!("{:.2}", gib(b)))
}

impl TrainBenchRow {
    /// A Markdown table; each row's time and peak memory also as ratios to the `lora` row of
    /// the same label and length (the smallest common adapter), when there is one.
    pub fn table(rows: &[TrainBenchRow]) -> String {
        let mut s = String::from(
            "| run | layers × d | batch×seq | adapter | step ms | tok/s | weights GiB | adapter GiB | \
             optimizer GiB | activations GiB | steady GiB | peak GiB | host store GiB | H→D MB | \
             D→H MB | exposed ms | time vs lora | peak vs lora |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows {
            let lora = rows
                .iter()
                .find(|l| l.family == "lora" && l.seq == r.seq && l.label == r.label);
            let ratio = |a: Option<f64>, b: Option<f64>| {
                a.zip(b)
                    .map_or("–".into(), |(a, b)| format!("{:.2}×", a / b))
            };
            let time = ratio(r.step_ms, lora.and_then(|l| l.step_ms));
            let peak = ratio(
                r.peak_bytes.map(|b| b as f64),
                lora.and_then(|l| l.peak_bytes).map(|b| b as f64),
            );
            let step = match (&r.error, r.step_ms) {
                (Some(e), _) => format!("failed: {}", e.chars().take(80).collect::<String>()),
                (None, Some(ms)) => format!("{ms:.1}"),
                (None, None) => "–".into(),
            };
            s += &format!(
                "| {} | {} × {} | {}×{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
                r.label,
                r.layers,
                r.d_model,
                r.batch,
                r.seq,
                r.adapter,
                step,
                r.tokens_per_s.map_or("–".into(), |t| format!("{t:.0}")),
                cell_gib(r.weights_bytes),
                cell_gib(r.adapter_bytes),
                cell_gib(r.optimizer_bytes),
                cell_gib(r.activation_bytes),
                cell_gib(r.steady_bytes),
                cell_gib(r.peak_bytes),
                gib(r.host_store_bytes),
                r.h2d_bytes / 1e6,
                r.d2h_bytes / 1e6,
                r.exposed_transfer_ms,
                time,
                peak,
            );
        }
        s
    }
}

impl TrainBenchRow {
    /// A Markdown table of the MEFT rows' host-side stages (ms per step, all layers).
    pub fn stage_table(rows: &[TrainBenchRow]) -> String {
        let mut s = String::from(
            "| run | adapter | step ms | active rows | read-back ms | select ms | gather ms | copy ms | \
             grads read ms | sparse AdamW ms | wait for update ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows {
            let (Some(m), Some(step)) = (r.meft_stages, r.step_ms) else {
                continue;
            };
            s += &format!(
                "| {} | {} | {step:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                r.label,
                r.adapter,
                r.active_rows,
                m.readback_ms,
                m.select_ms,
                m.gather_ms,
                m.copy_ms,
                m.grads_read_ms,
                m.sparse_adamw_ms,
                m.wait_update_ms
            );
        }
        s
    }
}

/// An adapter spec without its N: `dense`, `meft K64`.
fn group(adapter: &str) -> String {
    let parts: Vec<&str> = adapter.split(':').collect();
    match parts.as_slice() {
        [family, _, k] => format!("{family} K{k}"),
        [family, ..] => family.to_string(),
        [] => String::new(),
    }
}

impl TrainBenchResult {
    /// Writes the sweep plots next to `json` (same stem): GPU peak memory and step time against
    /// N per family (when some family has two or more N at one length), and against the
    /// sequence length per adapter (when there are two or more lengths). Returns the files.
    pub fn write_plots(&self, json: &Path) -> Result<Vec<PathBuf>> {
        let stem = json.with_extension("");
        let ok: Vec<&TrainBenchRow> = self.rows.iter().filter(|r| r.error.is_none()).collect();
        let mut out = Vec::new();
        let mut seqs: Vec<usize> = ok.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        for &seq in &seqs {
            let mut mem = Vec::new();
            let mut time = Vec::new();
            // One line per family and K (the adapter spec without its N).
            let mut groups: Vec<String> = Vec::new();
            for r in ok.iter().filter(|r| r.seq == seq && r.neurons.is_some()) {
                let g = group(&r.adapter);
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            for g in groups {
                let mut rows: Vec<&&TrainBenchRow> = ok
                    .iter()
                    .filter(|r| r.seq == seq && r.neurons.is_some() && group(&r.adapter) == g)
                    .collect();
                rows.sort_by_key(|r| r.neurons);
                if rows.len() < 2 {
                    continue;
                }
                let n = |r: &TrainBenchRow| r.neurons.unwrap_or(0) as f64;
                let pts = |f: &dyn Fn(&TrainBenchRow) -> Option<f64>| {
                    rows.iter()
                        .filter_map(|r| f(r).map(|v| (n(r), v)))
                        .collect::<Vec<_>>()
                };
                mem.push(Series {
                    name: format!("{g}: GPU peak"),
                    points: pts(&|r| r.peak_bytes.map(gib)),
                });
                if rows[0].family == "meft" {
                    mem.push(Series {
                        name: format!("{g}: host store"),
                        points: pts(&|r| Some(gib(r.host_store_bytes))),
                    });
                }
                time.push(Series {
                    name: g.clone(),
                    points: pts(&|r| r.step_ms),
                });
            }
            if mem.is_empty() {
                continue;
            }
            let head = &ok[0];
            let what = format!(
                "{} layers × d {}, {}×{}, {}",
                head.layers, head.d_model, head.batch, seq, head.label
            );
            for (suffix, title, y, series) in [
                ("neurons-memory", "Memory vs adapter size", "GiB", mem),
                (
                    "neurons-step",
                    "Step time vs adapter size",
                    "ms per step",
                    time,
                ),
            ] {
                if series.iter().all(|s| s.points.is_empty()) {
                    continue; // e.g. GPU memory on a CPU run
                }
                let path = PathBuf::from(format!("{}-{suffix}-seq{seq}.png", stem.display()));
                LinePlot {
                    title: format!("{title} ({what})"),
                    x_label: "adapter neurons per layer (N)".into(),
                    y_label: y.into(),
                    x_scale: Scale::Log2,
                    series,
                }
                .write_png(&path, 1000, 600)?;
                out.push(path);
            }
        }
        if seqs.len() >= 2 {
            let mut adapters: Vec<&str> = Vec::new();
            for r in &ok {
                if !adapters.contains(&r.adapter.as_str()) {
                    adapters.push(&r.adapter);
                }
            }
            let mut mem = Vec::new();
            let mut speed = Vec::new();
            for a in adapters {
                let rows: Vec<&&TrainBenchRow> = ok.iter().filter(|r| r.adapter == a).collect();
                if rows.len() < 2 {
                    continue;
                }
                let pts = |f: &dyn Fn(&TrainBenchRow) -> Option<f64>| {
                    rows.iter()
                        .filter_map(|r| f(r).map(|v| (r.seq as f64, v)))
                        .collect::<Vec<_>>()
                };
                mem.push(Series {
                    name: a.into(),
                    points: pts(&|r| r.peak_bytes.map(gib)),
                });
                speed.push(Series {
                    name: a.into(),
                    points: pts(&|r| r.tokens_per_s),
                });
            }
            for (suffix, title, y, series) in [
                (
                    "seq-memory",
                    "GPU peak memory vs sequence length",
                    "GiB",
                    mem,
                ),
                (
                    "seq-speed",
                    "Throughput vs sequence length",
                    "tokens/s",
                    speed,
                ),
            ] {
                if series.iter().all(|s| s.points.is_empty()) {
                    continue;
                }
                let path = PathBuf::from(format!("{}-{suffix}.png", stem.display()));
                LinePlot {
                    title: title.into(),
                    x_label: "tokens per sequence".into(),
                    y_label: y.into(),
                    x_scale: Scale::Log2,
                    series,
                }
                .write_png(&path, 1000, 600)?;
                out.push(path);
            }
        }
        Ok(out)
    }
}
