//! [`WarmupCosine`]: linear warm-up to the peak, then cosine decay to a floor, as a burn
//! [`LrScheduler`] (its record is the step count, so a resumed run continues the curve).

use burn::lr_scheduler::LrScheduler;
use burn::optim::LearningRate;
use burn::tensor::backend::Backend;

/// Linear warm-up over `warmup` steps, then cosine from `peak` to `peak · min_ratio` at `total`.
#[derive(Debug, Clone, Copy)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total steps of the schedule.
    pub total: usize,
    /// Floor as a fraction of the peak.
    pub min_ratio: f64,
    /// Steps taken so far.
    pub taken: usize,
}

impl WarmupCosine {
    /// A schedule at step 0.
    pub fn new(peak: f64, warmup: usize, total: usize, min_ratio: f64) -> Self {
        Self {
            peak,
            warmup,
            total,
            min_ratio,
            taken: 0,
        }
    }

    /// The learning rate of step `s` (1-based: the first step is 1).
    pub fn at(&self, s: usize) -> f64 {
        if s <= self.warmup {
            return self.peak * s as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((s - self.warmup) as f64 / span).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        self.taken += 1;
        self.at(self.taken)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.taken
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.taken = record;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let mut s = WarmupCosine::new(1.0, 4, 14, 0.1);
        let lrs: Vec<f64> = (0..14).map(|_| s.step()).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]));
        assert!((lrs[13] - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12); // halfway: mean of peak and floor
    }
}
