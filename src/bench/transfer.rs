//! `meft bench transfer`: adapter rows host → device and row gradients device → host, through
//! the adapter's transfer path (pinned staging where the backend allows it) and through burn's
//! generic `from_data`/`into_data`, beside the raw pinned copy ceiling measured in the same run.
//! Every transfer is checked: the bytes that arrive equal the rows gathered (an error otherwise).

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::model::median;
use crate::adapter::meft::AdapterStore;
use crate::adapter::transfer::{raw_pinned_h2d_secs, to_device, to_host_f32, upload_rows};
use crate::backend::BackendTask;
use crate::{Error, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct TransferBench {
    /// Model width d (a row is 2·d floats).
    pub d_model: usize,
    /// Store size N.
    pub neurons: usize,
    /// Row counts to ship.
    pub rows: Vec<usize>,
    /// Timed repeats per size.
    pub iters: usize,
    /// Row label.
    pub label: String,
}

/// One row count's figures (medians).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferBenchResult {
    /// Row label.
    pub label: String,
    /// Rows shipped.
    pub rows: usize,
    /// Bytes shipped (rows × 2d × 4).
    pub bytes: usize,
    /// Adapter path: gather into the staging buffer, ms.
    pub gather_ms: f64,
    /// Adapter path: the copies to the device, ms (timed by device events on the pinned path;
    /// the whole generic upload elsewhere).
    pub upload_ms: f64,
    /// Adapter path bandwidth, GB/s (bytes / copy time).
    pub upload_gbps: f64,
    /// Adapter path, whole call: gather and copy, pipelined in chunks, ms.
    pub pipeline_ms: f64,
    /// Generic `from_data` of the gathered rows, ms.
    pub from_data_ms: f64,
    /// Generic path bandwidth, GB/s.
    pub from_data_gbps: f64,
    /// Raw pinned copy of the same bytes, ms (CUDA only).
    pub raw_pinned_ms: Option<f64>,
    /// Raw pinned bandwidth, GB/s (CUDA only).
    pub raw_pinned_gbps: Option<f64>,
    /// Adapter path bandwidth / raw pinned bandwidth.
    pub upload_share_of_raw: Option<f64>,
    /// Adapter path read-back of the same tensor, ms.
    pub download_ms: f64,
    /// Adapter path read-back bandwidth, GB/s.
    pub download_gbps: f64,
    /// Generic `into_data`, ms.
    pub into_data_ms: f64,
    /// Generic read-back bandwidth, GB/s.
    pub into_data_gbps: f64,
}

