//! A set of adapters keyed by model component and dotted module path.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{LoraError, LoraWeights, Result};

/// The model component an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The denoising UNet.
    Unet,
    /// The (first) CLIP text encoder.
    TextEncoder,
    /// The second text encoder of two-encoder models (SDXL's OpenCLIP bigG).
    TextEncoder2,
}

impl Component {
    /// All components.
    pub const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];

    /// Prefix of kohya keys, without the trailing underscore (`lora_unet`, `lora_te`, `lora_te2`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
            Component::TextEncoder2 => "lora_te2",
        }
    }

    /// The component's name in messages: `UNet`, `text encoder`, `text encoder 2`.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "text encoder 2",
        }
    }

    /// Prefix of diffusers/PEFT keys (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn peft_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Where an adapter attaches: a component and a dotted module path inside it, such as
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
/// `text_model.encoder.layers.0.self_attn.q_proj`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    /// The component.
    pub component: Component,
    /// The module path inside the component, as diffusers/transformers name it.
    pub path: String,
}

impl AdapterKey {
    /// Builds a key.
    pub fn new(component: Component, path: impl Into<String>) -> Self {
        Self {
            component,
            path: path.into(),
        }
    }

    /// The kohya name of the module: prefix plus the path with `.` replaced by `_`
    /// (`lora_unet_down_blocks_0_..._to_q`).
    pub fn kohya_name(&self) -> String {
        format!("{}_{}", self.component.kohya_prefix(), self.path.replace('.', "_"))
    }

    /// The diffusers/PEFT name of the module (`unet.down_blocks.0.....to_q`).
    pub fn peft_name(&self) -> String {
        format!("{}.{}", self.component.peft_prefix(), self.path)
    }
}

impl fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.peft_name())
    }
}

/// The module paths a model exposes for adapters, per component.
///
/// Kohya names replace every `.` by `_`, which cannot be undone blindly because module names
/// themselves contain underscores (`transformer_blocks`, `to_out.0`, `proj_in`). Resolving
/// a kohya key therefore looks the name up among the model's real paths.
///
/// ```
/// use lora_core::{Component, ModuleIndex};
/// let mut index = ModuleIndex::new();
/// index.add(Component::Unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]).unwrap();
/// let key = index
///     .resolve_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
///     .unwrap();
/// assert_eq!(key.path, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0");
/// ```
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    by_kohya: HashMap<String, AdapterKey>,
    /// Other names files use for the same modules (kohya's SDXL files name the UNet's
    /// modules as the original SGM code does: `lora_unet_input_blocks_4_1_...`).
    aliases: HashMap<String, AdapterKey>,
    /// What each module is, where recorded: convolutions by kernel, for adapters stored
    /// with the kernel flattened (LyCORIS) or as a linear layer's (2-d).
    kinds: HashMap<AdapterKey, ModuleKind>,
}

/// What a [`ModuleIndex`] records of a module's layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModuleKind {
    Linear,
    Conv([usize; 2]),
    /// Models of the index disagree (SD1.x's `proj_in` is a 1x1 convolution, SD2.x's a
    /// linear layer): an adapter keeps the shape its file gives.
    Mixed,
}

