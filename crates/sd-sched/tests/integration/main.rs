//! sd-sched's integration tests, one module per area, built as one test binary (a binary per
//! file would compile its own copies of the generic code it uses from the other crates).

mod common;

mod config_and_training;
mod noise_extras;
mod parity;
mod samplers;
