//! Benchmarks behind `meft bench`. Each writes JSON and prints a Markdown table.

mod adapter;
mod model;
mod transfer;

pub use adapter::{AdapterBench, AdapterBenchResult, AdapterMethod};
pub use model::{ModelBench, ModelBenchResult, Preset};
pub use transfer::{TransferBench, TransferBenchResult};
