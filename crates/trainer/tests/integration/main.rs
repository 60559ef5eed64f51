//! The trainer's integration tests, one module per area, built as one test binary.
//!
//! One binary instead of one per file: each test crate compiles its own copies of the
//! generic training code for the backends it uses, so a binary per file costs CI minutes
//! of codegen and linking that one binary pays once. Tests that build models or train
//! take `common::seeded()` (burn's random generator is process-wide); `cli` runs the
//! binary in child processes and needs no lock.

mod common;

mod bench;
mod cli;
mod device_check;
mod extract;
mod lr_schedulers;
mod sdxl;
mod tensorboard;
mod train;
