//! Benchmarks behind `meft bench`. Each writes JSON and prints a Markdown table.

mod adapter;
mod kernels;
mod lemo;
mod lemo_check;
mod model;
mod transfer;

pub use adapter::{AdapterBench, AdapterBenchResult, AdapterMethod};
pub use kernels::{Ceilings, KernelBench, KernelBenchResult};
pub use lemo::{LemoBench, LemoBenchMode, LemoBenchRow};
pub use lemo_check::{CheckRow, LemoCheck};
pub use model::{ModelBench, ModelBenchResult, Preset};
pub use transfer::{TransferBench, TransferBenchResult};