impl ModuleIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the module paths of one component. Fails if two paths collapse to one kohya name.
    pub fn add<I, S>(&mut self, component: Component, paths: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for path in paths {
            let key = AdapterKey::new(component, path.as_ref());
            let name = key.kohya_name();
            if let Some(prev) = self.by_kohya.get(&name) {
                if prev != &key {
                    return Err(LoraError::AmbiguousModuleName {
                        kohya: name,
                        first: prev.path.clone(),
                        second: key.path,
                    });
                }
                continue;
            }
            self.by_kohya.insert(name, key);
        }
        Ok(())
    }

    /// Makes the kohya module name `name` (with its `lora_unet_` / `lora_te_` prefix)
    /// resolve to `key`, a module already added, as a second name for it. Fails if `name`
    /// already names another module.
    ///
    /// ```
    /// use lora_core::{AdapterKey, Component, ModuleIndex};
    /// let mut index = ModuleIndex::new();
    /// let path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    /// index.add(Component::Unet, [path]).unwrap();
    /// let key = AdapterKey::new(Component::Unet, path);
    /// index.add_alias("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", key.clone()).unwrap();
    /// assert_eq!(index.resolve_kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"), Some(&key));
    /// assert_eq!(index.len(), 1);
    /// ```
    pub fn add_alias(&mut self, name: impl Into<String>, key: AdapterKey) -> Result<()> {
        let name = name.into();
        if !self.contains(&key) {
            return Err(LoraError::Unsupported(format!("alias `{name}`: `{key}` is not a module of the index")));
        }
        let taken = self.by_kohya.get(&name).or_else(|| self.aliases.get(&name));
        if let Some(prev) = taken {
            if prev != &key {
                return Err(LoraError::AmbiguousModuleName {
                    kohya: name,
                    first: prev.path.clone(),
                    second: key.path,
                });
            }
            return Ok(());
        }
        self.aliases.insert(name, key);
        Ok(())
    }

    /// Records that the module at `key` is a convolution with kernel `[kh, kw]` (what
    /// [`crate::sites::add_to_index`] does for each conv site, 1x1 ones too): adapters of
    /// it that a file stores 2-d (LyCORIS' LoHa / LoKr keep the kernel flattened into the
    /// columns) are then read in the conv layout, as kohya's and PEFT's conv modules load
    /// them. An index of several models that record another kernel, or a linear layer,
    /// at the same path (SD1.x's `proj_in` is a 1x1 convolution, SD2.x's a linear layer)
    /// knows no kernel there.
    pub fn set_kernel(&mut self, key: AdapterKey, kernel: [usize; 2]) {
        self.record(key, ModuleKind::Conv(kernel));
    }

    /// Records that the module at `key` is a linear layer (see [`set_kernel`](Self::set_kernel)).
    pub(crate) fn set_linear(&mut self, key: AdapterKey) {
        self.record(key, ModuleKind::Linear);
    }

    fn record(&mut self, key: AdapterKey, kind: ModuleKind) {
        let entry = self.kinds.entry(key).or_insert(kind);
        if *entry != kind {
            *entry = ModuleKind::Mixed;
        }
    }

    /// The kernel recorded for `key` with [`set_kernel`](Self::set_kernel); `None` for a
    /// module not recorded as a convolution, or recorded otherwise too.
    ///
    /// ```
    /// use lora_core::{AdapterKey, Component, ModuleIndex};
    /// let key = AdapterKey::new(Component::Unet, "down_blocks.0.resnets.0.conv1");
    /// let mut index = ModuleIndex::new();
    /// index.add(Component::Unet, [&key.path]).unwrap();
    /// index.set_kernel(key.clone(), [3, 3]);
    /// assert_eq!(index.kernel(&key), Some([3, 3]));
    /// // Another model of the index has another kernel there: unknown.
    /// index.set_kernel(key.clone(), [1, 1]);
    /// assert_eq!(index.kernel(&key), None);
    /// ```
    pub fn kernel(&self, key: &AdapterKey) -> Option<[usize; 2]> {
        match self.kinds.get(key) {
            Some(ModuleKind::Conv(kernel)) => Some(*kernel),
            _ => None,
        }
    }

    /// Number of module paths.
    pub fn len(&self) -> usize {
        self.by_kohya.len()
    }

    /// Whether no paths were added.
    pub fn is_empty(&self) -> bool {
        self.by_kohya.is_empty()
    }

    /// Whether `key` is one of the model's modules.
    pub fn contains(&self, key: &AdapterKey) -> bool {
        self.by_kohya
            .get(&key.kohya_name())
            .is_some_and(|k| k == key)
    }

    /// Resolves a kohya module name (without `.lora_down.weight` etc.). `lora_te1_` is
    /// accepted as an alias of `lora_te_` (SDXL files name the first encoder so).
    pub fn resolve_kohya(&self, name: &str) -> Option<&AdapterKey> {
        if let Some(rest) = name.strip_prefix("lora_te1_") {
            return self.by_kohya.get(&format!("lora_te_{rest}"));
        }
        self.by_kohya.get(name).or_else(|| self.aliases.get(name))
    }

    /// The component of a bare module path when it belongs to exactly one component.
    pub fn component_of(&self, path: &str) -> Option<Component> {
        let mut found = Component::ALL
            .into_iter()
            .filter(|c| self.contains(&AdapterKey::new(*c, path)));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// Adapters keyed by [`AdapterKey`], plus free-form string metadata (kept in file headers,
/// e.g. `ss_base_model_version`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterSet {
    adapters: BTreeMap<AdapterKey, LoraWeights>,
    /// String metadata written to and read from the safetensors header.
    pub metadata: BTreeMap<String, String>,
    /// Module names to write in the kohya layout instead of [`AdapterKey::kohya_name`]
    /// (with their `lora_unet_` / `lora_te1_` prefix): kohya's SDXL files name the UNet's
    /// modules by their original SGM paths and the first encoder `lora_te1_`. Reading a
    /// kohya file records the names it used where they differ, so a file keeps its names
    /// through `convert`, `resize` and `combine`.
    pub kohya_names: BTreeMap<AdapterKey, String>,
    /// Textual-inversion embeddings bundled in the file (A1111's `bundle_emb.NAME.KEY`),
    /// keyed `NAME.KEY` as read: not adapters, written back with the set.
    pub bundled_embeddings: BTreeMap<String, crate::HostTensor>,
}

