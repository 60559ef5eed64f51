//! # trainer
//!
//! The thin composition layer of the workspace: configuration ([`config`], and kohya
//! sd-scripts configs read into it by [`kohya`]), the LoRA training loop ([`train`]) and
//! LoRA extraction from two models ([`extract`]) on top of [`lora_core`], [`sd_model`],
//! [`sd_sched`], [`sd_data`] and [`sd_pipeline`] (model loading and sampling, which the
//! training loop's sample images and `trainer generate` use). The `trainer` binary is a
//! command-line front end to this library.
#![deny(missing_docs)]

pub mod bench;
pub mod bench_ops;
pub mod config;
pub mod device_check;
pub mod embedding;
mod error;
pub mod extract;
pub mod kohya;
pub mod metadata;
pub mod plot;
pub mod state;
pub mod tensorboard;
pub mod train;

pub use config::TrainConfig;
pub use error::TrainError;
