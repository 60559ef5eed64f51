//! sd-data's integration tests, one module per area, built as one test binary (a binary per
//! file would compile its own copies of the generic code it uses from the other crates).

mod buckets;
mod captions;
mod dataset;
mod kohya_config;
mod masks;
mod pipeline;
