//! The loaders accept exactly the key sets of real SD1.5 / SD2.1 checkpoints (manifests from
//! `xtask/fixtures/sd_model.py`), and report missing, unexpected, mis-shaped and corrupt files.
//!
//! Each test writes a sparse file (zero-filled f16 tensors with the real keys and shapes), so
//! no multi-GB data is written or committed.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use lora_core::frozen::build_for_loading;
use burn::tensor::DType;
use sd_model::load::{self, LoadOptions, ModelSource, WeightFile};
use sd_model::{AutoencoderKl, ClipTextConfig, ClipTextModel, SdModelError, UNet2DConditionModel, UnetConfig, VaeConfig};

type B = Flex;

/// Parameters of `module` that hold no value yet: built for loading, a parameter the file
/// did not replace would still be undrawn.
fn undrawn<M: burn::module::Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
            self.0 += usize::from(!param.is_initialized());
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

fn manifest(name: &str) -> Vec<(String, Vec<usize>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/manifests/{name}.txt"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let (key, shape) = line.split_once('\t').unwrap();
            let shape = if shape.is_empty() {
                vec![]
            } else {
                shape.split(',').map(|d| d.parse().unwrap()).collect()
            };
            (key.to_string(), shape)
        })
        .collect()
}

/// Writes a safetensors file whose tensors are all zeros, without writing the zeros.
fn write_sparse(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len((8 + text.len() + offset) as u64).unwrap();
}

fn diffusers_folder(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("text_encoder")).unwrap();
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    std::fs::write(dir.join("model_index.json"), "{}").unwrap();
    write_sparse(&dir.join("text_encoder/model.fp16.safetensors"), &manifest(text));
    write_sparse(&dir.join("vae/diffusion_pytorch_model.safetensors"), &manifest("sd15_diffusers_vae"));
    dir.to_path_buf()
}

#[test]
fn sd15_diffusers_folder_loads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = diffusers_folder(dir.path(), "sd15_diffusers_text_encoder");
    std::fs::write(root.join("text_encoder/config.json"), serde_json::to_string(&ClipTextConfig::sd15()).unwrap()).unwrap();
    std::fs::write(root.join("vae/config.json"), serde_json::to_string(&VaeConfig::sd15()).unwrap()).unwrap();
    let source = ModelSource::detect(&root).unwrap();
    let options = LoadOptions { dtype: DType::F16, ..Default::default() };
    let te: ClipTextModel<B> = source.load_text_encoder(&Default::default(), &options).unwrap();
    assert_eq!(te.num_layers(), 12);
    let vae: AutoencoderKl<B> = source.load_vae(&Default::default(), &options).unwrap();
    assert_eq!(vae.downsample_factor(), 8);
}

#[test]
fn sd15_and_sd21_unets_load_exactly_from_diffusers_files() {
    for (name, config) in [("sd15_diffusers_unet", UnetConfig::sd15()), ("sd21_diffusers_unet", UnetConfig::sd21())] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unet.safetensors");
        write_sparse(&path, &manifest(name));
        let mut unet = build_for_loading(|| UNet2DConditionModel::<B>::new(&config, &Default::default())).unwrap();
        load::load_unet_diffusers(&mut unet, &WeightFile::open(&path).unwrap(), DType::F16).unwrap();
        assert_eq!(undrawn(&unet), 0, "{name}: every parameter comes from the file");
    }
}

#[test]
fn sd21_text_encoder_diffusers_layout_loads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("te.safetensors");
    write_sparse(&path, &manifest("sd21_diffusers_text_encoder"));
    let mut te = build_for_loading(|| ClipTextModel::<B>::new(&ClipTextConfig::sd21(), &Default::default())).unwrap();
    load::load_text_encoder_diffusers(&mut te, &WeightFile::open(&path).unwrap(), DType::F16).unwrap();
    assert_eq!(undrawn(&te), 0, "every parameter comes from the file");
}

#[test]
fn single_files_load_exactly_with_inferred_configs() {
    for (name, want) in [("sd15_single_file", ClipTextConfig::sd15()), ("sd21_single_file", ClipTextConfig::sd21())] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_sparse(&path, &manifest(name));
        let source = ModelSource::detect(&path).unwrap();
        assert_eq!(source.text_encoder_config().unwrap(), want, "{name}");
        assert_eq!(source.vae_config().unwrap(), VaeConfig::sd15(), "{name}");
        let unet = if name.starts_with("sd15") { UnetConfig::sd15() } else { UnetConfig::sd21() };
        assert_eq!(source.unet_config().unwrap(), unet, "{name}");
        let options = LoadOptions { dtype: DType::F16, ..Default::default() };
        source.load_text_encoder::<B>(&Default::default(), &options).unwrap();
        source.load_vae::<B>(&Default::default(), &options).unwrap();
        let unet = source.load_unet::<B>(&Default::default(), &options).unwrap();
        assert_eq!(undrawn(&unet), 0, "{name}");
    }
}

