//! MEFT (arXiv 2406.04984): a large key/value adapter beside each FFN whose parameters and
//! optimizer state stay in host memory; a router on the compute device picks experts, the CPU
//! scores only their neurons and ships the top-K rows per token.
//!
//! - [`config`]: sizes, routing, init ([`MeftConfig`]).
//! - [`store`]: the host parameter store ([`AdapterStore`]).
//! - [`selection`]: CPU scoring and top-K ([`select_active`]).
//! - [`layer`]: the burn module ([`MeftFfn`]) and its host side ([`SparseAdapter`]).
//! - [`optim`]: sparse AdamW on the touched rows ([`SparseAdamW`]).
//! - [`worker`]: the background thread that absorbs row gradients ([`HostWorker`]).
//! - [`shared`]: several data-parallel workers over one store ([`apply_worker_grads`]).

pub mod compute;
pub mod config;
pub mod layer;
pub mod optim;
pub mod selection;
pub mod shared;
pub mod store;
pub mod worker;

pub use config::MeftConfig;
pub use layer::{MeftFfn, Routed, SparseAdapter};
pub use optim::{SparseAdamW, SparseStepStats};
pub use selection::{select_active, ActiveNeurons, Routing, SelectionRule};
pub use shared::{apply_worker_grads, loss_share};
pub use store::AdapterStore;
pub use worker::{HostWorker, RowGrad};
