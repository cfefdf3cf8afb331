//! Dashboard metrics read from each step's [`LmStepOutput`]: token accuracy, tokens/s, PCIe
//! bytes, share of adapter neurons touched, device memory. (Loss and learning rate use
//! burn-train's own `LossMetric` and `LearningRateMetric`.)

use std::sync::Arc;

use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

use super::model::LmStepOutput;

/// What a [`StepMetric`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepQuantity {
    /// Answer tokens predicted right by argmax, percent (running value: over all tokens).
    TokenAccuracy,
    /// Input tokens per second of wall time.
    TokensPerSec,
    /// MEFT host ↔ device bytes per step, MB.
    PcieMb,
    /// Distinct adapter neurons active in the step, percent of all.
    NeuronsTouched,
    /// Device memory in use, GiB (CUDA).
    DeviceMemory,
    /// LeMo calibration: share of the exact pattern the predictors match, percent.
    PredictorOverlap,
    /// LeMo: share of the step's miss (`Σ 1 − p(target)`) at the tokens kept in the
    /// backward, percent.
    KeptMissShare,
}

impl StepQuantity {
    fn label(self) -> (&'static str, &'static str, bool) {
        match self {
            Self::TokenAccuracy => ("Token Accuracy", "%", true),
            Self::TokensPerSec => ("Throughput", "tok/s", true),
            Self::PcieMb => ("PCIe per step", "MB", false),
            Self::NeuronsTouched => ("Neurons touched", "%", false),
            Self::DeviceMemory => ("GPU memory", "GiB", false),
            Self::PredictorOverlap => ("Pattern overlap", "%", true),
            Self::KeptMissShare => ("Kept miss share", "%", true),
        }
    }

    /// (numerator, denominator) of this step: the running value is Σ num / Σ den.
    fn of(self, o: &LmStepOutput) -> (f64, f64) {
        let s = &o.stats;
        match self {
            Self::TokenAccuracy => (100.0 * o.correct, o.targets as f64),
            Self::TokensPerSec => (o.tokens as f64, s.secs),
            Self::PcieMb => (s.pcie_bytes / 1e6, 1.0),
            Self::NeuronsTouched => (100.0 * s.touched_share, 1.0),
            Self::DeviceMemory => (s.device_bytes.unwrap_or(0.0) / (1u64 << 30) as f64, 1.0),
            Self::PredictorOverlap => o.predictor_overlap.map_or((0.0, 0.0), |v| (100.0 * v, 1.0)),
            Self::KeptMissShare => o.kept_miss_share.map_or((0.0, 0.0), |v| (100.0 * v, 1.0)),
        }
    }
}

/// The step's own measurements, as a metric input.
#[derive(Debug, Clone, Copy)]
pub struct StepInput(LmStepOutput);

impl Adaptor<StepInput> for LmStepOutput {
    fn adapt(&self) -> StepInput {
        StepInput(*self)
    }
}

/// A numeric dashboard metric over one [`StepQuantity`].
#[derive(Clone)]
pub struct StepMetric {
    quantity: StepQuantity,
    name: MetricName,
    current: f64,
    num: f64,
    den: f64,
}

impl StepMetric {
    /// A metric of `quantity`.
    pub fn new(quantity: StepQuantity) -> Self {
        Self {
            quantity,
            name: Arc::new(quantity.label().0.to_string()),
            current: 0.0,
            num: 0.0,
            den: 0.0,
        }
    }
}

fn ratio(n: f64, d: f64) -> f64 {
    if d > 0.0 {
        n / d
    } else {
        0.0
    }
}

impl Metric for StepMetric {
    type Input = StepInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        let (_, unit, higher) = self.quantity.label();
        NumericAttributes {
            unit: Some(unit.to_string()),
            higher_is_better: higher,
        }
        .into()
    }

    fn update(&mut self, item: &StepInput, _: &MetricMetadata) -> SerializedEntry {
        let (n, d) = self.quantity.of(&item.0);
        // A step that does not measure the quantity (e.g. the pattern overlap once LeMo
        // eliminates) keeps showing the last measured value rather than 0.
        if d > 0.0 {
            self.current = ratio(n, d);
        }
        self.num += n;
        self.den += d;
        let unit = self.quantity.label().1;
        SerializedEntry::new(
            format!("{:.2} {unit}", self.current),
            format!("{:.6}", self.current),
        )
    }

    fn clear(&mut self) {
        self.num = 0.0;
        self.den = 0.0;
    }
}

impl Numeric for StepMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current)
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(ratio(self.num, self.den))
    }
}