fn parity_vae() -> (PathBuf, VaeConfig) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/sd1/vae");
    let config = sd_model::config::read_vae_config(&dir.join("config.json")).unwrap();
    (dir.join("diffusion_pytorch_model.fp16.safetensors"), config)
}

fn vae_error(tensors: &[(String, Vec<usize>)]) -> SdModelError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vae.safetensors");
    write_sparse(&path, tensors);
    let mut vae = AutoencoderKl::<B>::new(&parity_vae().1, &Default::default()).unwrap();
    let file = WeightFile::open(&path).unwrap();
    load::load_vae_diffusers(&mut vae, &file, DType::F32).unwrap_err()
}

/// The key set diffusers wrote for the tiny parity VAE.
fn tiny_vae_keys() -> Vec<(String, Vec<usize>)> {
    let file = WeightFile::open(parity_vae().0).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> =
        file.keys().map(|k| (k.to_string(), file.shape(k).unwrap().to_vec())).collect();
    keys.sort();
    keys
}

#[test]
fn key_problems_are_listed_in_one_typed_error() {
    let keys = tiny_vae_keys();
    // The derived key set is exactly right...
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.safetensors");
    write_sparse(&path, &keys);
    let mut vae = AutoencoderKl::<B>::new(&parity_vae().1, &Default::default()).unwrap();
    load::load_vae_diffusers(&mut vae, &WeightFile::open(&path).unwrap(), DType::F32).unwrap();

    // ...so each change below is the only problem.
    let mut missing = keys.clone();
    missing.retain(|(k, _)| k != "decoder.conv_out.bias");
    let mut extra = keys.clone();
    extra.push(("decoder.conv_out.lora.weight".into(), vec![3]));
    let mut wrong = keys.clone();
    wrong.iter_mut().find(|(k, _)| k == "encoder.conv_in.weight").unwrap().1 = vec![8, 3, 5, 5];
    for (tensors, label, needle) in [
        (missing, "missing", "decoder.conv_out.bias"),
        (extra, "unexpected", "decoder.conv_out.lora.weight"),
        (wrong, "wrong shape", "encoder.conv_in.weight"),
    ] {
        let err = vae_error(&tensors);
        let text = err.to_string();
        assert!(matches!(err, SdModelError::KeyMismatch(_)), "{text}");
        assert!(text.contains(label) && text.contains(needle) && text.contains("vae.safetensors"), "{text}");
    }
}

