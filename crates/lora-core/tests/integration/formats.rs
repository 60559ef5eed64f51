//! Adapter files: kohya and PEFT layouts, dtypes, key resolution and bad input.

use crate::common;

use std::path::Path;

use common::{damage, damaged, random_weights, rel_err, Rng};
use lora_core::{
    detect_format, AdapterFormat, AdapterKey, AdapterSet, Component, LoraError, LoraWeights, ModuleIndex, ReadOptions, SaveDtype,
};
use proptest::prelude::*;

const UNET_PATHS: &[&str] = &[
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
];
const TE_PATHS: &[&str] = &[
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.11.mlp.fc1",
];

fn index() -> ModuleIndex {
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, UNET_PATHS).unwrap();
    index.add(Component::TextEncoder, TE_PATHS).unwrap();
    index
}

/// A set covering linear, 1x1-conv (4-d) and 3x3-conv adapters with alpha ≠ rank.
fn sample_set(seed: u64) -> AdapterSet {
    let mut rng = Rng::new(seed);
    let mut set = AdapterSet::new();
    let unet = |p: &str| AdapterKey::new(Component::Unet, p);
    set.insert(unet(UNET_PATHS[0]), random_weights(&mut rng, 8, 8, 4, None, 1.0)).unwrap();
    set.insert(unet(UNET_PATHS[1]), random_weights(&mut rng, 8, 8, 4, None, 3.0)).unwrap();
    set.insert(unet(UNET_PATHS[2]), random_weights(&mut rng, 8, 8, 2, Some([1, 1]), 2.0)).unwrap();
    set.insert(unet(UNET_PATHS[3]), random_weights(&mut rng, 4, 8, 2, Some([3, 3]), 1.0)).unwrap();
    set.insert(unet(UNET_PATHS[4]), random_weights(&mut rng, 8, 16, 4, None, 4.0)).unwrap();
    set.insert(
        AdapterKey::new(Component::TextEncoder, TE_PATHS[0]),
        random_weights(&mut rng, 8, 8, 4, None, 0.5),
    )
    .unwrap();
    set.metadata.insert("ss_base_model_version".into(), "sd_v1".into());
    set
}

fn read(bytes: &[u8]) -> Result<(AdapterSet, lora_core::ReadReport), LoraError> {
    AdapterSet::from_bytes(bytes, Path::new("test.safetensors"), &index(), ReadOptions::default())
}

fn assert_same_deltas(a: &AdapterSet, b: &AdapterSet, tol: f64) {
    assert_eq!(a.len(), b.len());
    for (key, wa) in a.iter() {
        let wb = b.get(key).unwrap_or_else(|| panic!("missing {key}"));
        assert_eq!(wa.delta().shape, wb.delta().shape, "{key}");
        let err = rel_err(&wb.delta().data, &wa.delta().data);
        assert!(err <= tol, "{key}: rel err {err}");
    }
}

#[test]
fn kohya_keys_and_metadata() {
    let set = sample_set(1);
    let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    for key in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ] {
        assert!(names.contains(&key), "missing {key}");
    }
    assert_eq!(
        st.tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").unwrap().shape(),
        &[2, 4, 3, 3]
    );
    assert_eq!(
        st.tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").unwrap().shape(),
        &[8, 2, 1, 1]
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert!(meta["ss_network_args"].contains("conv_dim"));
    let (back, report) = read(&bytes).unwrap();
    assert_eq!(report.format, AdapterFormat::Kohya);
    assert!(report.skipped.is_empty());
    assert_eq!(back, set.clone().tap_meta(&back));
}

trait TapMeta {
    fn tap_meta(self, other: &AdapterSet) -> AdapterSet;
}

impl TapMeta for AdapterSet {
    /// Takes `other`'s metadata (written files gain `ss_network_*` and `format` keys).
    fn tap_meta(mut self, other: &AdapterSet) -> AdapterSet {
        self.metadata = other.metadata.clone();
        self
    }
}

#[test]
fn peft_keys_fold_alpha_into_b() {
    let set = sample_set(2);
    let bytes = set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.contains(&"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"));
    assert!(names.contains(&"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"));
    assert!(names.iter().all(|n| !n.ends_with(".alpha")), "PEFT files have no alpha");
    let (back, report) = read(&bytes).unwrap();
    assert_eq!(report.format, AdapterFormat::Peft);
    // alpha = rank after reading, with the scale folded into up: ΔW is unchanged.
    for (_, w) in back.iter() {
        assert_eq!(w.alpha, w.rank() as f32);
    }
    assert_same_deltas(&set, &back, 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn kohya_peft_kohya_round_trip_keeps_delta(seed: u64, dtype in prop_oneof![Just(SaveDtype::F32), Just(SaveDtype::F16), Just(SaveDtype::Bf16)]) {
        let set = sample_set(seed);
        let (peft, _) = read(&set.to_bytes(AdapterFormat::Peft, dtype).unwrap()).unwrap();
        let (kohya, _) = read(&peft.to_bytes(AdapterFormat::Kohya, dtype).unwrap()).unwrap();
        // f16 keeps ~11 bits, bf16 ~8 bits per factor; ΔW sums rank products.
        let tol = match dtype { SaveDtype::F32 => 1e-6, SaveDtype::F16 => 2e-3, SaveDtype::Bf16 => 2e-2 };
        assert_same_deltas(&set, &kohya, tol);
    }

    #[test]
    fn kohya_round_trip_is_exact_in_f32(seed: u64) {
        let set = sample_set(seed);
        let (back, _) = read(&set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap()).unwrap();
        for (key, w) in set.iter() {
            prop_assert_eq!(back.get(key), Some(w));
        }
    }
}

