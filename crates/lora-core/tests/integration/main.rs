//! lora-core's integration tests, one module per area, built as one test binary.
//!
//! One binary instead of one per file: each test crate compiles its own copies of burn's
//! generic code for the backends it uses, so thirty binaries cost CI minutes of codegen
//! and linking that one binary pays once. Tests that reseed burn's process-wide random
//! generator and need the draws after it to be theirs alone (`optim.rs`, `lycoris_oft.rs`)
//! keep binaries of their own: here, other modules' tests draw in parallel threads.

#[path = "../common/mod.rs"]
mod common;

mod adafactor;
mod ademamix;
mod amsgrad;
mod came;
mod dadapt;
mod dadapt_variants;
mod dora;
mod dylora;
mod formats;
mod grads;
mod laws;
mod lion;
mod locon_tucker;
mod lora_fa;
mod lycoris;
mod lycoris_full;
mod lycoris_glora;
mod lycoris_ia3;
mod lycoris_norm;
mod lycoris_train;
mod max_norm;
mod oft;
mod prodigy;
mod prodigy_plus;
mod rank_dropout;
mod resize;
mod schedule_free;
mod sgd;
