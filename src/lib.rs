//! meft: memory-efficient fine-tuning of large language models on burn.
//!
//! This crate holds the pieces every method builds on: a strict GGUF reader
//! ([`gguf`]), a tokenizer built from GGUF metadata ([`tokenizer`]), a LLaMA-family
//! model generic over burn backends ([`model`]), text generation ([`generate`]), and
//! backend selection ([`backend`]), and the adapters that fine-tune it ([`adapter`]): MEFT's
//! sparse CPU-resident adapter and the dense-adapter and LoRA baselines.

#![warn(missing_docs)]

pub mod adapter;
pub mod backend;
pub mod bench;
pub mod data;
mod error;
pub mod eval;
pub mod fuzz;
pub mod generate;
pub mod gguf;
pub mod lemo;
pub mod model;
pub mod perplexity;
pub mod timeline;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
