//! Numerical guards: a non-finite loss or device-parameter gradient is caught at the step it
//! happens, named (the parameter's module path), and the step is skipped or the run stopped
//! per [`NonFinitePolicy`]. The MEFT rows' gradients are checked by the host worker as it
//! reads them back (`Error::NonFinite` naming the layer and row; that layer is left untouched).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// What a training step whose loss or gradients hold NaN or infinity does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the run with an error naming the step and the parameter (the last checkpoint is
    /// kept).
    #[default]
    Stop,
    /// Skip the step's update (the data advances, nothing is updated), report it, and go on;
    /// the run stops anyway after `max_skipped` skipped steps in a row.
    Skip,
}

struct Scan<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    names: Vec<String>,
    counts: Vec<Tensor<B::InnerBackend, 1, Int>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scan<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let bad = g.is_finite().bool_not().int().sum();
            self.names.push(self.path.join("."));
            self.counts.push(bad);
        }
    }
}

/// The first parameter of `module` (by module path) whose gradient in `grads` holds NaN or
/// infinity, and how many of its values do; `None` when all are finite. One small reduction
/// per parameter on the device and one read-back for all of them.
pub fn first_nonfinite_grad<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<(String, i64)> {
    let mut scan = Scan::<B> {
        grads,
        path: Vec::new(),
        names: Vec::new(),
        counts: Vec::new(),
    };
    module.visit(&mut scan);
    if scan.counts.is_empty() {
        return None;
    }
    let counts = Tensor::cat(scan.counts, 0)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .ok()?;
    counts
        .iter()
        .position(|&c| c > 0)
        .map(|i| (scan.names[i].clone(), counts[i]))
}