#[test]
fn dtypes_are_written_as_asked() {
    let set = sample_set(3);
    for (dtype, st_dtype) in [
        (SaveDtype::F32, safetensors::Dtype::F32),
        (SaveDtype::F16, safetensors::Dtype::F16),
        (SaveDtype::Bf16, safetensors::Dtype::BF16),
    ] {
        let bytes = set.to_bytes(AdapterFormat::Kohya, dtype).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.iter().all(|(_, v)| v.dtype() == st_dtype));
    }
}

#[test]
fn kohya_names_resolve_through_real_module_paths() {
    let index = index();
    // `to_out_0` must become `to_out.0`, `transformer_blocks` must stay one name.
    let key = index
        .resolve_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
        .unwrap();
    assert_eq!(key.path, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0");
    let key = index.resolve_kohya("lora_te1_text_model_encoder_layers_11_mlp_fc1").unwrap();
    assert_eq!(key.component, Component::TextEncoder);
    assert!(index.resolve_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k").is_none());
    // Paths that collapse to the same kohya name are refused.
    let mut bad = ModuleIndex::new();
    let err = bad.add(Component::Unet, ["a.b_c", "a_b.c"]).unwrap_err();
    assert!(matches!(err, LoraError::AmbiguousModuleName { .. }), "{err}");
}

/// Builds a raw safetensors buffer from (name, shape, values) triples in f32.
fn raw(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let hosts: Vec<(String, lora_core::HostTensor)> = tensors
        .iter()
        .map(|(n, s, d)| (n.to_string(), lora_core::HostTensor::new(s.clone(), d.clone()).unwrap()))
        .collect();
    let refs: Vec<(String, &lora_core::HostTensor)> = hosts.iter().map(|(n, t)| (n.clone(), t)).collect();
    lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap()
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn unknown_keys_error_or_are_skipped_when_lenient() {
    let bytes = raw(&[
        (&format!("{Q}.lora_down.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16]),
        ("lora_unet_no_such_module.lora_down.weight", vec![2, 8], vec![0.0; 16]),
        ("lora_unet_no_such_module.lora_up.weight", vec![8, 2], vec![0.0; 16]),
        ("lora_unet_x.dora_scale", vec![1], vec![1.0]),
    ]);
    let err = read(&bytes).unwrap_err();
    match &err {
        LoraError::UnknownKeys { count, first, path } => {
            assert_eq!(*count, 3);
            assert!(first.iter().any(|k| k.contains("no_such_module")));
            assert_eq!(path, Path::new("test.safetensors"));
        }
        other => panic!("unexpected {other}"),
    }
    let (set, report) = AdapterSet::from_bytes(
        &bytes,
        Path::new("test.safetensors"),
        &index(),
        ReadOptions { lenient: true },
    )
    .unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(report.skipped.len(), 3);
    // Missing alpha means alpha = rank.
    assert_eq!(set.iter().next().unwrap().1.alpha, 2.0);
}

/// Embeddings bundled in a LoRA file (A1111's `bundle_emb.NAME.…`) are not adapters and not
/// unknown keys: a strict read takes the adapters and leaves them; `inspect` lists them.
#[test]
fn bundled_embeddings_ride_along() {
    let bytes = raw(&[
        (&format!("{Q}.lora_down.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16]),
        ("bundle_emb.mystyle.string_to_param.*", vec![2, 8], vec![0.5; 16]),
        ("bundle_emb.other.clip_l", vec![1, 8], vec![0.5; 8]),
        ("bundle_emb.other.clip_g", vec![1, 4], vec![0.5; 4]),
    ]);
    let (set, report) = read(&bytes).unwrap();
    assert_eq!((set.len(), report.skipped.len(), set.bundled_embeddings.len()), (1, 0, 3));
    assert_eq!(set.bundled_embeddings["mystyle.string_to_param.*"].shape, [2, 8]);
    // Written back with the adapters in kohya's layout (so convert / resize keep them);
    // the PEFT layout refuses them (diffusers refuses a LoRA file with such keys).
    let again = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let (back, _) = AdapterSet::from_bytes(&again, Path::new("again.safetensors"), &index(), ReadOptions::default()).unwrap();
    assert_eq!(back.bundled_embeddings, set.bundled_embeddings);
    let err = set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err().to_string();
    assert!(err.contains("bundle_emb.") && err.contains("unbundle-embeddings"), "{err}");
    let mut plain = set.clone();
    plain.bundled_embeddings.clear();
    assert!(plain.to_bytes(AdapterFormat::Peft, SaveDtype::F32).is_ok());
    let resized = lora_core::resize::resize_set(&set, &lora_core::resize::ResizeSettings { rank: 1, conv_rank: 1, rule: lora_core::resize::RankRule::Fixed }).unwrap();
    assert_eq!(resized.set.bundled_embeddings, set.bundled_embeddings);
    let info = lora_core::inspect::inspect(&bytes, Path::new("test.safetensors")).unwrap();
    assert_eq!(info.modules.len(), 1);
    assert_eq!(info.bundled_embeddings.keys().collect::<Vec<_>>(), ["mystyle", "other"]);
    assert_eq!(info.bundled_embeddings["mystyle"], [("string_to_param.*".to_string(), vec![2, 8])]);
}

#[test]
fn malformed_inputs_are_typed_errors() {
    let good = sample_set(4).to_bytes(AdapterFormat::Kohya, SaveDtype::F16).unwrap();
    // Truncated.
    let err = read(&good[..good.len() / 2]).unwrap_err();
    assert!(matches!(err, LoraError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("test.safetensors"));
    // Garbage and empty.
    assert!(matches!(read(b"not a safetensors file").unwrap_err(), LoraError::Malformed { .. }));
    assert!(matches!(read(&[]).unwrap_err(), LoraError::Malformed { .. }));
    // Rank mismatch between down and up.
    let bytes = raw(&[
        (&format!("{Q}.lora_down.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("{Q}.lora_up.weight"), vec![8, 3], vec![0.1; 24]),
    ]);
    let err = read(&bytes).unwrap_err();
    assert!(err.to_string().contains("rank 2") && err.to_string().contains("rank 3"), "{err}");
    // Up without down.
    let bytes = raw(&[(&format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16])]);
    assert!(matches!(read(&bytes).unwrap_err(), LoraError::IncompletePair { .. }));
    // 3-d tensors and non-scalar alpha.
    let bytes = raw(&[
        (&format!("{Q}.lora_down.weight"), vec![2, 8, 1], vec![0.1; 16]),
        (&format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16]),
    ]);
    assert!(matches!(read(&bytes).unwrap_err(), LoraError::BadTensor { .. }));
    let bytes = raw(&[
        (&format!("{Q}.lora_down.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16]),
        (&format!("{Q}.alpha"), vec![2], vec![1.0, 2.0]),
    ]);
    assert!(matches!(read(&bytes).unwrap_err(), LoraError::BadTensor { .. }));
    // NaN or infinite values (a diverged run's file), in a weight or the alpha: refused,
    // naming the tensor, instead of black images and NaN merged into checkpoints.
    for (name, value) in [("lora_down.weight", f32::NAN), ("lora_up.weight", f32::INFINITY), ("alpha", f32::NAN)] {
        let mut tensors = [
            (format!("{Q}.lora_down.weight"), vec![2, 8], vec![0.1; 16]),
            (format!("{Q}.lora_up.weight"), vec![8, 2], vec![0.1; 16]),
            (format!("{Q}.alpha"), vec![], vec![2.0]),
        ];
        let t = tensors.iter_mut().find(|(k, _, _)| k.ends_with(name)).unwrap();
        let last = t.2.len() - 1;
        t.2[last] = value;
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors.iter().map(|(k, s, d)| (k.as_str(), s.clone(), d.clone())).collect();
        let err = read(&raw(&refs)).unwrap_err();
        assert!(matches!(err, LoraError::BadTensor { .. }) && err.to_string().contains(name) && err.to_string().contains("non-finite"), "{err}");
    }
    // A broken safetensors header whose length starts with byte 0x80 is not called a
    // PyTorch pickle (1 file in 256 would be).
    let err = read(b"\x80\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap_err().to_string();
    assert!(!err.contains("pickle"), "{err}");
    // Nor one of 0x280 = 640 bytes, whose second byte looks like a pickle protocol: the
    // header's `{` says safetensors.
    let err = read(b"\x80\x02\x00\x00\x00\x00\x00\x00{\"a\":").unwrap_err().to_string();
    assert!(err.contains("test.safetensors: not a valid safetensors file") && !err.contains("pickle"), "{err}");
    assert!(read(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01").unwrap_err().to_string().contains("pickle"));
    // Not a LoRA at all.
    let bytes = raw(&[("model.diffusion_model.input_blocks.0.0.weight", vec![2], vec![0.0; 2])]);
    assert!(matches!(read(&bytes).unwrap_err(), LoraError::UnknownFormat { .. }));
    // Integer tensors.
    let ids: Vec<u8> = vec![0; 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &ids).unwrap();
    let bytes = safetensors::serialize([(format!("{Q}.lora_down.weight"), view)], None).unwrap();
    assert!(matches!(read(&bytes).unwrap_err(), LoraError::UnsupportedDtype { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A damaged kohya or PEFT file (cut short, a byte overwritten, a tensor left out,
    /// reshaped, filled with NaN or infinities, renamed to another adapter's suffix) reads
    /// as a typed error or as adapters whose updates can be formed and written: never a
    /// panic, strict or lenient.
    #[test]
    fn damaged_files_are_errors_not_panics(peft in any::<bool>(), lenient in any::<bool>(), damage in damage()) {
        let format = if peft { AdapterFormat::Peft } else { AdapterFormat::Kohya };
        let bytes = damaged(&sample_set(5).to_bytes(format, SaveDtype::F16).unwrap(), &damage);
        if let Ok((set, _)) = AdapterSet::from_bytes(&bytes, Path::new("bad.safetensors"), &index(), ReadOptions { lenient }) {
            for (_, w) in set.iter() {
                prop_assert_eq!(w.delta().data.len(), w.delta().shape.iter().product::<usize>());
            }
            set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        }
    }
}

#[test]
fn peft_variants_are_read() {
    // PEFT's own prefix and diffusers' older `.lora.down` naming.
    let p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let bytes = raw(&[
        (&format!("base_model.model.{p}.lora_A.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("base_model.model.{p}.lora_B.weight"), vec![8, 2], vec![0.2; 16]),
    ]);
    let (set, _) = read(&bytes).unwrap();
    assert!(set.get(&AdapterKey::new(Component::Unet, p)).is_some());
    let t = "text_model.encoder.layers.0.self_attn.q_proj";
    let bytes = raw(&[
        (&format!("text_encoder.{t}.lora.down.weight"), vec![2, 8], vec![0.1; 16]),
        (&format!("text_encoder.{t}.lora.up.weight"), vec![8, 2], vec![0.2; 16]),
    ]);
    let (set, _) = read(&bytes).unwrap();
    assert!(set.get(&AdapterKey::new(Component::TextEncoder, t)).is_some());
    // An empty index accepts any PEFT path (used for conversions without a model).
    let bytes = raw(&[
        ("unet.some.new.layer.lora_A.weight", vec![1, 4], vec![0.1; 4]),
        ("unet.some.new.layer.lora_B.weight", vec![4, 1], vec![0.1; 4]),
    ]);
    let (set, _) =
        AdapterSet::from_bytes(&bytes, Path::new("x"), &ModuleIndex::new(), ReadOptions::default()).unwrap();
    assert_eq!(set.len(), 1);
    assert!(read(&bytes).is_err(), "strict with a model index: unknown path");
    // Kohya keys cannot be resolved without the model's paths: the error says how to get them.
    let kohya = raw(&[("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", vec![1, 4], vec![0.1; 4]), ("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", vec![4, 1], vec![0.1; 4])]);
    let err = AdapterSet::from_bytes(&kohya, Path::new("k.safetensors"), &ModuleIndex::new(), ReadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("k.safetensors") && err.contains("add_to_index"), "{err}");
}

#[test]
fn save_is_atomic_and_load_names_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("style.safetensors");
    let set = sample_set(5);
    set.save(&path, AdapterFormat::Kohya, SaveDtype::F16).unwrap();
    let first = std::fs::read(&path).unwrap();
    assert_eq!(detect_format(&first, &path).unwrap(), AdapterFormat::Kohya);
    // Saving into a folder that does not exist fails without touching the earlier file.
    let err = set
        .save(dir.path().join("missing/dir/x.safetensors"), AdapterFormat::Kohya, SaveDtype::F16)
        .unwrap_err();
    assert!(matches!(err, LoraError::Io { .. }));
    let text = err.to_string();
    assert!(text.contains("x.safetensors: its folder") && !text.contains(".tmp-"), "names the output, not a temporary file: {text}");
    set.save(&path, AdapterFormat::Peft, SaveDtype::F32).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), first);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temp files left behind");
    let (loaded, report) = AdapterSet::load(&path, &index(), ReadOptions::default()).unwrap();
    assert_eq!(report.format, AdapterFormat::Peft);
    assert_same_deltas(&set, &loaded, 1e-6);
    let err = AdapterSet::load(dir.path().join("nope.safetensors"), &index(), ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("nope.safetensors"));
}

/// A NaN or infinite value is refused naming the file and the tensor in every layout the
/// reader takes: PEFT, LyCORIS LoHa / LoKr, embeddings bundled in the file, and an F16
/// file whose value overflowed to infinity when it was saved.
#[test]
fn non_finite_values_are_refused_in_every_layout() {
    const PEFT: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let pair = |down: &str, up: &str| vec![(down.to_string(), vec![2, 8], vec![0.1; 16]), (up.to_string(), vec![8, 2], vec![0.1; 16])];
    let peft = pair(&format!("{PEFT}.lora_A.weight"), &format!("{PEFT}.lora_B.weight"));
    let mut loha = pair(&format!("{Q}.hada_w1_b"), &format!("{Q}.hada_w1_a"));
    loha.extend(pair(&format!("{Q}.hada_w2_b"), &format!("{Q}.hada_w2_a")));
    let lokr = vec![(format!("{Q}.lokr_w1"), vec![2, 2], vec![0.1; 4]), (format!("{Q}.lokr_w2"), vec![4, 4], vec![0.1; 16])];
    let mut bundled = pair(&format!("{Q}.lora_down.weight"), &format!("{Q}.lora_up.weight"));
    bundled.push(("bundle_emb.style.string_to_param.*".to_string(), vec![2, 8], vec![0.5; 16]));
    for (mut tensors, bad) in [(peft, "lora_A.weight"), (loha, "hada_w2_a"), (lokr, "lokr_w2"), (bundled, "bundle_emb.style.string_to_param.*")] {
        tensors.iter_mut().find(|(k, _, _)| k.ends_with(bad)).unwrap().2[3] = f32::NAN;
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors.iter().map(|(k, s, d)| (k.as_str(), s.clone(), d.clone())).collect();
        let err = read(&raw(&refs)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LoraError::BadTensor { .. }) && text.contains("test.safetensors") && text.contains(bad) && text.contains("non-finite"), "{text}");
    }
    // 70000 is past F16's largest value: refused when saved; an F16 file holding an
    // infinity (as other tools write one) is refused when read.
    let (down, up) = (lora_core::HostTensor::new(vec![2, 8], vec![0.1; 16]).unwrap(), lora_core::HostTensor::new(vec![8, 2], vec![7e4; 16]).unwrap());
    let tensors = [(format!("{Q}.lora_down.weight"), &down), (format!("{Q}.lora_up.weight"), &up)];
    let text = lora_core::tensor_io::serialize(&tensors, SaveDtype::F16, Default::default()).unwrap_err().to_string();
    assert!(text.contains("lora_up.weight") && text.contains("beyond the range of F16"), "{text}");
    let up = lora_core::HostTensor::new(vec![8, 2], vec![f32::INFINITY; 16]).unwrap();
    let tensors = [(format!("{Q}.lora_down.weight"), &down), (format!("{Q}.lora_up.weight"), &up)];
    let bytes = lora_core::tensor_io::serialize(&tensors, SaveDtype::F16, Default::default()).unwrap();
    let text = read(&bytes).unwrap_err().to_string();
    assert!(text.contains("lora_up.weight") && text.contains("inf"), "{text}");
}

/// Adapters of one module that do not fit together (LoRAs for different models) are an
/// error naming the module and both adapters' shapes, also when only the outputs differ.
#[test]
fn combining_adapters_that_do_not_fit_names_both_shapes() {
    let mut rng = Rng::new(3);
    let key = AdapterKey::new(Component::Unet, UNET_PATHS[0]);
    let set = |w| {
        let mut set = AdapterSet::new();
        set.insert(key.clone(), w).unwrap();
        set
    };
    let base = set(random_weights(&mut rng, 32, 32, 4, None, 1.0));
    for (other, want) in [(random_weights(&mut rng, 37, 32, 4, None, 1.0), "down [4, 37]"), (random_weights(&mut rng, 32, 37, 4, None, 1.0), "up [37, 4]")] {
        let err = AdapterSet::combine(&[(&base, 1.0), (&set(other), 1.0)]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LoraError::ShapeMismatch { .. }) && text.contains(&key.to_string()), "{text}");
        assert!(text.contains("down [4, 32], up [32, 4]") && text.contains(want), "{text}");
    }
}

#[test]
fn streamed_and_atomic_writes_name_the_output_not_a_temporary_file() {
    use lora_core::tensor_io::{write_atomic, write_streamed, StreamedTensor};
    let dir = tempfile::tempdir().unwrap();
    let tensor = || vec![("x".to_string(), StreamedTensor::new(SaveDtype::F32.st_dtype(), vec![1], || SaveDtype::F32.encode(&[1.0]).into()))];
    let missing = dir.path().join("missing/out.safetensors");
    let err = write_streamed(&missing, tensor(), Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, LoraError::Io { .. }), "an I/O error, not a bad safetensors file: {text}");
    assert!(text.contains("out.safetensors: its folder") && text.contains("does not exist") && !text.contains(".partial"), "{text}");
    // A file where the folder should be: said as such, by both writers.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let inside = file.join("out.safetensors");
    let streamed = write_streamed(&inside, tensor(), Default::default()).unwrap_err().to_string();
    let atomic = write_atomic(&inside, b"bytes").unwrap_err().to_string();
    for text in [streamed, atomic] {
        assert!(text.contains("out.safetensors: its folder") && text.contains("is a file, not a folder") && !text.contains(".tmp-"), "{text}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing written");
}

#[test]
fn serialized_files_are_byte_deterministic() {
    use lora_core::{tensor_io, HostTensor, SaveDtype};
    let t = HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let tensors = vec![("b".to_string(), &t), ("a".to_string(), &t)];
    let metadata = || (0..16).map(|i| (format!("key{i}"), format!("value{i}"))).collect::<std::collections::HashMap<_, _>>();
    // Each HashMap has its own random iteration order; the bytes must not depend on it.
    let first = tensor_io::serialize(&tensors, SaveDtype::F16, metadata()).unwrap();
    for _ in 0..8 {
        assert_eq!(tensor_io::serialize(&tensors, SaveDtype::F16, metadata()).unwrap(), first);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    std::fs::write(&path, &first).unwrap();
    let (st, meta) = tensor_io::parse(&first, &path).unwrap();
    assert_eq!(st.names().len(), 2);
    assert_eq!(meta.len(), 16);
}

/// `sshs_model_hash` is the SHA-256 of the tensor bytes (what A1111 computes for a LoRA when
/// the key is missing) and `sshs_legacy_hash` that of bytes 0x100000.. of the file written
/// with only the `ss_*` metadata; other metadata does not change them, tensors do.
#[test]
fn kohya_files_carry_addnet_hashes() {
    use sha2::{Digest, Sha256};
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let meta_of = |bytes: &[u8]| safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone().unwrap();
    let mut set = sample_set(3);
    set.metadata.insert("sshs_model_hash".into(), "stale".into());
    let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let meta = meta_of(&bytes);
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(meta["sshs_model_hash"], hex(&Sha256::digest(&bytes[8 + header..])));
    assert_eq!(meta["sshs_legacy_hash"], hex(&Sha256::digest(b""))[..8], "the file is under 1 MiB");
    set.metadata.insert("modelspec.title".into(), "renamed".into());
    assert_eq!(meta_of(&set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap())["sshs_model_hash"], meta["sshs_model_hash"]);
    let f16 = meta_of(&set.to_bytes(AdapterFormat::Kohya, SaveDtype::F16).unwrap());
    assert_ne!(f16["sshs_model_hash"], meta["sshs_model_hash"]);

    // Past 1 MiB the legacy hash covers 64 KiB of tensor data, found in the ss_-only file.
    let mut big = AdapterSet::new();
    let mut rng = Rng::new(5);
    big.insert(AdapterKey::new(Component::Unet, UNET_PATHS[4]), random_weights(&mut rng, 320, 1280, 256, None, 1.0)).unwrap();
    big.metadata.insert("ss_output_name".into(), "big".into());
    big.metadata.insert("modelspec.title".into(), "a long title ".repeat(50));
    let bytes = big.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let meta = meta_of(&bytes);
    // The ss_-only file, written by the safetensors crate from the tensors as read back.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let training: std::collections::HashMap<String, String> = meta.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(training.contains_key("ss_network_dim") && training.len() == 4, "{training:?}");
    let plain = safetensors::serialize(st.tensors(), Some(training)).unwrap();
    assert_eq!(meta["sshs_legacy_hash"], hex(&Sha256::digest(&plain[0x100000..0x110000]))[..8]);
    assert_ne!(meta["sshs_legacy_hash"], hex(&Sha256::digest(&bytes[0x100000..0x110000]))[..8], "the title shifts the full file");
}

/// `inspect` (`trainer info`) describes a broken file with a 0-d tensor where a LoRA,
/// LoHa or LoKr half should be instead of panicking: the module has no rank.
#[test]
fn inspect_takes_zero_dimensional_halves() {
    for part in ["lora_down.weight", "hada_w1_b", "lokr_w2_b"] {
        let bytes = raw(&[(format!("{Q}.{part}").as_str(), vec![], vec![0.5])]);
        let info = lora_core::inspect::inspect(&bytes, Path::new("t.safetensors")).unwrap();
        assert_eq!((info.modules.len(), info.modules[0].rank), (1, None), "{part}");
    }
}

/// A PEFT-layout file of mixed ranks carries diffusers' `lora_adapter_metadata` with
/// every module at scale 1 (its scale is folded into B): `r` / `lora_alpha` the common
/// rank, the others in `rank_pattern` / `alpha_pattern`, every module in
/// `target_modules`. diffusers builds the adapter's config from it; without it, diffusers
/// before 0.40 scaled every module by the first module's rank over its own. Read back
/// here, every alpha is its rank and the updates are unchanged.
#[test]
fn peft_files_of_mixed_ranks_carry_a_config_of_scale_one() {
    let mut rng = Rng::new(11);
    let mut set = AdapterSet::new();
    let modules = [
        ("down_blocks.0.attentions.0.proj_in", 8),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 4),
    ];
    for (path, rank) in modules {
        let w = LoraWeights::new(rng.host(&[rank, 8]), rng.host(&[8, rank]), 2.0, "test").unwrap();
        set.insert(AdapterKey::new(Component::Unet, path), w).unwrap();
    }
    let bytes = set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value = serde_json::from_str(&meta.metadata().clone().unwrap()["lora_adapter_metadata"]).unwrap();
    assert_eq!((config["unet.r"].as_u64(), config["unet.lora_alpha"].as_u64()), (Some(4), Some(4)), "{config}");
    let pattern = serde_json::json!({"down_blocks.0.attentions.0.proj_in": 8});
    assert_eq!((&config["unet.rank_pattern"], &config["unet.alpha_pattern"]), (&pattern, &pattern), "{config}");
    let mut targets: Vec<&str> = modules.iter().map(|(p, _)| *p).collect();
    targets.sort_unstable();
    assert_eq!(config["unet.target_modules"], serde_json::json!(targets));
    assert_eq!(config["unet.use_dora"], false);
    assert!(config.get("text_encoder.r").is_none(), "no text-encoder adapters, no config: {config}");
    let (back, _) = read(&bytes).unwrap();
    for (_, w) in back.iter() {
        assert_eq!(w.alpha, w.rank() as f32);
    }
    assert_same_deltas(&set, &back, 1e-6);
}

/// A PEFT-layout file of `tensors` (name, shape; values from `seed`) with `metadata`.
fn peft_file(tensors: &[(&str, &[usize])], metadata: &[(&str, &str)], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let hosts: Vec<(String, lora_core::HostTensor)> = tensors.iter().map(|(n, s)| (n.to_string(), rng.host(s))).collect();
    let refs: Vec<(String, &lora_core::HostTensor)> = hosts.iter().map(|(n, t)| (n.clone(), t)).collect();
    let metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    lora_core::tensor_io::serialize(&refs, SaveDtype::F32, metadata).unwrap()
}

/// diffusers' `save_lora_weights` stores each component's PEFT `LoraConfig` in the header
/// (`lora_adapter_metadata`): its `lora_alpha`, `alpha_pattern` (PEFT's `(.*\.)?(P)$` match)
/// and `use_rslora` (`alpha / √r`) set the scale a loader applies; without them alpha = rank.
/// Written back (scale folded into B), the config is left out, so a reader applies it once.
#[test]
fn peft_files_take_alphas_from_diffusers_lora_config() {
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let out = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
    let te = "text_model.encoder.layers.0.self_attn.q_proj";
    let names = [format!("unet.{q}"), format!("unet.{out}"), format!("text_encoder.{te}")];
    let mut tensors = Vec::new();
    for n in &names {
        tensors.push((format!("{n}.lora_A.weight"), vec![4usize, 8]));
        tensors.push((format!("{n}.lora_B.weight"), vec![8usize, 4]));
    }
    let tensors: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let config = r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_out.0": 2.0},
        "unet.target_modules": ["to_q", "to_out.0"], "text_encoder.r": 4, "text_encoder.lora_alpha": 1, "text_encoder.use_rslora": true}"#;
    let bytes = peft_file(&tensors, &[("lora_adapter_metadata", config), ("format", "pt")], 3);
    let (set, _) = read(&bytes).unwrap();
    let alpha = |c, p: &str| set.get(&AdapterKey::new(c, p)).unwrap().alpha;
    assert_eq!(alpha(Component::Unet, q), 8.0);
    assert_eq!(alpha(Component::Unet, out), 2.0, "alpha_pattern");
    assert_eq!(alpha(Component::TextEncoder, te), 2.0, "rsLoRA: 1/√4 = 2/4");
    assert!(!set.metadata.contains_key("lora_adapter_metadata"));
    let info = lora_core::inspect::inspect(&bytes, Path::new("test.safetensors")).unwrap();
    let shown: Vec<Option<f32>> = info.modules.iter().map(|m| m.alpha).collect();
    assert_eq!(shown, [Some(2.0), Some(2.0), Some(8.0)], "{:?}", info.modules.iter().map(|m| &m.name).collect::<Vec<_>>());
    // Without the config: alpha = rank. With it the update is larger by alpha / rank.
    let plain = peft_file(&tensors, &[], 3);
    let (plain, _) = read(&plain).unwrap();
    let delta = |s: &AdapterSet, p: &str| s.get(&AdapterKey::new(Component::Unet, p)).unwrap().delta().data;
    let (with, without) = (delta(&set, q), delta(&plain, q));
    assert!(with.iter().zip(&without).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)));
    // Round trip through our own PEFT writer: the same updates; the source's config is not
    // carried over (the scales are folded into B), the writer's own gives alpha = rank.
    let written = set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&written).unwrap();
    let config: serde_json::Value = serde_json::from_str(&meta.metadata().clone().unwrap_or_default()["lora_adapter_metadata"]).unwrap();
    assert_eq!((config["unet.r"].as_u64(), config["unet.lora_alpha"].as_u64()), (Some(4), Some(4)), "{config}");
    assert_eq!(config["unet.alpha_pattern"], serde_json::json!({}), "{config}");
    let (back, _) = read(&written).unwrap();
    assert_same_deltas(&set, &back, 1e-6);
    // Config entries that cannot be used are errors naming the entry.
    for (config, entry) in [
        (r#"{"unet.lora_alpha": "eight"}"#, "unet.lora_alpha"),
        (r#"{"unet.alpha_pattern": {"to_q(": 2}}"#, "unet.alpha_pattern.to_q("),
        (r#"{"unet.use_rslora": 1}"#, "unet.use_rslora"),
        ("[1, 2]", "lora_adapter_metadata"),
    ] {
        let err = read(&peft_file(&tensors, &[("lora_adapter_metadata", config)], 3)).unwrap_err();
        assert!(matches!(err, LoraError::BadMetadata { .. }) && err.to_string().contains(entry), "{config}: {err}");
    }
}

/// A PEFT model's raw `state_dict()` keys (`lora_A.default.weight`) read as the saved
/// ones; a module given twice (two names of one tensor, or `unet.X` beside
/// `base_model.model.X`) is an error instead of whichever the file lists last.
#[test]
fn peft_adapter_names_and_duplicate_modules() {
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let named = [(format!("unet.{q}.lora_A.default.weight"), vec![4usize, 8]), (format!("unet.{q}.lora_B.default.weight"), vec![8, 4])];
    let named: Vec<(&str, &[usize])> = named.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let (set, report) = read(&peft_file(&named, &[], 5)).unwrap();
    assert!(report.skipped.is_empty() && set.get(&AdapterKey::new(Component::Unet, q)).is_some_and(|w| w.rank() == 4));
    for extra in [format!("unet.{q}.lora.down.weight"), format!("base_model.model.{q}.lora_A.weight")] {
        let mut tensors = vec![(format!("unet.{q}.lora_A.weight"), vec![4usize, 8]), (format!("unet.{q}.lora_B.weight"), vec![8, 4]), (extra.clone(), vec![4, 8])];
        if extra.starts_with("base_model") {
            tensors.push((format!("base_model.model.{q}.lora_B.weight"), vec![8, 4]));
        }
        let tensors: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        let err = read(&peft_file(&tensors, &[], 5)).unwrap_err().to_string();
        assert!(err.contains(q) && (err.contains("same tensor") || err.contains("both name")), "{extra}: {err}");
    }
}

/// A 0-byte tensor whose other dimensions multiply past the address space is an error, not
/// an overflow in a reader's size arithmetic.
#[test]
fn empty_tensors_of_absurd_shape_are_errors() {
    assert!(lora_core::HostTensor::new(vec![0, 1 << 32, 1 << 32], vec![]).is_err());
    assert!(lora_core::HostTensor::new(vec![0, 4], vec![]).is_ok());
}

/// diffusers' attention-processor files (before PEFT) read as diffusers converts them:
/// `processor` dropped, the UNet's `to_out_lora` is `to_out.0`, a text encoder's
/// `to_q_lora` its `q_proj`, `lora_linear_layer` its module's LoRA; a UNet's
/// `save_attn_procs` file has no `unet.` prefix. No alpha: scale 1.
#[test]
fn diffusers_attention_processor_files_are_read() {
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    let te = "text_model.encoder.layers.0.self_attn";
    let mlp = "text_model.encoder.layers.11.mlp.fc1";
    let down: Vec<f32> = (0..16).map(|i| i as f32 * 0.01).collect();
    let up: Vec<f32> = (0..16).map(|i| 0.1 - i as f32 * 0.02).collect();
    let pair = |name: String, down_key: &str, up_key: &str| {
        [(format!("{name}.{down_key}.weight"), vec![2, 8], down.clone()), (format!("{name}.{up_key}.weight"), vec![8, 2], up.clone())]
    };
    let mut tensors = Vec::new();
    tensors.extend(pair(format!("unet.{attn}.processor.to_q_lora"), "down", "up"));
    tensors.extend(pair(format!("unet.{attn}.processor.to_out_lora"), "down", "up"));
    tensors.extend(pair(format!("text_encoder.{te}.to_q_lora"), "down", "up"));
    tensors.extend(pair(format!("text_encoder.{mlp}.lora_linear_layer"), "down", "up"));
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors.iter().map(|(n, s, d)| (n.as_str(), s.clone(), d.clone())).collect();
    let bytes = raw(&refs);
    assert_eq!(detect_format(&bytes, Path::new("x")).unwrap(), AdapterFormat::Peft);
    let (set, _) = read(&bytes).unwrap();
    let expected = LoraWeights::new(
        lora_core::HostTensor::new(vec![2, 8], down.clone()).unwrap(),
        lora_core::HostTensor::new(vec![8, 2], up.clone()).unwrap(),
        2.0,
        "expected",
    )
    .unwrap()
    .delta();
    for key in [
        AdapterKey::new(Component::Unet, format!("{attn}.to_q")),
        AdapterKey::new(Component::Unet, format!("{attn}.to_out.0")),
        AdapterKey::new(Component::TextEncoder, format!("{te}.q_proj")),
        AdapterKey::new(Component::TextEncoder, mlp),
    ] {
        let w = set.get(&key).unwrap_or_else(|| panic!("{key} missing from {:?}", set.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>()));
        assert_eq!(w.delta(), expected, "{key}");
    }
    assert_eq!(set.len(), 4);

    // `save_attn_procs`: no component prefix.
    let bare = pair(format!("{attn}.processor.to_q_lora"), "down", "up");
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = bare.iter().map(|(n, s, d)| (n.as_str(), s.clone(), d.clone())).collect();
    let (set, _) = read(&raw(&refs)).unwrap();
    assert!(set.get(&AdapterKey::new(Component::Unet, format!("{attn}.to_q"))).is_some());

    // The same module under its new and its old name: neither is taken.
    let mut both = pair(format!("unet.{attn}.processor.to_q_lora"), "down", "up").to_vec();
    both.extend(pair(format!("unet.{attn}.to_q"), "lora_A", "lora_B"));
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = both.iter().map(|(n, s, d)| (n.as_str(), s.clone(), d.clone())).collect();
    let err = read(&raw(&refs)).unwrap_err();
    assert!(matches!(err, LoraError::DuplicateModule { .. }), "{err}");
}

/// ComfyUI's own LoRA files name modules by its state-dict paths: the UNet's SGM path
/// under `diffusion_model.`, a text encoder's under `text_encoders.clip_l.transformer.`.
/// They read as the kohya layout (through the index's SGM aliases) and are written back
/// with kohya's names.
#[test]
fn comfyui_state_dict_names_are_read() {
    let mut index = index();
    let proj_in = AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in");
    index.add_alias("lora_unet_input_blocks_1_1_proj_in", proj_in.clone()).unwrap();
    let te = AdapterKey::new(Component::TextEncoder, TE_PATHS[0]);
    let bytes = raw(&[
        ("diffusion_model.input_blocks.1.1.proj_in.lora_down.weight", vec![2, 8, 1, 1], vec![0.1; 16]),
        ("diffusion_model.input_blocks.1.1.proj_in.lora_up.weight", vec![8, 2, 1, 1], vec![0.2; 16]),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight", vec![2, 8], vec![0.1; 16]),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight", vec![8, 2], vec![0.2; 16]),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha", vec![], vec![1.0]),
    ]);
    assert_eq!(detect_format(&bytes, Path::new("x")).unwrap(), AdapterFormat::Kohya);
    let (set, _) = AdapterSet::from_bytes(&bytes, Path::new("comfy.safetensors"), &index, ReadOptions::default()).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&proj_in).unwrap().alpha, 2.0, "no alpha: the rank");
    assert_eq!(set.get(&te).unwrap().alpha, 1.0);
    assert!(set.kohya_names.is_empty(), "{:?}", set.kohya_names);
    let written = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&written).unwrap().names().into_iter().map(|n| n.to_string()).collect();
    assert!(names.contains(&format!("{}.lora_down.weight", proj_in.kohya_name())), "{names:?}");
    assert!(names.contains(&format!("{}.lora_up.weight", te.kohya_name())), "{names:?}");
    // A name ComfyUI's layout gives that the model lacks is an unknown key, as any.
    let stray = raw(&[("diffusion_model.input_blocks.9.1.proj_in.lora_down.weight", vec![2, 8], vec![0.1; 16]), ("diffusion_model.input_blocks.9.1.proj_in.lora_up.weight", vec![8, 2], vec![0.2; 16])]);
    let err = AdapterSet::from_bytes(&stray, Path::new("comfy.safetensors"), &index, ReadOptions::default()).unwrap_err();
    assert!(matches!(err, LoraError::UnknownKeys { .. }), "{err}");
}
