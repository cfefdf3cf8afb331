//! Benchmarks behind `meft bench`. Each writes JSON and prints a Markdown table.

mod model;

pub use model::{ModelBench, ModelBenchResult, Preset};
