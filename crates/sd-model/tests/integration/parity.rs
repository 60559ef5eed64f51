//! Text encoder and VAE outputs match transformers / diffusers on tiny random-weight models
//! (fixtures from `xtask/fixtures/sd_model.py`), loaded from both checkpoint layouts.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use sd_model::config::{read_clip_config, read_vae_config};
use sd_model::load::{self, LoadOptions, ModelSource, WeightFile};
use sd_model::{AutoencoderKl, ClipTextModel};

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

/// Reads a tensor from a fixture file as f32 values (or i64 ids) with its shape.
fn read(file: &str, key: &str) -> (Vec<usize>, TensorData) {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    let shape = view.shape().to_vec();
    let data = match view.dtype() {
        safetensors::Dtype::F32 => TensorData::new(
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(),
            shape.clone(),
        ),
        safetensors::Dtype::I64 => TensorData::new(
            view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(),
            shape.clone(),
        ),
        other => panic!("unexpected dtype {other:?}"),
    };
    (shape, data)
}

fn input4(key: &str) -> Tensor<B, 4> {
    Tensor::from_data(read("inputs.safetensors", key).1, &Default::default())
}

fn expected(key: &str) -> Vec<f32> {
    read("outputs.safetensors", key).1.to_vec::<f32>().unwrap()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn assert_close<const D: usize>(got: Tensor<B, D>, key: &str) {
    let got = got.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let err = rel_err(&got, &expected(key));
    assert!(err <= 1e-4, "{key}: relative error {err:e}");
}

fn ids() -> Tensor<B, 2, Int> {
    Tensor::from_data(read("inputs.safetensors", "input_ids").1.convert::<i32>(), &Default::default())
}

fn check_text(model: &ClipTextModel<B>, name: &str) {
    assert_close(model.forward(ids(), 1).unwrap(), &format!("{name}_text_last"));
    assert_close(model.forward(ids(), 2).unwrap(), &format!("{name}_text_skip2"));
}

fn check_vae(vae: &AutoencoderKl<B>) {
    let posterior = vae.encode(input4("pixels")).unwrap();
    assert_close(posterior.mean.clone(), "vae_mean");
    assert_close(posterior.logvar.clone(), "vae_logvar");
    assert_close(posterior.sample(input4("noise")).unwrap(), "vae_sample");
    assert_close(vae.decode(input4("latents")).unwrap(), "vae_decoded");
}

/// Both tiny models in both layouts: diffusers folders hold f16 files, single files bf16
/// (SD1: OpenAI-CLIP keys; SD2: OpenCLIP keys with fused q/k/v, an extra unused layer and
/// the projection), so loading also converts precisions.
fn sources() -> Vec<(&'static str, ModelSource)> {
    ["sd1", "sd2"]
        .into_iter()
        .flat_map(|name| {
            [
                (name, ModelSource::detect(fixtures().join(name)).unwrap()),
                (name, ModelSource::detect(fixtures().join(format!("{name}_single_file.safetensors"))).unwrap()),
            ]
        })
        .collect()
}

#[test]
fn text_encoder_matches_transformers() {
    for (name, source) in sources() {
        let model: ClipTextModel<B> = source.load_text_encoder(&Default::default(), &LoadOptions::default()).unwrap();
        check_text(&model, name);
    }
}

#[test]
fn vae_matches_diffusers() {
    for (_, source) in sources() {
        check_vae(&source.load_vae::<B>(&Default::default(), &LoadOptions::default()).unwrap());
    }
}

#[test]
fn weights_load_in_the_precision_asked_for() {
    let source = ModelSource::detect(fixtures().join("sd1")).unwrap();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let options = LoadOptions { dtype, ..Default::default() };
        let model: ClipTextModel<B> = source.load_text_encoder(&Default::default(), &options).unwrap();
        let q = &model.text_model.encoder.layers[0].self_attn.q_proj.base.weight;
        assert_eq!(q.val().dtype(), dtype);
        assert_eq!(model.text_model.final_layer_norm.gamma.val().dtype(), dtype);
    }
}

#[test]
fn explicit_loaders_accept_each_layout() {
    let config = read_clip_config(&fixtures().join("sd2/text_encoder/config.json")).unwrap();
    let mut model = ClipTextModel::<B>::new(&config, &Default::default()).unwrap();
    let file = WeightFile::open(fixtures().join("sd2_single_file.safetensors")).unwrap();
    load::load_text_encoder_single_file(&mut model, &file, DType::F32).unwrap();
    check_text(&model, "sd2");
    let config = read_vae_config(&fixtures().join("sd1/vae/config.json")).unwrap();
    let mut vae = AutoencoderKl::<B>::new(&config, &Default::default()).unwrap();
    load::load_vae_single_file(&mut vae, &WeightFile::open(fixtures().join("sd1_single_file.safetensors")).unwrap(), DType::F32).unwrap();
    check_vae(&vae);
}

/// A VAE apart from its model (kohya's `--vae`) loads into the base model's VAE from every
/// layout it comes in: a model folder, a VAE folder, a file with diffusers' names, a whole
/// checkpoint, and a file in the original layout without the checkpoint's prefix (as
/// `vae-ft-mse-840000-ema-pruned.safetensors`); the outputs are diffusers'. Anything else
/// is an error naming the path.
#[test]
fn a_separate_vae_loads_from_each_layout() {
    let config = ModelSource::detect(fixtures().join("sd1")).unwrap().vae_config().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The single file's VAE under its original names, without `first_stage_model.`.
    let single = std::fs::read(fixtures().join("sd1_single_file.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&single).unwrap();
    let vae_only: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|rest| (rest.to_string(), v))).collect();
    assert!(vae_only.len() > 10);
    let ldm = dir.path().join("vae-ldm.safetensors");
    std::fs::write(&ldm, safetensors::tensor::serialize(vae_only, None).unwrap()).unwrap();
    let paths = [
        fixtures().join("sd1"),
        fixtures().join("sd1/vae"),
        fixtures().join("sd1/vae/diffusion_pytorch_model.fp16.safetensors"),
        fixtures().join("sd1_single_file.safetensors"),
        ldm,
    ];
    for path in &paths {
        let mut vae = AutoencoderKl::<B>::new(&config, &Default::default()).unwrap();
        load::load_vae_from(&mut vae, path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check_vae(&vae);
    }
    let mut vae = AutoencoderKl::<B>::new(&config, &Default::default()).unwrap();
    for (path, expect) in [
        (fixtures().join("sd1_lora_kohya.safetensors"), "no VAE found"),
        (dir.path().to_path_buf(), "not a VAE folder"),
        (dir.path().join("missing.safetensors"), "missing.safetensors"),
    ] {
        let err = load::load_vae_from(&mut vae, &path, &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains(path.file_name().unwrap().to_str().unwrap()), "{}: {err}", path.display());
    }
}
