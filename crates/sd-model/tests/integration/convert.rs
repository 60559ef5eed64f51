//! `sd_model::convert`: single file ↔ diffusers folder, checked against the fixture pairs of
//! `xtask/fixtures/sd_model.py` / `sd_model_sdxl.py` (each model written by diffusers' key
//! maps both ways, weights exact in f16 and bf16), and the key maps against the full-size
//! SD1.5 / SD2.1 / SDXL manifests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use lora_core::tensor_io::{decode_bytes, SaveDtype};
use sd_model::convert::{convert_checkpoint, ConvertOptions, Prediction};
use sd_model::keymap::{self, OpenClipName, UnetLayout};
use sd_model::load::{LoadOptions, ModelFamily, ModelSource, WeightFile};
use sd_model::tokenizer::ClipTokenizer;
use sd_model::{SdModelError, UnetConfig};

type B = Flex;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Every tensor of a file as f32 values with its shape (non-float tensors left out).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let file = WeightFile::open(path).unwrap();
    file.keys()
        .filter_map(|k| {
            let (dtype, bytes) = file.raw(k)?;
            Some((k.to_string(), (file.shape(k)?.to_vec(), decode_bytes(dtype, bytes)?)))
        })
        .collect()
}

/// All component files of a diffusers folder, keys prefixed with the component.
fn folder_tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for c in ["unet", "text_encoder", "text_encoder_2", "vae"] {
        if let Ok(file) = ModelSource::weights_file(dir, c) {
            out.extend(tensors(&file).into_iter().map(|(k, v)| (format!("{c}/{k}"), v)));
        }
    }
    out
}

fn assert_same(got: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, want: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, skip: &dyn Fn(&str) -> bool) {
    let got_keys: BTreeSet<&String> = got.keys().filter(|k| !skip(k)).collect();
    let want_keys: BTreeSet<&String> = want.keys().filter(|k| !skip(k)).collect();
    assert_eq!(got_keys, want_keys, "key sets differ");
    for key in got_keys {
        let ((gs, gv), (ws, wv)) = (&got[key], &want[key]);
        assert_eq!(gs, ws, "`{key}`: shapes");
        // The fixtures' weights are exact in bf16 and f16 except f16's subnormals (< 6.1e-5,
        // steps of 6e-8): within a step of each other.
        if let Some(i) = (0..gv.len()).find(|&i| (gv[i] - wv[i]).abs() > 6.1e-8) {
            panic!("`{key}` differs at {i}: {} vs {}", gv[i], wv[i]);
        }
    }
}

/// Loads every component of a converted model (the loaders' own key checks), on the CPU.
fn loads(path: &Path) {
    let source = ModelSource::detect(path).unwrap();
    let options = LoadOptions::default();
    let device = Default::default();
    source.load_unet::<B>(&device, &options).unwrap();
    source.load_text_encoder::<B>(&device, &options).unwrap();
    source.load_text_encoder_2::<B>(&device, &options).unwrap();
    source.load_vae::<B>(&device, &options).unwrap();
}

#[test]
fn sd1_and_sd2_single_files_become_the_diffusers_folders() {
    for name in ["sd1", "sd2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let report = convert_checkpoint(&fixture(&format!("parity/{name}_single_file.safetensors")), &out, &ConvertOptions::default()).unwrap();
        assert!(report.left_out.is_empty(), "{name}: {:?}", report.left_out);
        assert_eq!(report.prediction, Prediction::Epsilon);
        // bf16 in, bf16 out; the same values as the f16 folder diffusers wrote.
        assert_same(&folder_tensors(&out), &folder_tensors(&fixture(&format!("parity/{name}"))), &|_| false);
        loads(&out);
        let source = ModelSource::detect(&out).unwrap();
        assert_eq!(source.unet_config().unwrap(), ModelSource::detect(fixture(&format!("parity/{name}"))).unwrap().unet_config().unwrap());
        // Tokenizers: SD2's OpenCLIP pads with `!` (id 0).
        let tokenizer = ClipTokenizer::from_model_dir(&out).unwrap();
        assert_eq!(tokenizer.pad_token_id(), if name == "sd2" { 0 } else { 49407 });
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
        assert_eq!(index["_class_name"], "StableDiffusionPipeline");
        assert!(out.join("scheduler/scheduler_config.json").is_file());
    }
}

