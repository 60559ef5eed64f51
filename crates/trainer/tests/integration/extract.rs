//! `trainer extract` as a user runs it: a LoRA baked into a checkpoint by `trainer merge`
//! comes back out of the difference, in SD1 and SDXL layouts, and bad requests are refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use lora_core::{AdapterKey, AdapterSet, HostTensor, ReadOptions};

fn trainer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Reads a LoRA file against `model`'s module paths.
fn load(path: &Path, model: &Path) -> AdapterSet {
    let mut c = sd_pipeline::load_components::<Flex>(s(model), 0, &Default::default()).unwrap();
    let mut encoders = vec![&mut c.text_encoder];
    encoders.extend(c.text_encoder_2.as_mut());
    let index = sd_model::lora::module_index_of(&mut c.unet, &mut encoders).unwrap();
    AdapterSet::load(path, &index, ReadOptions::default()).unwrap().0
}

fn max_abs(t: &HostTensor) -> f32 {
    t.data.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Every adapter of `original` is in `extracted` with the same update (`ΔW` to 1e-5 of its
/// largest value), and `extracted` has nothing else that is not zero.
fn assert_same_updates(original: &AdapterSet, extracted: &AdapterSet) {
    for (key, w) in original.iter() {
        let got = extracted.get(key).unwrap_or_else(|| panic!("{key:?} not extracted")).delta();
        let want = w.delta();
        let flat = |t: &HostTensor| t.data.clone();
        let worst = flat(&got).iter().zip(flat(&want)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * max_abs(&want), "{key:?}: off by {worst} (largest {})", max_abs(&want));
    }
    for (key, w) in extracted.iter() {
        if original.get(key).is_none() {
            assert!(max_abs(&w.delta()) < 1e-6, "{key:?} extracted from an unchanged layer");
        }
    }
}

/// SD1: a rank-2 LoRA on the UNet, merged into a diffusers folder in f32, extracts back
/// exactly at a rank at least its own (unclamped), UNet only (the text encoder is the
/// base's); the default clamp, a dynamic rank rule, LoCon and the PEFT layout; then the
/// errors a user can run into.
#[test]
fn sd1_lora_round_trips_through_merge_and_extract() {
    let _rng = crate::common::seeded();
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("parity/sd1");
    let lora = fixtures().join("parity/sd1_lora_kohya.safetensors");
    let tuned = dir.path().join("tuned");
    let (ok, text) = trainer(&["merge", "--model", s(&base), "--lora", s(&lora), "--out", s(&tuned), "--dtype", "f32"]);
    assert!(ok, "{text}");

    let exact = dir.path().join("exact.safetensors");
    let (ok, text) = trainer(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&exact), "--rank", "4", "--no-clamp", "--dtype", "f32"]);
    assert!(ok, "{text}");
    assert!(text.contains("extracting the UNet only") && text.contains("48 adapters, rank 4"), "{text}");
    // The f32 merge makes `auto` load in f32; two f16 models load in f16.
    assert!(text.contains("models loaded in F32"), "{text}");
    let original = load(&lora, &base);
    let extracted = load(&exact, &base);
    assert_eq!(extracted.len(), 48);
    assert!(extracted.iter().all(|(k, w)| k.component == lora_core::Component::Unet && w.alpha == 4.0));
    assert_same_updates(&original, &extracted);
    assert_eq!(extracted.metadata.get("ss_network_module").map(String::as_str), Some("networks.lora"));
    assert_eq!(extracted.metadata.get("ss_base_model_version").map(String::as_str), Some("sd_v1"));
    assert_eq!(extracted.metadata.get("modelspec.architecture").map(String::as_str), Some("stable-diffusion-v1/lora"));

    // kohya's defaults (rank 4, the 0.99 clamp): an approximation, still close.
    let clamped = dir.path().join("clamped.safetensors");
    let (ok, text) = trainer(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&clamped), "--verbose"]);
    assert!(ok, "{text}");
    assert!(text.contains("| rank   4 |") && text.contains("relative error"), "{text}");
    let approx = load(&clamped, &base);
    let key = AdapterKey::new(lora_core::Component::Unet, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q");
    let (want, got) = (original.get(&key).unwrap().delta(), approx.get(&key).unwrap().delta());
    let err: f32 = want.data.iter().zip(&got.data).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
    let norm: f32 = want.data.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(err > 0.0 && err < 0.2 * norm, "clamped error {err} of {norm}");

    // A dynamic rule keeps the LoRA's own rank (2) where it holds all of the update.
    let dynamic = dir.path().join("dynamic.safetensors");
    let (ok, text) = trainer(&[
        "extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&dynamic), "--rank", "6", "--dynamic-method", "sv_fro", "--dynamic-param", "0.9999", "--no-clamp", "--to", "peft",
    ]);
    assert!(ok, "{text}");
    let dynamic_set = load(&dynamic, &base);
    assert!(dynamic_set.iter().all(|(_, w)| w.rank() <= 2), "{text}");

    // LoCon: the ResNet blocks' 3x3 convolutions at their own rank; unchanged, so zero.
    let locon = dir.path().join("locon.safetensors");
    let (ok, text) = trainer(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&locon), "--rank", "4", "--conv-rank", "2", "--no-clamp", "--dtype", "f32"]);
    assert!(ok, "{text}");
    let locon_set = load(&locon, &base);
    let conv = AdapterKey::new(lora_core::Component::Unet, "down_blocks.0.resnets.0.conv1");
    let w = locon_set.get(&conv).expect("ResNet convolutions extracted");
    assert_eq!((w.rank(), w.down.shape.len(), &w.down.shape[2..]), (2, 4, [3usize, 3].as_slice()));
    assert_same_updates(&original, &locon_set);

    let tuned_f16 = dir.path().join("tuned-f16");
    let (ok, text) = trainer(&["merge", "--model", s(&base), "--lora", s(&lora), "--out", s(&tuned_f16), "--dtype", "f16"]);
    assert!(ok, "{text}");
    let half = dir.path().join("half.safetensors");
    let (ok, text) = trainer(&["extract", "--base", s(&base), "--tuned", s(&tuned_f16), "--out", s(&half), "--rank", "4", "--no-clamp"]);
    assert!(ok && text.contains("models loaded in F16"), "{text}");

    let sd2 = fixtures().join("parity/sd2");
    let other = s(&dir.path().join("other.safetensors")).to_string();
    for (args, expected) in [
        (vec!["--tuned", s(&tuned), "--out", s(&exact)], "already exists"),
        (vec!["--tuned", s(&sd2), "--out", &other], "both must be of one family"),
        (vec!["--tuned", s(&base), "--out", &other], "nothing to extract"),
        (vec!["--tuned", s(&tuned), "--out", &other, "--clamp-quantile", "1.5"], "(0, 1]"),
        (vec!["--tuned", s(&tuned), "--out", &other, "--rank", "8", "--dynamic-method", "sv_cumulative", "--dynamic-param", "0.9"], "sv_cumulative"),
        (vec!["--tuned", s(&tuned), "--out", &other, "--rank", "0"], "rank"),
        (vec!["--tuned", "missing-model", "--out", &other], "missing-model"),
        (vec!["--tuned", s(&tuned), "--out", &other, "--load-precision", "f64"], "expected auto, f32, f16 or bf16"),
    ] {
        let mut full = vec!["extract", "--base", s(&base)];
        full.extend(args);
        let (ok, text) = trainer(&full);
        assert!(!ok && text.contains(expected), "{full:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
    assert!(!Path::new(&other).exists());
}

/// SDXL: a LoRA on the UNet and both text encoders, merged into a single-file checkpoint,
/// extracts back with kohya's SDXL names (SGM UNet paths, `lora_te1_` / `lora_te2_`).
#[test]
fn sdxl_lora_round_trips_with_kohyas_sdxl_names() {
    let _rng = crate::common::seeded();
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("sdxl/tiny_single_file.safetensors");
    let lora = fixtures().join("sdxl/lora_kohya.safetensors");
    let tuned = dir.path().join("tuned.safetensors");
    let (ok, text) = trainer(&["merge", "--model", s(&base), "--lora", s(&lora), "--out", s(&tuned), "--dtype", "f32"]);
    assert!(ok, "{text}");
    let out = dir.path().join("extracted.safetensors");
    let (ok, text) = trainer(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&out), "--rank", "8", "--no-clamp", "--dtype", "f32"]);
    assert!(ok, "{text}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    for prefix in ["lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_te1_text_model_", "lora_te2_text_model_"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "no {prefix}* in {names:?}");
    }
    let original = load(&lora, &base);
    let extracted = load(&out, &base);
    assert_same_updates(&original, &extracted);
    assert_eq!(extracted.metadata.get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
}
