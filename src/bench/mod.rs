//! Benchmarks behind `meft bench`. Each writes JSON and prints a Markdown table.

mod adapter;
mod kernels;
mod lemo;
mod lemo_check;
mod model;
pub mod plot;
mod train;
mod transfer;

pub use adapter::{AdapterBench, AdapterBenchResult, AdapterMethod};
pub use kernels::{Ceilings, KernelBench, KernelBenchResult, SlotPattern};
pub use lemo::{LemoBench, LemoBenchMode, LemoBenchRow};
pub use lemo_check::{CheckRow, LemoCheck};
pub use model::{ModelBench, ModelBenchResult, Preset};
pub use train::{
    AdapterKind, BudgetProbe, BudgetResult, MeftStages, TrainBench, TrainBenchResult, TrainBenchRow,
};
pub use transfer::{TransferBench, TransferBenchResult};