#[test]
fn corrupt_and_missing_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trunc.safetensors");
    write_sparse(&path, &manifest("sd15_diffusers_vae"));
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(matches!(err, SdModelError::CorruptWeights { .. }) && err.to_string().contains("trunc.safetensors"), "{err}");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(WeightFile::open(&path).unwrap_err(), SdModelError::CorruptWeights { .. }));
    let err = WeightFile::open(dir.path().join("none.safetensors")).unwrap_err();
    assert!(matches!(err, SdModelError::Io { .. }));
    let err = ModelSource::detect(dir.path()).unwrap_err();
    assert!(matches!(err, SdModelError::Layout { .. }), "{err}");
    // A diffusers folder without the component's weights names what it expected.
    std::fs::create_dir_all(dir.path().join("vae")).unwrap();
    std::fs::write(dir.path().join("vae/config.json"), serde_json::to_string(&VaeConfig::tiny()).unwrap()).unwrap();
    let err = ModelSource::detect(dir.path()).unwrap().load_vae::<B>(&Default::default(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("diffusion_pytorch_model.safetensors"), "{err}");
    // A config with values the graph cannot use.
    std::fs::write(dir.path().join("vae/config.json"), r#"{"block_out_channels": [30], "norm_num_groups": 32}"#).unwrap();
    let err = ModelSource::detect(dir.path()).unwrap().vae_config().unwrap_err();
    assert!(matches!(err, SdModelError::InvalidConfig { .. }) && err.to_string().contains("config.json"), "{err}");
}

/// The full-size SDXL 1.0 base checkpoint (manifests from `xtask/fixtures/sd_model_sdxl.py`):
/// every config is inferred from the single file's shapes, and its UNet and both text
/// encoders map key for key, shape for shape, onto the diffusers layout. (The models
/// themselves are 3.3 B parameters; the module trees are checked at reduced width below.)
#[test]
fn sdxl_single_file_configs_and_key_maps_are_exact() {
    use sd_model::keymap::{self, UnetLayout};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl.safetensors");
    let single = manifest("sdxl_single_file");
    write_sparse(&path, &single);
    let source = ModelSource::detect(&path).unwrap();
    assert_eq!(source.unet_config().unwrap(), UnetConfig::sdxl());
    assert_eq!(source.text_encoder_config().unwrap(), ClipTextConfig::sd15());
    assert_eq!(source.text_encoder_2_config().unwrap(), Some(ClipTextConfig::sdxl_text_encoder_2()));
    assert_eq!(source.vae_config().unwrap(), VaeConfig { scaling_factor: 0.13025, ..VaeConfig::sd15() });

    let shapes: std::collections::HashMap<&str, &Vec<usize>> = single.iter().map(|(k, s)| (k.as_str(), s)).collect();
    let mapped = |pairs: Vec<(String, keymap::TensorSource)>| -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = pairs
            .into_iter()
            .map(|(ours, src)| {
                let mut shape = shapes[src.key.as_str()].clone();
                if let Some((a, b)) = src.rows {
                    shape[0] = b - a;
                }
                if src.transpose {
                    shape.reverse();
                }
                (ours, shape)
            })
            .collect();
        out.sort();
        out
    };
    let layout = UnetLayout { layers: 2, down_attention: vec![false, true, true], up_attention: vec![true, true, false] };
    let unet: Vec<_> = single
        .iter()
        .filter(|(k, _)| k.starts_with(keymap::LDM_UNET_PREFIX))
        .map(|(k, _)| (layout.ldm_key(k).unwrap_or_else(|| panic!("{k}")), keymap::TensorSource::plain(k.clone())))
        .collect();
    assert_eq!(mapped(unet), manifest("sdxl_diffusers_unet"));
    let te1: Vec<_> = single
        .iter()
        .filter(|(k, _)| k.starts_with(keymap::SDXL_TEXT_PREFIX) && !keymap::is_ignored_single_file_key(k))
        .map(|(k, _)| (keymap::sdxl_text_key(k).unwrap(), keymap::TensorSource::plain(k.clone())))
        .collect();
    assert_eq!(mapped(te1), manifest("sd15_diffusers_text_encoder"));
    let te2: Vec<_> = single
        .iter()
        .filter(|(k, _)| k.starts_with(keymap::SDXL_TEXT_2_PREFIX) && !keymap::is_ignored_single_file_key(k))
        .flat_map(|(k, _)| keymap::open_clip_key_at(keymap::SDXL_TEXT_2_PREFIX, k, 1280, 32).unwrap_or_else(|| panic!("{k}")))
        .collect();
    assert_eq!(mapped(te2), manifest("sdxl_diffusers_text_encoder_2"));
}

/// Our SDXL UNet and second text encoder have exactly diffusers' / transformers' parameter
/// names (built at reduced width; the full-size shapes are checked above).
#[test]
fn sdxl_module_trees_have_the_diffusers_names() {
    let names = |name: &str| manifest(name).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let narrow = UnetConfig {
        block_out_channels: vec![32, 64, 128],
        norm_num_groups: 8,
        attention_head_dim: sd_model::PerBlock::Each(vec![1, 2, 4]),
        cross_attention_dim: 16,
        projection_class_embeddings_input_dim: Some(8 + 6 * 256),
        ..UnetConfig::sdxl()
    };
    let unet = UNet2DConditionModel::<B>::new(&narrow, &Default::default()).unwrap();
    let ours: Vec<String> = sd_model::save::checkpoint_tensors(&unet).unwrap().into_keys().collect();
    assert_eq!(ours, names("sdxl_diffusers_unet"));
    let narrow = ClipTextConfig { hidden_size: 64, intermediate_size: 16, num_attention_heads: 1, vocab_size: 8, projection_dim: Some(16), ..ClipTextConfig::sdxl_text_encoder_2() };
    let te = ClipTextModel::<B>::new(&narrow, &Default::default()).unwrap();
    let ours: Vec<String> = sd_model::save::checkpoint_tensors(&te).unwrap().into_keys().collect();
    assert_eq!(ours, names("sdxl_diffusers_text_encoder_2"));
}

