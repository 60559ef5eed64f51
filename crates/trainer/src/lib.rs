//! # trainer
//!
//! The thin composition layer of the workspace: configuration ([`config`], and kohya
//! sd-scripts configs read into it by [`kohya`]), the LoRA training loop ([`train`]),
//! text-to-image generation ([`generate`]), LoRA extraction from two models ([`extract`])
//! and model loading ([`models`]) on top of
//! [`lora_core`], [`sd_model`], [`sd_sched`] and [`sd_data`]. The `trainer` binary is a
//! command-line front end to this library.
#![deny(missing_docs)]

pub mod bench;
pub mod bench_ops;
pub mod config;
pub mod device_check;
pub mod embedding;
mod error;
pub mod extract;
pub mod generate;
pub mod kohya;
pub mod metadata;
pub mod models;
pub mod plot;
pub mod state;
pub mod tensorboard;
pub mod train;

pub use config::TrainConfig;
pub use error::TrainError;
