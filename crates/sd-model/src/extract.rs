//! The weights two models hold at the same adapter sites, for extracting a LoRA from their
//! difference ([`lora_core::extract`]; kohya's `extract_lora_from_models.py`).
//!
//! [`SitePairs::collect`] walks a base and a tuned model (a UNet, a text encoder) side by
//! side and keeps, for every selected site, both weights in PyTorch layout (`[out, in]`,
//! `[out, in, kh, kw]`). The tensors share the models' storage, so nothing is copied until
//! [`SitePairs::differences`] computes one difference at a time, in f32, for
//! [`lora_core::extract::extract_set`] to approximate while the next one is computed.
//!
//! ```
//! use burn::backend::Flex;
//! use lora_core::extract::{extract_set, ExtractSettings};
//! use sd_model::extract::SitePairs;
//! use sd_model::targets::{Selection, TextEncoderTargets};
//! use sd_model::{ClipTextConfig, ClipTextModel};
//!
//! let device = Default::default();
//! let mut base = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny(), &device).unwrap();
//! let mut tuned = base.clone();
//! let selection = Selection::new(TextEncoderTargets::AttnMlp);
//! let pairs = SitePairs::collect(&mut base, &mut tuned, &|path, conv| selection.selects(path, conv)).unwrap();
//! assert!(!pairs.is_empty());
//! assert_eq!(pairs.max_abs_difference().unwrap(), 0.0); // the same weights
//! let lora = extract_set(pairs.differences(), &ExtractSettings::new(2), 1, &mut |_| {}).unwrap();
//! assert!(lora.set.iter().all(|(_, w)| w.delta().data.iter().all(|&v| v == 0.0)));
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use lora_core::precision::cast_to;
use lora_core::sites::LoraSites;
use lora_core::{AdapterKey, HostTensor, LoraSiteMut};

use crate::{Result, SdModelError};

/// One site's weight in PyTorch layout, as 4-d (`[out, in, 1, 1]` for a linear layer).
struct SiteWeight<B: Backend> {
    path: String,
    weight: Tensor<B, 4>,
    linear: bool,
}

/// The weights of the selected sites of a base and a tuned model, site by site.
pub struct SitePairs<B: Backend> {
    pairs: Vec<(AdapterKey, Tensor<B, 4>, Tensor<B, 4>, bool)>,
}

impl<B: Backend> Default for SitePairs<B> {
    fn default() -> Self {
        Self { pairs: Vec::new() }
    }
}

fn site_weights<B: Backend>(model: &mut impl LoraSites<B>, select: &dyn Fn(&str, bool) -> bool) -> Vec<SiteWeight<B>> {
    let mut weights = Vec::new();
    model.visit_lora_sites(&mut |path, site| {
        // A LoRA holds weight matrices: norm layers are not extracted.
        if site.is_norm() || !select(path, site.is_conv()) {
            return;
        }
        let (weight, linear) = match site {
            LoraSiteMut::Linear(layer) => {
                // burn stores a linear weight as `[in, out]`.
                let w = layer.base.weight.val().transpose();
                let [out, input] = w.dims();
                (w.reshape([out, input, 1, 1]), true)
            }
            LoraSiteMut::Conv(layer) => (layer.base.weight.val(), false),
            LoraSiteMut::Norm(_) => return,
        };
        weights.push(SiteWeight { path: path.to_string(), weight, linear });
    });
    weights
}

impl<B: Backend> SitePairs<B> {
    /// Pairs the sites of `base` and `tuned` (the same component of two models) that
    /// `select(path, is_conv)` picks. Models of different architectures (a site missing in
    /// one, or of another shape) are an error naming the first such site.
    pub fn collect(base: &mut impl LoraSites<B>, tuned: &mut impl LoraSites<B>, select: &dyn Fn(&str, bool) -> bool) -> Result<Self> {
        let component = base.component();
        let mismatch = |reason: String| SdModelError::BadInput {
            what: format!("the tuned model's {}", component.name()),
            reason: format!("{reason}: the two models must share one architecture (SD1.x, SD2.x or SDXL)"),
        };
        let (base_sites, tuned_sites) = (site_weights(base, select), site_weights(tuned, select));
        if base_sites.len() != tuned_sites.len() {
            return Err(mismatch(format!("it has {} adapter sites, the base model {}", tuned_sites.len(), base_sites.len())));
        }
        let mut pairs = Vec::with_capacity(base_sites.len());
        for (b, t) in base_sites.into_iter().zip(tuned_sites) {
            if b.path != t.path || b.linear != t.linear || b.weight.dims() != t.weight.dims() {
                return Err(mismatch(format!(
                    "`{}` {:?} where the base model has `{}` {:?}",
                    t.path,
                    t.weight.dims(),
                    b.path,
                    b.weight.dims()
                )));
            }
            pairs.push((AdapterKey::new(component, b.path), b.weight, t.weight, b.linear));
        }
        Ok(Self { pairs })
    }

    /// Adds another component's pairs.
    pub fn extend(&mut self, other: SitePairs<B>) {
        self.pairs.extend(other.pairs);
    }

    /// How many sites are paired.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no site is paired.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The paired sites' keys, in the models' order.
    pub fn keys(&self) -> impl Iterator<Item = &AdapterKey> {
        self.pairs.iter().map(|(k, ..)| k)
    }

    /// The largest `|W_tuned − W_base|` over all pairs (0 for none): kohya's test of
    /// whether a text encoder was trained at all (`--min_diff`).
    pub fn max_abs_difference(&self) -> Result<f32> {
        let mut largest = 0f32;
        for (_, base, tuned, _) in &self.pairs {
            let d = (cast_to(tuned.clone(), DType::F32) - cast_to(base.clone(), DType::F32)).abs().max();
            let d = HostTensor::from_tensor(d)?;
            largest = largest.max(d.data[0]);
        }
        Ok(largest)
    }

    /// `W_tuned − W_base` of each pair in f32 (`[out, in]` for linear layers, `[out, in,
    /// kh, kw]` for convolutions), computed as the iterator is advanced.
    pub fn differences(self) -> impl Iterator<Item = lora_core::Result<(AdapterKey, HostTensor)>> {
        self.pairs.into_iter().map(|(key, base, tuned, linear)| {
            let mut diff = HostTensor::from_tensor(cast_to(tuned, DType::F32) - cast_to(base, DType::F32))?;
            if linear {
                diff.shape.truncate(2);
            }
            Ok((key, diff))
        })
    }
}