impl AdapterSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts an adapter after validating it, replacing any adapter at the same key.
    pub fn insert(&mut self, key: AdapterKey, weights: LoraWeights) -> Result<()> {
        weights.validate(&key.to_string())?;
        self.adapters.insert(key, weights);
        Ok(())
    }

    /// The adapter at `key`.
    pub fn get(&self, key: &AdapterKey) -> Option<&LoraWeights> {
        self.adapters.get(key)
    }

    /// Removes and returns the adapter at `key` (and its kohya name).
    pub fn remove(&mut self, key: &AdapterKey) -> Option<LoraWeights> {
        self.kohya_names.remove(key);
        self.adapters.remove(key)
    }

    /// The name of `key`'s module in the kohya layout: its recorded name
    /// ([`kohya_names`](Self::kohya_names)) or [`AdapterKey::kohya_name`].
    pub fn kohya_name_of(&self, key: &AdapterKey) -> String {
        self.kohya_names.get(key).cloned().unwrap_or_else(|| key.kohya_name())
    }

    /// The set with every LyCORIS LoHa / LoKr / Tucker LoCon adapter as the plain LoRA with
    /// its update (their [`LoraWeights::lycoris`] dropped): written in the kohya layout, it
    /// is a LoRA file for readers that take no LyCORIS modules. An OFT or a GLoRA,
    /// which have no plain-LoRA form ([`LoraWeights::stands_alone`]), stay as they are.
    pub fn into_plain_lora(mut self) -> Self {
        for w in self.adapters.values_mut().filter(|w| !w.stands_alone()) {
            w.lycoris = None;
        }
        self
    }

    /// Puts each 2-d adapter of a convolution that `index` knows the kernel of
    /// ([`ModuleIndex::kernel`]) in the conv layout (`down [rank, in, kh, kw]`,
    /// `up [out, rank, 1, 1]`), as reading a kohya file with that index does: for a set
    /// read with an index that did not know them (one of several models), once the model
    /// is known. Other adapters stay as they are; returns how many changed.
    ///
    /// ```
    /// use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights, ModuleIndex};
    /// let key = AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in");
    /// let weights = LoraWeights::new(
    ///     HostTensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap(),
    ///     HostTensor::new(vec![2, 1], vec![3.0, 4.0]).unwrap(),
    ///     1.0,
    ///     "proj_in",
    /// )
    /// .unwrap();
    /// let mut set = AdapterSet::new();
    /// set.insert(key.clone(), weights).unwrap();
    /// let mut index = ModuleIndex::new();
    /// index.add(Component::Unet, [&key.path]).unwrap();
    /// index.set_kernel(key.clone(), [1, 1]);
    /// assert_eq!(set.use_conv_layout(&index), 1);
    /// assert_eq!(set.get(&key).unwrap().down.shape, [1, 2, 1, 1]);
    /// assert_eq!(set.get(&key).unwrap().up.shape, [2, 1, 1, 1]);
    /// ```
    pub fn use_conv_layout(&mut self, index: &ModuleIndex) -> usize {
        let mut changed = 0;
        self.adapters = std::mem::take(&mut self.adapters)
            .into_iter()
            .map(|(key, w)| match index.kernel(&key) {
                Some(kernel) => {
                    let before = w.down.shape.len();
                    let w = crate::format::lycoris::unflatten(w, kernel);
                    changed += usize::from(w.down.shape.len() != before);
                    (key, w)
                }
                None => (key, w),
            })
            .collect();
        changed
    }

    /// Adapters in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&AdapterKey, &LoraWeights)> {
        self.adapters.iter()
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// One set applying all `sets` at once, each at its strength (see
    /// [`LoraWeights::combine`]); metadata is taken from the first set, bundled embeddings
    /// from every set (the first's of a name).
    pub fn combine(sets: &[(&AdapterSet, f32)]) -> Result<AdapterSet> {
        let mut keys: Vec<&AdapterKey> = sets.iter().flat_map(|(s, _)| s.adapters.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = AdapterSet::new();
        if let Some((first, _)) = sets.first() {
            out.metadata = first.metadata.clone();
        }
        // Every file's recorded names and bundled embeddings (the first file's where they differ).
        for (set, _) in sets.iter().rev() {
            out.kohya_names.extend(set.kohya_names.clone());
            out.bundled_embeddings.extend(set.bundled_embeddings.clone());
        }
        for key in keys {
            let parts: Vec<(&LoraWeights, f32)> = sets
                .iter()
                .filter_map(|(s, strength)| s.get(key).map(|w| (w, *strength)))
                .collect();
            out.insert(key.clone(), LoraWeights::combine(&parts, &key.to_string())?)?;
        }
        Ok(out)
    }

    /// Adapters whose key is not in `index` (for checking a set against a model).
    pub fn unknown_keys<'a>(&'a self, index: &'a ModuleIndex) -> impl Iterator<Item = &'a AdapterKey> + 'a {
        self.adapters.keys().filter(move |k| !index.contains(k))
    }
}
