//! # trainer
//!
//! The thin composition layer of the workspace: configuration, command line, the training
//! loop and generation, on top of [`lora_core`], `sd_model`, `sd_sched` and `sd_data`.
//! The `trainer` binary is a front end to this library.
//!
//! This crate is a skeleton until the training-loop milestone lands; see the README.
#![deny(missing_docs)]

/// What the `trainer` binary can do in this build, for its status message.
pub fn status() -> &'static str {
    "trainer: the training loop is not built yet. Available now: the `lora-core` library \
     (LoRA/LoCon layers, merge/unmerge, kohya and diffusers/PEFT adapter files). \
     Run `cargo test --workspace --release` to exercise it."
}