#[test]
fn sd1_and_sd2_folders_become_the_single_files() {
    for name in ["sd1", "sd2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.safetensors");
        let options = ConvertOptions { dtype: Some(SaveDtype::Bf16), ..Default::default() };
        let report = convert_checkpoint(&fixture(&format!("parity/{name}")), &out, &options).unwrap();
        assert!(report.left_out.is_empty(), "{name}: {:?}", report.left_out);
        let placeholders: BTreeSet<String> = report.placeholders.iter().cloned().collect();
        let got = tensors(&out);
        let want = tensors(&fixture(&format!("parity/{name}_single_file.safetensors")));
        if name == "sd2" {
            // The OpenCLIP layer and extras diffusers drops come back as placeholders.
            let layers = ModelSource::detect(fixture("parity/sd2")).unwrap().text_encoder_config().unwrap().num_hidden_layers;
            assert!(placeholders.contains("cond_stage_model.model.text_projection"));
            assert!(placeholders.contains(&format!("cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight")), "{placeholders:?}");
            assert!(!placeholders.iter().any(|k| k.contains(&format!("resblocks.{}.", layers - 1))));
            let copy = &got[&format!("cond_stage_model.model.transformer.resblocks.{layers}.mlp.c_fc.weight")];
            assert_eq!(copy, &got[&format!("cond_stage_model.model.transformer.resblocks.{}.mlp.c_fc.weight", layers - 1)]);
            for key in &placeholders {
                assert_eq!(got[key].0, want[key].0, "`{key}` has the original's shape");
            }
        } else {
            assert!(placeholders.is_empty());
        }
        assert_same(&got, &want, &|k| placeholders.contains(k));
        loads(&out);
    }
}

#[test]
fn sdxl_converts_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("xl");
    let report = convert_checkpoint(&fixture("sdxl/tiny_single_file.safetensors"), &folder, &ConvertOptions::default()).unwrap();
    assert_eq!(report.family, ModelFamily::Sdxl);
    assert!(report.left_out.is_empty(), "{:?}", report.left_out);
    assert_same(&folder_tensors(&folder), &folder_tensors(&fixture("sdxl/tiny")), &|_| false);
    loads(&folder);
    assert_eq!(ClipTokenizer::from_dir(folder.join("tokenizer_2")).unwrap().pad_token_id(), 0);
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionXLPipeline");

    let single = tmp.path().join("xl.safetensors");
    let report = convert_checkpoint(&fixture("sdxl/tiny"), &single, &ConvertOptions { dtype: Some(SaveDtype::Bf16), ..Default::default() }).unwrap();
    assert!(report.left_out.is_empty() && report.placeholders.is_empty(), "{report:?}");
    // As kohya's converter: no position-id buffer, no logit scale diffusers never had.
    let extra = |k: &str| k.ends_with("position_ids") || k.ends_with("logit_scale");
    assert_same(&tensors(&single), &tensors(&fixture("sdxl/tiny_single_file.safetensors")), &extra);
    loads(&single);
}

#[test]
fn round_trips_keep_dtypes_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("a.safetensors");
    let folder = tmp.path().join("b");
    convert_checkpoint(&fixture("parity/sd1"), &single, &ConvertOptions::default()).unwrap();
    // The folder's f16 stays f16 without a dtype.
    let file = WeightFile::open(&single).unwrap();
    assert!(file.keys().all(|k| file.raw(k).unwrap().0 == safetensors::Dtype::F16));
    convert_checkpoint(&single, &folder, &ConvertOptions::default()).unwrap();
    assert_same(&folder_tensors(&folder), &folder_tensors(&fixture("parity/sd1")), &|_| false);
}

