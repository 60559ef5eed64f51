//! The UNet matches diffusers on tiny SD1-like (conv projections) and SD2-like (linear
//! projections, per-block heads) models, in both checkpoint layouts, with and without LoRA
//! files in both adapter layouts (fixtures from `xtask/fixtures/sd_model.py`).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use lora_core::sites;
use lora_core::{AdapterKey, AdapterSet, Component, ModuleIndex, ReadOptions};
use sd_model::load::{LoadOptions, ModelSource};
use sd_model::{UNet2DConditionModel, UnetConfig};

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn read_f32(file: &str, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (view.shape().to_vec(), data)
}

fn input<const D: usize>(key: &str) -> Tensor<B, D> {
    let (shape, data) = read_f32("inputs.safetensors", key);
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

fn run(unet: &UNet2DConditionModel<B>) -> Vec<f32> {
    let out = unet.forward(input("unet_latents"), input("timesteps"), input("encoder_hidden_states")).unwrap();
    out.into_data().to_vec::<f32>().unwrap()
}

fn assert_close(got: &[f32], key: &str) {
    let (_, want) = read_f32("outputs.safetensors", key);
    let diff: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let err = (diff / norm).sqrt();
    assert!(err <= 1e-4, "{key}: relative error {err:e}");
}

fn load(name: &str, single_file: bool) -> UNet2DConditionModel<B> {
    let path = if single_file {
        fixtures().join(format!("{name}_single_file.safetensors"))
    } else {
        fixtures().join(name)
    };
    ModelSource::detect(path).unwrap().load_unet(&Default::default(), &LoadOptions::default()).unwrap()
}

#[test]
fn unet_matches_diffusers_in_both_layouts() {
    for name in ["sd1", "sd2"] {
        for single_file in [false, true] {
            assert_close(&run(&load(name, single_file)), &format!("{name}_unet_out"));
        }
    }
}

#[test]
fn unet_with_lora_files_matches_diffusers_load_lora_weights() {
    for name in ["sd1", "sd2"] {
        let mut base = load(name, false);
        let mut index = ModuleIndex::new();
        sites::add_to_index(&mut index, &mut base).unwrap();
        for fmt in ["kohya", "peft"] {
            let path = fixtures().join(format!("{name}_lora_{fmt}.safetensors"));
            let (set, report) = AdapterSet::load(&path, &index, ReadOptions::default()).unwrap();
            assert!(report.skipped.is_empty());
            let mut unet = base.clone();
            let n = sites::attach_adapters(&mut unet, &set, 1.0, &Default::default()).unwrap();
            assert_eq!(n, set.len());
            assert_close(&run(&unet), &format!("{name}_unet_out_lora_{fmt}"));
        }
    }
}

/// Every kohya name of every adapter site resolves to the right module, for the full-size
/// SD1.5 and SD2.1 module trees (built at reduced width: the tree is what matters).
#[test]
fn kohya_keys_round_trip_for_sd15_and_sd21_module_trees() {
    for (config, attn_mlp) in [(UnetConfig::sd15(), 192), (UnetConfig::sd21(), 192)] {
        let narrow = UnetConfig {
            block_out_channels: vec![32, 64, 128, 128],
            norm_num_groups: 8,
            attention_head_dim: sd_model::PerBlock::All(2),
            cross_attention_dim: 16,
            ..config
        };
        let mut unet = UNet2DConditionModel::<B>::new(&narrow, &Default::default()).unwrap();
        let paths = sites::site_paths(&mut unet);
        let mut index = ModuleIndex::new();
        sites::add_to_index(&mut index, &mut unet).unwrap();
        for path in &paths {
            let key = AdapterKey::new(Component::Unet, path.clone());
            assert_eq!(index.resolve_kohya(&key.kohya_name()), Some(&key), "{path}");
        }
        let kohya_default = paths
            .iter()
            .filter(|p| p.contains(".attentions.") && [".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"].iter().any(|s| p.ends_with(s)))
            .count();
        assert_eq!(kohya_default, attn_mlp, "kohya's default UNet target set");
        assert!(paths.contains(&"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k".to_string()));
        assert!(paths.contains(&"up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj".to_string()));
        assert!(paths.contains(&"mid_block.resnets.1.time_emb_proj".to_string()));
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &Default::default()).unwrap();
    let device = Default::default();
    let t = Tensor::<B, 1>::from_floats([1.0], &device);
    let ctx = Tensor::<B, 3>::zeros([1, 77, 32], &device);
    assert!(unet.forward(Tensor::zeros([1, 4, 7, 8], &device), t.clone(), ctx.clone()).is_err());
    assert!(unet.forward(Tensor::zeros([1, 3, 8, 8], &device), t.clone(), ctx.clone()).is_err());
    assert!(unet.forward(Tensor::zeros([1, 4, 8, 8], &device), Tensor::zeros([2], &device), ctx).is_err());
    let err = unet.forward(Tensor::zeros([1, 4, 8, 8], &device), t, Tensor::zeros([1, 77, 16], &device)).unwrap_err();
    assert!(err.to_string().contains("encoder_hidden_states"), "{err}");
}

#[test]
fn several_lora_files_at_once_equal_applying_them_in_turn() {
    let base = load("sd1", false);
    let files: Vec<sd_model::lora::LoraFile> = vec![
        format!("{}:0.5", fixtures().join("sd1_lora_kohya.safetensors").display()).parse().unwrap(),
        format!("{}:-0.25", fixtures().join("sd1_lora_peft.safetensors").display()).parse().unwrap(),
    ];
    let mut combined = base.clone();
    let applied = sd_model::lora::apply_lora_files(&mut combined, None, &files, false, &Default::default()).unwrap();
    assert!(applied.unet > 0 && applied.text_encoder == 0);
    // Reference: bake the first file at its strength, then run the second as an adapter.
    let mut sequential = base.clone();
    let index = sd_model::lora::module_index(&mut sequential, None).unwrap();
    for (i, file) in files.iter().enumerate() {
        let (set, _) = AdapterSet::load(&file.path, &index, ReadOptions::default()).unwrap();
        sites::attach_adapters(&mut sequential, &set, file.strength, &Default::default()).unwrap();
        if i == 0 {
            assert_eq!(sites::bake_adapters(&mut sequential), applied.unet);
        }
    }
    let (a, b) = (run(&combined), run(&sequential));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    assert!(diff <= 1e-4 * scale, "combined vs sequential: {diff} (scale {scale})");
    let plain = run(&base);
    let change = a.iter().zip(&plain).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(change > 1e-3 * scale, "the files must change the output");
}

#[test]
fn target_presets_select_kohya_and_diffusers_sets() {
    use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
    let narrow = UnetConfig {
        block_out_channels: vec![32, 64, 128, 128],
        norm_num_groups: 8,
        attention_head_dim: sd_model::PerBlock::All(2),
        cross_attention_dim: 16,
        ..UnetConfig::sd15()
    };
    let cfg = lora_core::LoraConfig::new(1);
    for (preset, want) in [(UnetTargets::Attn, 128), (UnetTargets::AttnMlp, 192), (UnetTargets::Conv, 278), (UnetTargets::AllLinear, 184)] {
        let mut unet = UNet2DConditionModel::<B>::new(&narrow, &Default::default()).unwrap();
        let paths = attach_new_adapters(&mut unet, &Selection::new(preset), &cfg, &Default::default()).unwrap();
        assert_eq!(paths.len(), want, "{preset:?}");
    }
    let mut unet = UNet2DConditionModel::<B>::new(&narrow, &Default::default()).unwrap();
    let sel = Selection::new(UnetTargets::Attn).exclude(["*attn1*"]).include(["mid_block.resnets.*.conv1"]);
    let paths = attach_new_adapters(&mut unet, &sel, &cfg, &Default::default()).unwrap();
    assert_eq!(paths.len(), 64 + 2);
    let bad = Selection::new(UnetTargets::Attn).include(["no_such_block.*"]);
    let err = attach_new_adapters(&mut unet, &bad, &cfg, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("no_such_block"), "{err}");
}

/// Baking a LoRA in and writing the checkpoint back (diffusers folder and single file) gives
/// a model that matches diffusers' output with the LoRA loaded.
#[test]
fn merged_checkpoints_match_diffusers_with_the_lora() {
    use lora_core::SaveDtype;
    use sd_model::load::WeightFile;
    use sd_model::save::{merge_into_single_file, save_diffusers_component};
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    for (name, single_file) in [("sd1", false), ("sd2", true)] {
        let mut unet = load(name, single_file);
        let source_path = if single_file { fixtures().join(format!("{name}_single_file.safetensors")) } else { fixtures().join(name) };
        let source = ModelSource::detect(&source_path).unwrap();
        let mut te = source.load_text_encoder::<B>(&device, &LoadOptions::default()).unwrap();
        let files = vec![sd_model::lora::LoraFile::new(fixtures().join(format!("{name}_lora_kohya.safetensors")), 1.0)];
        sd_model::lora::apply_lora_files(&mut unet, Some(&mut te), &files, false, &device).unwrap();
        sites::bake_adapters(&mut unet);
        sites::bake_adapters(&mut te);
        let merged = if single_file {
            let out = dir.path().join(format!("{name}_merged.safetensors"));
            merge_into_single_file(&WeightFile::open(&source_path).unwrap(), &unet, &te, &out, Some(SaveDtype::F32)).unwrap();
            out
        } else {
            let out = dir.path().join(format!("{name}_merged"));
            std::fs::create_dir_all(out.join("unet")).unwrap();
            std::fs::copy(source_path.join("unet/config.json"), out.join("unet/config.json")).unwrap();
            save_diffusers_component(&unet, &out.join("unet/diffusion_pytorch_model.safetensors"), SaveDtype::F32).unwrap();
            out
        };
        let reloaded = ModelSource::detect(&merged).unwrap().load_unet::<B>(&device, &LoadOptions::default()).unwrap();
        assert_close(&run(&reloaded), &format!("{name}_unet_out_lora_kohya"));
    }
}

/// Lenient reading skips LoRA keys the model lacks, but a file of which it would skip every
/// key (a LoRA for another model) is an error naming it, not a silent no-op.
#[test]
fn a_lora_file_of_which_every_key_is_skipped_is_an_error() {
    let mut unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let down = lora_core::HostTensor::new(vec![1, 4], vec![0.1; 4]).unwrap();
    let up = lora_core::HostTensor::new(vec![4, 1], vec![0.1; 4]).unwrap();
    let tensors = [("lora_unet_no_such_layer.lora_down.weight".to_string(), &down), ("lora_unet_no_such_layer.lora_up.weight".to_string(), &up)];
    std::fs::write(&path, lora_core::tensor_io::serialize(&tensors, lora_core::SaveDtype::F32, Default::default()).unwrap()).unwrap();
    let files = [sd_model::lora::LoraFile::new(&path, 1.0)];
    let err = sd_model::lora::apply_lora_files(&mut unet, None, &files, true, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("other.safetensors") && err.contains("none of its 2 LoRA keys") && err.contains("lora_unet_no_such_layer"), "{err}");
}