/// SDXL 1.0 base's `unet/config.json` as diffusers ships it (`null`s included) reads as
/// the preset; refiners and class-conditioned UNets are refused, naming what they are.
#[test]
fn real_sdxl_configs_read_and_unsupported_relatives_are_refused() {
    let config: UnetConfig = serde_json::from_str(
        r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": false,
        "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": 2048, "cross_attention_norm": null,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": false, "encoder_hid_dim": null, "encoder_hid_dim_type": null, "flip_sin_to_cos": true,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": null,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null, "time_embedding_act_fn": null,
        "time_embedding_dim": null, "time_embedding_type": "positional", "timestep_post_act": null,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
        "use_linear_projection": true}"#,
    )
    .unwrap();
    assert_eq!(config, UnetConfig::sdxl());
    let mut distilled = UnetConfig::sdxl();
    distilled.reverse_transformer_layers_per_block = Some(serde_json::json!([[4, 4, 10], [0, 1, 1], [0, 0, 0]]));
    assert!(distilled.validate("x").unwrap_err().to_string().contains("reverse_transformer_layers_per_block"));
    let mut short = UnetConfig::sdxl();
    short.transformer_layers_per_block = sd_model::PerBlock::Each(vec![1, 2]);
    assert!(short.validate("x").unwrap_err().to_string().contains("2 values for 3 levels"));
    // Sizes no SD model has are refused before any weight is allocated.
    let mut wide = UnetConfig::sd15();
    wide.block_out_channels = vec![80_000, 160_000, 160_000, 160_000];
    let err = wide.validate("unet/config.json").unwrap_err().to_string();
    assert!(err.contains("block_out_channels = 80000") && err.contains("unet/config.json"), "{err}");
    let mut vae = VaeConfig::sd15();
    vae.layers_per_block = 1000;
    assert!(vae.validate("x").unwrap_err().to_string().contains("layers_per_block = 1000"));
    let mut clip = ClipTextConfig::sd15();
    clip.intermediate_size = 1 << 20;
    assert!(clip.validate("x").unwrap_err().to_string().contains("intermediate_size"));
    // A layer of no channels is refused by name (before: a panic when the weights were drawn).
    let mut none = UnetConfig::tiny();
    none.in_channels = 0;
    assert!(none.validate("x").unwrap_err().to_string().contains("in_channels = 0"));
    let mut none = UnetConfig::tiny();
    none.block_out_channels[0] = 0;
    assert!(none.validate("x").unwrap_err().to_string().contains("block_out_channels = 0"));
    let mut none = VaeConfig::sd15();
    none.out_channels = 0;
    assert!(none.validate("x").unwrap_err().to_string().contains("out_channels = 0"));
    let mut none = ClipTextConfig::sd15();
    (none.hidden_size, none.num_attention_heads) = (0, 1);
    assert!(none.validate("x").unwrap_err().to_string().contains("hidden_size = 0"));
    for ok in [UnetConfig::sd15().validate("x"), UnetConfig::sdxl().validate("x"), ClipTextConfig::sdxl_text_encoder_2().validate("x")] {
        ok.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let source = |name: &str, tensors: Vec<(String, Vec<usize>)>| {
        let path = dir.path().join(name);
        write_sparse(&path, &tensors);
        ModelSource::detect(&path).unwrap()
    };
    // SD2.1 unCLIP: SD2's text width with a class embedding.
    let mut unclip = manifest("sd21_single_file");
    unclip.push(("model.diffusion_model.label_emb.0.0.weight".into(), vec![1280, 2048]));
    let err = source("unclip.safetensors", unclip).unet_config().unwrap_err();
    assert!(err.to_string().contains("unCLIP"), "{err}");
    // An SDXL refiner: its one OpenCLIP encoder sits at `conditioner.embedders.0.model`.
    let mut refiner = manifest("sdxl_single_file");
    refiner.push(("conditioner.embedders.0.model.token_embedding.weight".into(), vec![49408, 1280]));
    let err = source("refiner.safetensors", refiner).text_encoder_2_config().unwrap_err();
    assert!(err.to_string().contains("refiner"), "{err}");
    std::fs::create_dir_all(dir.path().join("refiner/text_encoder_2")).unwrap();
    std::fs::write(dir.path().join("refiner/model_index.json"), "{}").unwrap();
    let err = ModelSource::detect(dir.path().join("refiner")).unwrap().text_encoder_config().unwrap_err();
    assert!(err.to_string().contains("refiner"), "{err}");
}