fn gbps(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

impl BackendTask for TransferBench {
    type Output = Vec<TransferBenchResult>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<TransferBenchResult>> {
        let d = self.d_model;
        let w = 2 * d;
        if self.iters == 0 || self.rows.iter().any(|&r| r == 0 || r > self.neurons) {
            return Err(Error::Other(format!(
                "transfer bench: iters must be >= 1 and row counts in 1..={}",
                self.neurons
            )));
        }
        let store = AdapterStore::init_random(self.neurons, d, 1.0, 1.0, 5);
        let mut out = Vec::new();
        for &count in &self.rows {
            let mut rng = StdRng::seed_from_u64(count as u64);
            let mut rows: Vec<u32> = sample(&mut rng, self.neurons, count)
                .into_iter()
                .map(|j| j as u32)
                .collect();
            rows.sort_unstable();
            let want = store.gather_rows(&rows);
            let bytes = count * w * 4;
            let (mut gather, mut upload, mut from_data) = (vec![], vec![], vec![]);
            let (mut raw, mut download, mut into_data) = (vec![], vec![], vec![]);
            let mut pipeline = vec![];
            for _ in 0..self.iters + 1 {
                let mut up = 0.0;
                let fill = |r: std::ops::Range<usize>, dst: &mut [f32]| {
                    store.gather_rows_into(&rows[r], dst)
                };
                let s = Instant::now();
                let (t, u) = upload_rows::<B>([count, w], &device, DType::F32, fill, &mut up);
                pipeline.push(s.elapsed().as_secs_f64() * 1e3);
                gather.push(u.gather_secs * 1e3);
                upload.push(u.copy_secs * 1e3);

                // Generic read-back first, on a clone; then the adapter path on the (now
                // unshared) tensor itself.
                let s = Instant::now();
                let data = t.clone().into_data();
                into_data.push(s.elapsed().as_secs_f64() * 1e3);
                let generic: Vec<f32> = data
                    .convert::<f32>()
                    .into_vec()
                    .map_err(|e| Error::Other(format!("transfer bench: reading back: {e:?}")))?;
                check(&generic, &want, "into_data of the adapter upload")?;

                let s = Instant::now();
                let (back, _) = to_host_f32(t, &mut 0.0);
                download.push(s.elapsed().as_secs_f64() * 1e3);
                check(&back, &want, "adapter read-back of the adapter upload")?;

                let mut secs = 0.0;
                let (t2, _): (Tensor<B, 2>, u64) =
                    to_device(want.clone(), [count, w], &device, DType::F32, &mut secs);
                B::sync(&device).map_err(|e| Error::Other(format!("sync: {e:?}")))?;
                from_data.push(secs * 1e3);
                drop(t2);

                if let Some(s) = raw_pinned_h2d_secs::<B>(&device, bytes) {
                    raw.push(s * 1e3);
                }
            }
            // The first repeat grows buffers and pools: drop it.
            let m = |v: &[f64]| median(&v[1..]);
            let upload_ms = m(&upload);
            let raw_ms = (raw.len() > 1).then(|| m(&raw));
            out.push(TransferBenchResult {
                label: self.label.clone(),
                rows: count,
                bytes,
                gather_ms: m(&gather),
                upload_ms,
                upload_gbps: gbps(bytes, upload_ms),
                pipeline_ms: m(&pipeline),
                from_data_ms: m(&from_data),
                from_data_gbps: gbps(bytes, m(&from_data)),
                raw_pinned_ms: raw_ms,
                raw_pinned_gbps: raw_ms.map(|r| gbps(bytes, r)),
                upload_share_of_raw: raw_ms.map(|r| r / upload_ms),
                download_ms: m(&download),
                download_gbps: gbps(bytes, m(&download)),
                into_data_ms: m(&into_data),
                into_data_gbps: gbps(bytes, m(&into_data)),
            });
        }
        Ok(out)
    }
}

fn check(got: &[f32], want: &[f32], what: &str) -> Result<()> {
    if got.len() != want.len() {
        return Err(Error::Other(format!(
            "transfer bench: {what}: {} floats arrived, {} were sent",
            got.len(),
            want.len()
        )));
    }
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(Error::Other(format!(
            "transfer bench: {what}: float {i} is {} but {} was sent",
            got[i], want[i]
        )));
    }
    Ok(())
}

impl TransferBenchResult {
    /// A Markdown table, one row per row count.
    pub fn table(results: &[TransferBenchResult]) -> String {
        let opt = |v: Option<f64>, p: usize| v.map_or("–".into(), |v| format!("{v:.p$}"));
        let mut s = String::from(
            "| run | rows | MB | gather ms | copy ms | gather + copy pipelined ms | upload GB/s | from_data GB/s | raw pinned GB/s | upload / raw | read-back GB/s | into_data GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in results {
            s += &format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} | {:.1} | {:.2} |\n",
                r.label,
                r.rows,
                r.bytes as f64 / 1e6,
                r.gather_ms,
                r.upload_ms,
                r.pipeline_ms,
                r.upload_gbps,
                r.from_data_gbps,
                opt(r.raw_pinned_gbps, 1),
                opt(r.upload_share_of_raw, 2),
                r.download_gbps,
                r.into_data_gbps,
            );
        }
        s
    }
}