#[test]
fn v_prediction_and_zero_terminal_snr_travel_with_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("v");
    // A v-prediction folder: the sd2 fixture with a DDIM v-prediction, zero-SNR schedule.
    copy_dir(&fixture("parity/sd2"), &folder);
    std::fs::create_dir_all(folder.join("scheduler")).unwrap();
    std::fs::write(folder.join("scheduler/scheduler_config.json"), r#"{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": true}"#).unwrap();
    let single = tmp.path().join("v.safetensors");
    let report = convert_checkpoint(&folder, &single, &ConvertOptions::default()).unwrap();
    assert_eq!((report.prediction, report.zero_terminal_snr), (Prediction::VPrediction, true));
    let file = WeightFile::open(&single).unwrap();
    assert!(file.contains("v_pred") && file.contains("ztsnr"));
    assert_eq!(sd_model::inspect::inspect_checkpoint(&single).unwrap().prediction.as_deref(), Some("v_prediction"));
    // ... and back: the scheduler says so.
    let back = tmp.path().join("back");
    let report = convert_checkpoint(&single, &back, &ConvertOptions::default()).unwrap();
    assert!(report.left_out.is_empty(), "{:?}", report.left_out);
    let scheduler: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(back.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!((scheduler["prediction_type"].as_str(), scheduler["rescale_betas_zero_snr"].as_bool()), (Some("v_prediction"), Some(true)));
    assert_eq!(scheduler["_class_name"], "DDIMScheduler");
    // An explicit choice wins; a prediction type a single file cannot record is refused.
    let eps = tmp.path().join("eps.safetensors");
    let report = convert_checkpoint(&folder, &eps, &ConvertOptions { prediction: Some(Prediction::Epsilon), ..Default::default() }).unwrap();
    assert_eq!(report.prediction, Prediction::Epsilon);
    assert!(!WeightFile::open(&eps).unwrap().contains("v_pred"));
    std::fs::write(folder.join("scheduler/scheduler_config.json"), r#"{"prediction_type": "sample"}"#).unwrap();
    let err = convert_checkpoint(&folder, &tmp.path().join("s.safetensors"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("scheduler_config.json") && err.to_string().contains("sample"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Rewrites a safetensors file with `edit` applied to its (key, dtype, shape, bytes) list.
fn rewrite(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let file = WeightFile::open(from).unwrap();
    let mut entries: Vec<_> = file.keys().map(|k| {
        let (d, b) = file.raw(k).unwrap();
        (k.to_string(), d, file.shape(k).unwrap().to_vec(), b.to_vec())
    }).collect();
    edit(&mut entries);
    let views: Vec<(String, safetensors::tensor::TensorView)> = entries.iter().map(|(k, d, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, Some(file.metadata().clone()), to).unwrap();
}

#[test]
fn ema_weights_and_a_separate_vae() {
    let tmp = tempfile::tempdir().unwrap();
    // An SD1 file with an EMA copy of the UNet (values doubled) and without its VAE.
    let with_ema = tmp.path().join("ema.safetensors");
    rewrite(&fixture("parity/sd1_single_file.safetensors"), &with_ema, |entries| {
        let ema: Vec<_> = entries.iter().filter(|(k, ..)| k.starts_with("model.diffusion_model.")).map(|(k, d, s, b)| {
            let doubled: Vec<f32> = decode_bytes(*d, b).unwrap().iter().map(|v| v * 2.0).collect();
            (format!("model_ema.{}", k["model.".len()..].replace('.', "")), *d, s.clone(), SaveDtype::of(*d).unwrap().encode(&doubled))
        }).collect();
        entries.extend(ema);
        entries.retain(|(k, ..)| !k.starts_with("first_stage_model."));
    });
    // Without a VAE there is nothing to write one from.
    let err = convert_checkpoint(&with_ema, &tmp.path().join("x"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no VAE"), "{err}");
    // The folder's VAE file (diffusers names) stands in, and the UNet comes from the EMA copy.
    let out = tmp.path().join("out");
    let vae = fixture("parity/sd1/vae");
    let report = convert_checkpoint(&with_ema, &out, &ConvertOptions { ema: true, vae: Some(vae), ..Default::default() }).unwrap();
    assert!(report.ema && report.left_out.is_empty(), "{report:?}");
    let got = folder_tensors(&out);
    let want = folder_tensors(&fixture("parity/sd1"));
    let doubled = want.iter().map(|(k, (s, v))| (k.clone(), (s.clone(), if k.starts_with("unet/") { v.iter().map(|x| x * 2.0).collect() } else { v.clone() }))).collect();
    assert_same(&got, &doubled, &|_| false);
    // A file without EMA weights refuses --ema.
    let err = convert_checkpoint(&fixture("parity/sd1_single_file.safetensors"), &tmp.path().join("y"), &ConvertOptions { ema: true, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("no EMA"), "{err}");
}

#[test]
fn outputs_are_never_overwritten_and_bad_sources_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = tmp.path().join("taken.safetensors");
    std::fs::write(&taken, b"mine").unwrap();
    let err = convert_checkpoint(&fixture("parity/sd1"), &taken, &ConvertOptions::default()).unwrap_err();
    assert!(matches!(err, SdModelError::BadInput { .. }) && err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
    // The output's kind follows the source's: a file name for a folder, or the other way
    // round, is refused before anything is written.
    for (src, out, want) in [(fixture("parity/sd1_single_file.safetensors"), "m.safetensors", "name a folder"), (fixture("parity/sd1"), "m", "name it *.safetensors")] {
        let err = convert_checkpoint(&src, &tmp.path().join(out), &ConvertOptions::default()).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(out), "{err}");
        assert!(!tmp.path().join(out).exists());
    }
    // A LoRA is not a checkpoint.
    let err = convert_checkpoint(&fixture("parity/sd1_lora_kohya.safetensors"), &tmp.path().join("z"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("sd1_lora_kohya") && err.to_string().contains("UNet"), "{err}");
    let left = |prefix: &str| std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(prefix)).collect::<Vec<_>>();
    assert!(left("z").is_empty(), "{:?}", left("z"));
    // A UNet + VAE file without its text encoder would make a folder that does not load.
    let no_text = tmp.path().join("no-text.safetensors");
    rewrite(&fixture("parity/sd1_single_file.safetensors"), &no_text, |entries| entries.retain(|(k, ..)| !k.starts_with("cond_stage_model.")));
    // A file of the user's named like a partial output is neither used nor deleted.
    std::fs::write(tmp.path().join("w.partial"), b"mine").unwrap();
    let err = convert_checkpoint(&no_text, &tmp.path().join("w"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no-text.safetensors") && err.to_string().contains("no text encoder"), "{err}");
    assert_eq!(left("w"), ["w.partial"]);
    assert_eq!(std::fs::read(tmp.path().join("w.partial")).unwrap(), b"mine");
    let sdxl_no_text2 = tmp.path().join("sdxl-no-text2.safetensors");
    rewrite(&fixture("sdxl/tiny_single_file.safetensors"), &sdxl_no_text2, |entries| entries.retain(|(k, ..)| !k.starts_with("conditioner.embedders.1.")));
    let err = convert_checkpoint(&sdxl_no_text2, &tmp.path().join("v"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no second text encoder"), "{err}");
}

fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    std::fs::read_to_string(fixture(&format!("manifests/{name}.txt")))
        .unwrap()
        .lines()
        .map(|line| {
            let (key, shape) = line.split_once('\t').unwrap();
            (key.to_string(), shape.split(',').filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect())
        })
        .collect()
}

/// Every full-size UNet and VAE key maps to diffusers' and back to itself.
#[test]
fn full_size_unet_and_vae_key_maps_invert() {
    for (single, unet, config) in [("sd15_single_file", "sd15_diffusers_unet", UnetConfig::sd15()), ("sd21_single_file", "sd21_diffusers_unet", UnetConfig::sd21()), ("sdxl_single_file", "sdxl_diffusers_unet", UnetConfig::sdxl())] {
        let layout = UnetLayout::from_config(&config);
        let keys = manifest(single);
        let diffusers = manifest(unet);
        let mut seen = BTreeSet::new();
        for key in keys.keys().filter(|k| k.starts_with(keymap::LDM_UNET_PREFIX)) {
            let ours = layout.ldm_key(key).unwrap_or_else(|| panic!("{single}: `{key}`"));
            assert_eq!(diffusers.get(&ours), keys.get(key), "{single}: `{key}` → `{ours}`");
            assert_eq!(layout.diffusers_to_ldm_key(&ours).as_deref(), Some(key.as_str()));
            seen.insert(ours);
        }
        assert_eq!(seen.len(), diffusers.len(), "{single}: every diffusers key is reached");
        let vae = manifest("sd15_diffusers_vae");
        for key in keys.keys().filter_map(|k| k.strip_prefix("first_stage_model.")) {
            let (ours, squeeze) = keymap::ldm_vae_path(key, 4).unwrap();
            assert!(vae.contains_key(&ours), "`{ours}`");
            assert_eq!(keymap::diffusers_vae_to_ldm(&ours, 4), Some((key.to_string(), squeeze && ours.ends_with("weight"))));
        }
    }
}

/// Every OpenCLIP key of SD2.1 and SDXL maps to transformers' and back.
#[test]
fn full_size_open_clip_key_maps_invert() {
    for (single, prefix, diffusers, layers) in [
        ("sd21_single_file", keymap::SD2_TEXT_PREFIX, "sd21_diffusers_text_encoder", 23),
        ("sdxl_single_file", keymap::SDXL_TEXT_2_PREFIX, "sdxl_diffusers_text_encoder_2", 32),
    ] {
        let keys = manifest(single);
        let theirs = manifest(diffusers);
        let mut reached = BTreeSet::new();
        for key in keys.keys().filter(|k| k.starts_with(prefix) && !keymap::is_ignored_single_file_key(k)) {
            let width = keys[&format!("{prefix}token_embedding.weight")][1];
            for (ours, src) in keymap::open_clip_key_at(prefix, key, width, layers).unwrap() {
                assert!(theirs.contains_key(&ours), "{single}: `{ours}`");
                let back = match keymap::open_clip_name(&ours).unwrap() {
                    OpenClipName::Plain(n) => { assert!(src.rows.is_none() && !src.transpose); n }
                    OpenClipName::Transposed(n) => { assert!(src.transpose); n }
                    OpenClipName::Fused(n, part) => { assert_eq!(src.rows, Some((part * width, (part + 1) * width))); n }
                };
                assert_eq!(format!("{prefix}{back}"), *key);
                reached.insert(ours);
            }
        }
        let expected: BTreeSet<String> = theirs.keys().filter(|k| !keymap::is_ignored_diffusers_key(k)).cloned().collect();
        assert_eq!(reached, expected, "{single}");
    }
}

/// PyTorch pickles (`xtask/fixtures/sd_model_pickles.py`): a `.ckpt` (zip and pre-1.6
/// formats) becomes the safetensors file of its `state_dict`, or a folder; an A1111 `.pt`
/// embedding reads as its safetensors twin; the loaders name a pickle for what it is.
#[test]
fn pytorch_pickles_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tensors(&fixture("parity/sd1_single_file.safetensors"));
    for name in ["sd1.ckpt", "sd1_legacy.ckpt"] {
        let single = tmp.path().join(format!("{name}.safetensors"));
        let report = convert_checkpoint(&fixture(&format!("pickles/{name}")), &single, &ConvertOptions::default()).unwrap();
        assert_eq!(report.written[0].1, want.len(), "{name}");
        assert_same(&tensors(&single), &want, &|_| false);
        let file = WeightFile::open(&single).unwrap();
        assert!(file.keys().all(|k| file.raw(k).unwrap().0 == safetensors::Dtype::BF16), "{name}: dtypes kept");
    }
    // Straight to a folder: through a safetensors file, removed after. (This tiny model's
    // configs ride in the safetensors fixture's header, which a pickle has no place for, so
    // its shapes cannot be read as a model's: the error names the pickle. Full-size models
    // convert: xtask/fixtures/check_convert.py.)
    let folder = tmp.path().join("from-ckpt");
    let err = convert_checkpoint(&fixture("pickles/sd1.ckpt"), &folder, &ConvertOptions::default()).unwrap_err().to_string();
    assert!(err.contains("sd1.ckpt") && err.contains("single-file checkpoint"), "{err}");
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("from-ckpt")).collect();
    assert!(left.is_empty(), "nothing is left behind: {left:?}");
    // Options that need a folder are refused for a plain file conversion.
    let err = convert_checkpoint(&fixture("pickles/sd1.ckpt"), &tmp.path().join("e.safetensors"), &ConvertOptions { ema: true, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("--ema"), "{err}");
    // The loaders say what a pickle is and how to convert it.
    let err = WeightFile::open(fixture("pickles/sd1.ckpt")).unwrap_err().to_string();
    assert!(err.contains("PyTorch pickle") && err.contains("convert-model"), "{err}");

    let pt = sd_model::textual_inversion::read_embedding(&fixture("pickles/myemb.pt")).unwrap();
    let st = sd_model::textual_inversion::read_embedding(&fixture("pickles/myemb.safetensors")).unwrap();
    assert_eq!((pt.name.as_str(), &pt.vectors), ("myemb", &st.vectors));
    // Not a pickle at all.
    let fake = tmp.path().join("fake.pt");
    std::fs::write(&fake, b"not a pickle").unwrap();
    let err = sd_model::textual_inversion::read_embedding(&fake).unwrap_err().to_string();
    assert!(err.contains("fake.pt"), "{err}");
}

/// Components whose configs do not fit together are refused before any weight loads,
/// naming the component's config file; the fixtures' own fit.
#[test]
fn components_that_do_not_fit_together_are_named() {
    for model in ["parity/sd1", "parity/sd2", "sdxl/tiny", "parity/sd1_single_file.safetensors", "sdxl/tiny_single_file.safetensors"] {
        ModelSource::detect(fixture(model)).unwrap().check_components().unwrap_or_else(|e| panic!("{model}: {e}"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("unet", "out_channels", 8, "predict the latents' channels"),
        ("unet", "in_channels", 9, "inpainting"),
        ("unet", "cross_attention_dim", 64, "hidden_size"),
        ("vae", "out_channels", 1, "RGB"),
        ("text_encoder", "max_position_embeddings", 1, "77 tokens"),
    ];
    for (i, (component, key, value, says)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        copy_dir(&fixture("parity/sd1"), &dir);
        let path = dir.join(component).join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[key] = value.into();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = ModelSource::detect(&dir).unwrap().check_components().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains(key) && err.contains(says), "{key}: {err}");
    }
}

/// Writes `tensors` (name, shape, f32 values) and `metadata` to `path` as safetensors.
fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], metadata: &[(&str, &str)]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        tensors.iter().zip(&bytes).map(|((k, s, _), b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    let meta: std::collections::HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// SD2.x checkpoints with no prediction mark are told apart by their weights, as ComfyUI
/// does: the last transformer's first LayerNorm bias spreads wide (std > 0.09) in the
/// 768-v models. Marks win; other models, and inpainting UNets, are not guessed.
#[test]
fn sd2_checkpoints_without_a_mark_get_their_prediction_from_the_weights() {
    use sd_model::convert::single_file_prediction;
    let tmp = tempfile::tempdir().unwrap();
    let bias = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias".to_string();
    // Alternating ±spread: population std = spread.
    let file = |name: &str, spread: f32, in_channels: usize, open_clip: bool, metadata: &[(&str, &str)]| {
        let path = tmp.path().join(name);
        let mut tensors = vec![
            ("model.diffusion_model.input_blocks.0.0.weight".to_string(), vec![8, in_channels, 1, 1], vec![0.0; 8 * in_channels]),
            (bias.clone(), vec![8], (0..8).map(|i| if i % 2 == 0 { spread } else { -spread }).collect()),
        ];
        let te = if open_clip { "cond_stage_model.model.token_embedding.weight" } else { "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" };
        tensors.push((te.to_string(), vec![4, 4], vec![0.0; 16]));
        write_f32(&path, &tensors, metadata);
        single_file_prediction(&WeightFile::open(&path).unwrap()).0
    };
    assert_eq!(file("v.safetensors", 0.2, 4, true, &[]), Some(Prediction::VPrediction));
    assert_eq!(file("eps.safetensors", 0.05, 4, true, &[]), Some(Prediction::Epsilon));
    assert_eq!(file("marked.safetensors", 0.2, 4, true, &[("modelspec.prediction_type", "epsilon")]), Some(Prediction::Epsilon));
    assert_eq!(file("inpaint.safetensors", 0.2, 9, true, &[]), None);
    assert_eq!(file("sd1.safetensors", 0.2, 4, false, &[]), None);
}

/// An SD2 file written without OpenCLIP's unused 24th block (diffusers' own export
/// script: the used blocks, no `text_projection`) keeps all its blocks; a complete one
/// (with its projection, or ViT-H's 24 blocks) drops the last.
#[test]
fn sd2_files_without_the_unused_openclip_block_keep_every_block() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = |name: &str, blocks: usize, projection: bool| {
        let p = "cond_stage_model.model.";
        let mut tensors = vec![
            (format!("{p}token_embedding.weight"), vec![8, 64], vec![0.0; 8 * 64]),
            (format!("{p}positional_embedding"), vec![77, 64], vec![0.0; 77 * 64]),
            (format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), vec![256, 64], vec![0.0; 256 * 64]),
        ];
        tensors.extend((0..blocks).map(|i| (format!("{p}transformer.resblocks.{i}.ln_1.weight"), vec![64], vec![1.0; 64])));
        if projection {
            tensors.push((format!("{p}text_projection"), vec![64, 64], vec![0.0; 64 * 64]));
        }
        let path = tmp.path().join(name);
        write_f32(&path, &tensors, &[]);
        sd_model::load::infer_clip_config(&WeightFile::open(&path).unwrap()).unwrap().num_hidden_layers
    };
    assert_eq!(layers("complete.safetensors", 4, true), 3);
    assert_eq!(layers("trimmed.safetensors", 3, false), 3);
    assert_eq!(layers("vit_h.safetensors", 24, false), 23);
    assert_eq!(layers("vit_h_trimmed.safetensors", 23, false), 23);
}

/// Checkpoints that need an EDM schedule are refused by name, not read as SDXL.
#[test]
fn edm_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, keys, says) in [("playground.safetensors", &["edm_mean", "edm_std"][..], "Playground"), ("cosxl.safetensors", &["edm_vpred.sigma_max"][..], "CosXL")] {
        let path = tmp.path().join(name);
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = keys.iter().map(|k| (k.to_string(), vec![1], vec![0.5])).chain([("model.diffusion_model.input_blocks.0.0.weight".to_string(), vec![8, 4, 1, 1], vec![0.0; 32])]).collect();
        write_f32(&path, &tensors, &[]);
        let err = sd_model::load::infer_unet_config(&WeightFile::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, SdModelError::Layout { .. }) && err.to_string().contains(says) && err.to_string().contains(name), "{err}");
    }
}

/// A diffusers VAE with the attention names of diffusers before 0.14 (`query`, `key`,
/// `value`, `proj_attn`) loads as with the current names, as a folder and with `--vae`.
#[test]
fn vaes_with_diffusers_older_attention_names_load() {
    let src = ModelSource::weights_file(&fixture("parity/sd1"), "vae").unwrap();
    let renamed: Vec<(String, Vec<usize>, Vec<f32>)> = tensors(&src)
        .into_iter()
        .map(|(k, (s, v))| {
            let k = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn.");
            (k, s, v)
        })
        .collect();
    assert!(renamed.iter().any(|(k, _, _)| k.ends_with("mid_block.attentions.0.proj_attn.weight")));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vae.safetensors");
    write_f32(&path, &renamed, &[]);
    let config = ModelSource::detect(fixture("parity/sd1")).unwrap().vae_config().unwrap();
    let device = Default::default();
    let load = |p: &Path| {
        let mut vae = sd_model::AutoencoderKl::<B>::new(&config, &device).unwrap();
        sd_model::load::load_vae_from(&mut vae, p, &LoadOptions::default()).unwrap();
        vae.decoder.mid_block.attentions[0].to_out[0].base.weight.val().into_data()
    };
    assert_eq!(load(&path), load(&src));
}
