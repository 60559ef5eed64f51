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
//! ## LoRA on a model of your own
//!
//! Build the layers to adapt as [`LoraLinear`] / [`LoraConv2d`], name them by module path
//! with [`sites::LoraSites`], and the rest works by path: attach, train with
//! [`optim::FlatAdamW`] (made after the adapters are attached), save, load, merge. Keys are
//! per [`Component`]; a model that is no part of Stable Diffusion can use
//! [`Component::Unet`] (kohya keys `lora_unet_<path>`).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::module::{AutodiffModule, Module};
//! use burn::nn::LinearConfig;
//! use burn::optim::GradientsParams;
//! use burn::tensor::{backend::Backend, Distribution, Tensor};
//! use lora_core::optim::{AdamWSettings, FlatAdamW};
//! use lora_core::sites::{self, LoraSites};
//! use lora_core::{AdapterFormat, AdapterSet, Component, LoraConfig, LoraLinear, LoraSiteMut, ModuleIndex, ReadOptions, SaveDtype};
//!
//! #[derive(Module, Debug)]
//! struct Mlp<B: Backend> { fc1: LoraLinear<B>, fc2: LoraLinear<B> }
//! impl<B: Backend> Mlp<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.fc2.forward(burn::tensor::activation::relu(self.fc1.forward(x)))
//!     }
//! }
//! impl<B: Backend> LoraSites<B> for Mlp<B> {
//!     fn component(&self) -> Component { Component::Unet }
//!     fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
//!         f("fc1", LoraSiteMut::Linear(&mut self.fc1));
//!         f("fc2", LoraSiteMut::Linear(&mut self.fc2));
//!     }
//! }
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let base = |d: &_| Mlp { fc1: LoraLinear::new(LinearConfig::new(8, 16).init(d)), fc2: LoraLinear::new(LinearConfig::new(16, 4).init(d)) };
//! let mut model: Mlp<B> = base(&device);
//! assert_eq!(sites::attach_new_adapters(&mut model, &LoraConfig::new(4), &device)?, 2);
//! let mut optim = FlatAdamW::new(AdamWSettings::default(), &model, &device);
//! let x = Tensor::<B, 2>::random([32, 8], Distribution::Default, &device);
//! for _ in 0..5 {
//!     let loss = model.forward(x.clone()).powi_scalar(2).mean();
//!     let grads = optim.gather_grads(&model, GradientsParams::from_grads(loss.backward(), &model));
//!     model = optim.step(1e-2, model, grads);
//! }
//!
//! // Save in kohya's layout, load into another copy of the model and merge there.
//! let mut set = AdapterSet::new();
//! sites::collect_adapters(&mut model, &mut set)?;
//! let file = std::env::temp_dir().join(format!("lora-core-doc-{}.safetensors", std::process::id()));
//! set.save(&file, AdapterFormat::Kohya, SaveDtype::F32)?;
//! let trained = model.valid();
//! let mut other = trained.clone();
//! sites::detach_adapters(&mut other);
//! let mut index = ModuleIndex::new();
//! sites::add_to_index(&mut index, &mut other)?;
//! let (loaded, _) = AdapterSet::load(&file, &index, ReadOptions::default())?;
//! assert_eq!(sites::attach_adapters(&mut other, &loaded, 1.0, &device)?, 2);
//! sites::merge_adapters(&mut other);
//! let x = x.inner();
//! other.forward(x.clone()).into_data().assert_approx_eq::<f32>(&trained.forward(x).into_data(), Default::default());
//! # std::fs::remove_file(&file).unwrap();
//! # Ok::<(), lora_core::LoraError>(())
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
//!
//! ## Depending on this crate
//!
//! Its API takes and returns [burn](https://burn.dev) 0.21 types (`Tensor<B, D>`,
//! `Module<B>`, backends). Use the same burn, re-exported as [`lora_core::burn`](crate::burn),
//! or depend on `burn = "=0.21.0"` yourself: a second burn version's types would not fit.
//! Train on one thread per process (see "Threads" above): a workspace of your own needs
//! `RUST_TEST_THREADS = "1"` in its own `.cargo/config.toml` `[env]` for tests that train,
//! since this workspace's setting does not reach dependents.
#![deny(missing_docs)]

/// The burn this crate is built on (0.21), for its API's types without a burn dependency of
/// one's own.
pub use burn;

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
