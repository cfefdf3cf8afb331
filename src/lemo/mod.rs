//! LeMo (arXiv 2501.09767): contextual token sparsity for long-context fine-tuning.
//!
//! Per input and per layer, tokens that carry little information for that layer are
//! *eliminated*: by default ([`Elimination::Backward`]) they are computed in the forward
//! without a graph and left out of the layer's backward, so of their activations only the
//! keys and values are stored and the model's outputs are unchanged; with [`Elimination::Layer`] they skip the
//! layer's attention (as queries) and FFN and pass through on the residual stream, so neither
//! that compute nor its activations exist. Kept tokens attend to
//! every token's key and value ([`KeyScope::All`], the default) or to the kept tokens' only
//! ([`KeyScope::Kept`]: eliminated tokens vanish from the layer, less memory, less context).
//!
//! - [`config`]: the budget and where it applies ([`LemoConfig`]).
//! - [`score`]: exact informativeness (attention received).
//! - [`predictor`]: the per-layer pattern predictors and their loss.
//! - [`difficulty`]: the running per-token misses that choose which tokens' gradient to keep
//!   (`pattern = "difficulty"`).
//! - [`select`]: the selection rule on the host, for patterns chosen there.
//! - [`layer`]: the forward with elimination ([`Lemo`], [`LemoMode`]).
//!
//! Selection, gather and merge are `cube_kernels::tokens` (segment-based and
//! permutation-free); attention runs in the memory-efficient chunked form
//! (`cube_kernels::attention`) with or without elimination.

pub mod config;
pub mod difficulty;
pub mod layer;
pub mod predictor;
pub mod score;
pub mod select;

pub use config::{Elimination, KeyScope, LemoConfig, PatternSource};
pub use difficulty::TokenDifficulty;
pub use layer::{
    eliminate, eliminate_from_backward, eliminated, kept_mask, random_run_scores, random_scores,
    Lemo, LemoAux, LemoMode, LemoPlan,
};
pub use predictor::{bce_with_logits, PatternPredictor};
