//! sd-pipeline's integration tests, built as one test binary (one link of the generic
//! model code instead of one per file).

mod common;

mod generate;
