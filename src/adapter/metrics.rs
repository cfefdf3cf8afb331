//! Transfer metrics for burn-train's dashboard: per-step host ↔ device traffic, transfer
//! time, exposed (non-overlapped) transfer time and CPU time per stage of the MEFT adapters.
//!
//! A [`TransferMetric`] reads the adapters' [`TransferStats`] at each update and reports the
//! change since its previous update (one training step when updated once per step). Its input is
//! `()`, so it plugs into any Learner like burn's CPU-use metric.

use std::sync::Arc;

use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    SerializedEntry,
};

use super::{Adapters, TransferStats};

/// Which figure a [`TransferMetric`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferQuantity {
    /// Host → device MB (rows and indices).
    HostToDeviceMb,
    /// Device → host MB (hidden states, routing, row gradients).
    DeviceToHostMb,
    /// Achieved bandwidth of the row copies, GB/s.
    RowCopyGbps,
    /// Seconds the forward was blocked on copies, ms.
    ExposedTransferMs,
    /// CPU scoring and top-K selection, ms.
    SelectMs,
    /// CPU row gather, ms.
    GatherMs,
    /// Sparse optimizer (on the host worker or in line), ms.
    SparseOptimizerMs,
    /// Forward waiting for a layer's handed-off update, ms.
    WaitUpdateMs,
}

impl TransferQuantity {
    /// Every quantity, for registering them all.
    pub const ALL: [TransferQuantity; 8] = [
        Self::HostToDeviceMb,
        Self::DeviceToHostMb,
        Self::RowCopyGbps,
        Self::ExposedTransferMs,
        Self::SelectMs,
        Self::GatherMs,
        Self::SparseOptimizerMs,
        Self::WaitUpdateMs,
    ];

    fn label(self) -> (&'static str, &'static str) {
        match self {
            Self::HostToDeviceMb => ("MEFT host→device", "MB"),
            Self::DeviceToHostMb => ("MEFT device→host", "MB"),
            Self::RowCopyGbps => ("MEFT row copy bandwidth", "GB/s"),
            Self::ExposedTransferMs => ("MEFT exposed transfer", "ms"),
            Self::SelectMs => ("MEFT CPU selection", "ms"),
            Self::GatherMs => ("MEFT CPU gather", "ms"),
            Self::SparseOptimizerMs => ("MEFT sparse AdamW", "ms"),
            Self::WaitUpdateMs => ("MEFT wait for update", "ms"),
        }
    }

    /// The quantity's value over the traffic `s`.
    pub fn of(self, s: &TransferStats) -> f64 {
        match self {
            Self::HostToDeviceMb => s.to_device() as f64 / 1e6,
            Self::DeviceToHostMb => s.to_host() as f64 / 1e6,
            Self::RowCopyGbps => {
                if s.copy_secs > 0.0 {
                    s.rows_to_device as f64 / s.copy_secs / 1e9
                } else {
                    0.0
                }
            }
            Self::ExposedTransferMs => s.exposed_secs * 1e3,
            Self::SelectMs => s.select_secs * 1e3,
            Self::GatherMs => s.gather_secs * 1e3,
            Self::SparseOptimizerMs => s.optimizer_secs * 1e3,
            Self::WaitUpdateMs => s.wait_update_secs * 1e3,
        }
    }
}

/// A dashboard metric over the MEFT adapters' traffic (see the module docs).
#[derive(Clone)]
pub struct TransferMetric {
    adapters: Adapters,
    quantity: TransferQuantity,
    name: MetricName,
    last: TransferStats,
    current: f64,
    sum: f64,
    count: usize,
}

impl TransferMetric {
    /// A metric of `quantity` over `adapters` (counting from their current totals).
    pub fn new(adapters: Adapters, quantity: TransferQuantity) -> Self {
        let last = adapters.transfer_stats();
        Self {
            adapters,
            quantity,
            name: Arc::new(quantity.label().0.to_string()),
            last,
            current: 0.0,
            sum: 0.0,
            count: 0,
        }
    }

    /// Reads the adapters' totals and returns the quantity since the previous call.
    pub fn sample(&mut self) -> f64 {
        let now = self.adapters.transfer_stats();
        let step = now.since(&self.last);
        self.last = now;
        self.current = self.quantity.of(&step);
        self.sum += self.current;
        self.count += 1;
        self.current
    }
}

impl Metric for TransferMetric {
    type Input = ();

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn description(&self) -> Option<String> {
        Some(format!("{} per step", self.quantity.label().0))
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some(self.quantity.label().1.to_string()),
            higher_is_better: self.quantity == TransferQuantity::RowCopyGbps,
        }
        .into()
    }

    fn update(&mut self, _item: &(), _metadata: &MetricMetadata) -> SerializedEntry {
        let v = self.sample();
        let unit = self.quantity.label().1;
        SerializedEntry::new(format!("{}: {v:.2} {unit}", self.name), format!("{v:.4}"))
    }

    fn clear(&mut self) {
        self.sum = 0.0;
        self.count = 0;
    }
}

impl Numeric for TransferMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current)
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        })
    }
}
