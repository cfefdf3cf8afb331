//! [`PlainLog`]: a burn-train metrics renderer that prints one line per `every` training steps
//! (and one per validation pass) with every registered metric — for CI, log files and pipes,
//! where the terminal dashboard cannot draw.

use std::collections::HashMap;

use burn::train::metric::{MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

/// Prints metric lines to stderr.
pub struct PlainLog {
    every: usize,
    order: Vec<(MetricId, String)>,
    train: HashMap<MetricId, String>,
    valid: HashMap<MetricId, String>,
    total_steps: usize,
}

impl PlainLog {
    /// A renderer printing every `every` steps of a `total_steps`-step run.
    pub fn new(every: usize, total_steps: usize) -> Self {
        Self {
            every: every.max(1),
            order: Vec::new(),
            train: HashMap::new(),
            valid: HashMap::new(),
            total_steps,
        }
    }

    fn line(&self, values: &HashMap<MetricId, String>) -> String {
        self.order
            .iter()
            .filter_map(|(id, name)| values.get(id).map(|v| format!("{name}: {v}")))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

fn store(map: &mut HashMap<MetricId, String>, state: MetricState) {
    let entry = match state {
        MetricState::Generic(e) | MetricState::Numeric(e, _) => e,
    };
    map.insert(entry.metric_id, entry.serialized_entry.formatted);
}

impl MetricsRendererTraining for PlainLog {
    fn update_train(&mut self, state: MetricState) {
        store(&mut self.train, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        store(&mut self.valid, state);
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let step = item.iteration.unwrap_or(0);
        if step.is_multiple_of(self.every) || step == self.total_steps {
            eprintln!(
                "[train] step {step}/{} | {}",
                self.total_steps,
                self.line(&self.train)
            );
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        if item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total)
        {
            eprintln!(
                "[valid] after round {} | {}",
                item.global_progress.items_processed,
                self.line(&self.valid)
            );
        }
    }
}

impl MetricsRendererEvaluation for PlainLog {
    fn update_test(&mut self, _: EvaluationName, state: MetricState) {
        store(&mut self.valid, state);
    }

    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for PlainLog {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        if !self.order.iter().any(|(id, _)| *id == definition.metric_id) {
            self.order.push((definition.metric_id, definition.name));
        }
    }
}
