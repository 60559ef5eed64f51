//! sd-model's integration tests, one module per area, built as one test binary.
//!
//! One binary instead of one per file: each test crate compiles its own copies of burn's
//! generic code for the backends it uses, so a binary per file costs CI minutes of codegen
//! and linking that one binary pays once. `training.rs` keeps a binary of its own: its
//! tests reseed burn's process-wide random generator and need the draws after it to be
//! theirs alone, while here other modules' tests draw in parallel threads.

mod convert;
mod damaged_checkpoints;
mod long_prompts;
mod lora_sites;
mod manifests;
mod norm_modules;
mod parity;
mod sdxl;
mod tokenizer;
mod unet;
