//! # lora-core
//!
//! Low-rank adaptation (LoRA) for [burn](https://burn.dev) models, independent of any
//! particular network:
//!
//! - [`LoraConfig`]: rank, alpha, dropout, rsLoRA scaling and initialisation;
//! - [`LoraLinear`] and [`LoraConv2d`] (LoCon): frozen base layers holding an optional
//!   adapter that can be attached, detached, merged and unmerged in place: a LoRA, or
//!   LyCORIS' LoHa, LoKr, Diag-OFT, BOFT, GLoRA or (IA)³ ([`lycoris`], [`Algo`], [`glora`],
//!   [`ia3`]), kohya's OFT
//!   ([`oft`]), or a DyLoRA
//!   trained a chunk of ranks at a time ([`dylora`]);
//! - [`AdapterSet`]: adapters keyed by component and module path, read from and written to
//!   the kohya / A1111 / ComfyUI layout and the diffusers / PEFT layout
//!   ([`AdapterFormat`]), in f32, f16 or bf16 ([`SaveDtype`]);
//! - [`kernels`]: where the frozen base convolutions run (a backward pass that keeps no
//!   input for a frozen weight; cuDNN on CUDA with the `cuda` feature);
//! - [`optim`]: AdamW over all adapter tensors at once ([`optim::FlatAdamW`]);
//! - [`resize`]: trained adapters at a lower rank, fixed or chosen per adapter from its
//!   singular values (kohya's `resize_lora.py`);
//! - [`extract`]: a LoRA from the difference of two models' weights, by a randomized
//!   truncated SVD (kohya's `extract_lora_from_models.py`);
//! - [`inspect`]: what a LoRA file holds (layout, modules, ranks, metadata), from its
//!   header alone;
//! - [`guard`]: gradient clipping, non-finite skips and f16 loss scaling decided on the
//!   device ([`guard::StepGuard`]), so that a training loop needs no host read per step.
//!
//! The update of an adapter of rank `r` on a weight `W` is
//! `ΔW = multiplier · scale · up · down`, with `scale = alpha / r` (or `alpha / sqrt(r)`
//! with rsLoRA). Base parameters never require gradients, so backward passes compute
//! gradients for the adapters only. A fresh adapter draws its initial weights from burn's
//! backend RNG, or with [`LoraConfig::init_seed`] (one seed per module path from
//! [`adapter_seed`]) from a host stream of its own: then the same on every backend.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::tensor::Tensor;
//! use lora_core::{LoraConfig, LoraLinear};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LoraLinear::new(LinearConfig::new(8, 8).init::<B>(&device));
//! layer.attach_new(&LoraConfig::new(2), &device).unwrap();
//! let loss = layer.forward(Tensor::<B, 2>::ones([1, 8], &device)).sum();
//! let grads = loss.backward();
//! let adapter = layer.adapter.as_ref().unwrap();
//! assert!(adapter.up.weight.grad(&grads).is_some());
//! assert!(layer.base.weight.grad(&grads).is_none()); // frozen
//! ```
//!
//! ## Threads
//!
//! Train on one thread per process. In burn 0.21 a `backward()` on one thread can free
//! autodiff steps of a graph another thread is still building, and that thread's gradients
//! then silently lack a term ([tracel-ai/burn#5573](https://github.com/tracel-ai/burn/issues/5573),
//! fixed after 0.21). It needs a parameter reused after a backward pass, which every
//! training loop does, so two models trained on two threads of one process can each lose
//! gradients; the `trainer` binary does all autodiff work on one thread. This workspace's
//! tests run one at a time for the same reason (`RUST_TEST_THREADS` in
//! `.cargo/config.toml`).
#![deny(missing_docs)]

mod adapters;
mod config;
mod conv;
pub mod dylora;
mod error;
pub mod extract;
mod format;
pub mod frozen;
pub mod full;
pub mod glora;
pub mod ia3;
pub mod guard;
pub mod inspect;
pub mod kernels;
mod init;
mod linalg;
mod linear;
pub mod lycoris;
pub mod norm;
pub mod oft;
pub mod optim;
pub mod precision;
mod rank_dropout;
pub mod resize;
pub mod sites;
pub mod tensor_io;
mod weights;

pub use adapters::{AdapterKey, AdapterSet, Component, ModuleIndex};
pub use config::{Algo, LoraConfig, LoraInit};
pub use conv::{Conv2dAdapter, LoraConv2d};
pub use error::{LoraError, Result};
pub use init::{adapter_seed, seeded_normal};
pub use format::{detect_format, AdapterFormat, ReadOptions, ReadReport, BUNDLED_EMBEDDING_PREFIX};
pub use linear::{LinearAdapter, LoraLinear};
pub use sites::{LoraSiteMut, LoraSites};
pub use tensor_io::SaveDtype;
pub use lycoris::LycorisAdapter;
pub use weights::{HostTensor, LoraWeights, LycorisWeights};
