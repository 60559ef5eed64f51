//! SDXL: the UNet with its added conditioning, both text encoders (penultimate states and
//! the projected pooled output) and kohya's SDXL LoRA files match diffusers / transformers
//! on a tiny random-weight SDXL, loaded from a diffusers folder and from a single file
//! (fixtures from `xtask/fixtures/sd_model_sdxl.py`); the SGM key maps invert each other.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use lora_core::{Component, LoraSites};
use sd_model::keymap::{UnetLayout, LDM_UNET_PREFIX};
use sd_model::load::{LoadOptions, ModelSource, WeightFile};
use sd_model::lora::{apply_lora_files_to, LoraFile};
use sd_model::save::{checkpoint_tensors, merge_into_single_file_with};
use sd_model::{AddedConditions, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UnetConfig};

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl")
}

fn read(file: &str, key: &str) -> TensorData {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    let shape = view.shape().to_vec();
    match view.dtype() {
        safetensors::Dtype::F32 => TensorData::new(
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(),
            shape,
        ),
        safetensors::Dtype::I64 => TensorData::new(
            view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32).collect::<Vec<_>>(),
            shape,
        ),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn input<Bk: Backend, const D: usize>(key: &str) -> Tensor<Bk, D> {
    Tensor::from_data(read("inputs.safetensors", key), &Default::default())
}

fn output<Bk: Backend, const D: usize>(key: &str) -> Tensor<Bk, D> {
    Tensor::from_data(read("outputs.safetensors", key), &Default::default())
}

fn ids(key: &str) -> Tensor<B, 2, Int> {
    Tensor::from_data(read("inputs.safetensors", key), &Default::default())
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn assert_close<Bk: Backend, const D: usize>(got: Tensor<Bk, D>, key: &str) {
    let want = read("outputs.safetensors", key);
    assert_eq!(got.dims().to_vec(), want.shape.to_vec(), "{key}: shape");
    let got = got.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let err = rel_err(&got, &want.to_vec::<f32>().unwrap());
    assert!(err <= 1e-4, "{key}: relative error {err:e}");
}

struct Sdxl<Bk: Backend> {
    unet: UNet2DConditionModel<Bk>,
    te1: ClipTextModel<Bk>,
    te2: ClipTextModel<Bk>,
}

fn sources() -> [ModelSource; 2] {
    [
        ModelSource::detect(fixtures().join("tiny")).unwrap(),
        ModelSource::detect(fixtures().join("tiny_single_file.safetensors")).unwrap(),
    ]
}

fn load<Bk: Backend>(source: &ModelSource) -> Sdxl<Bk> {
    let (device, options) = (Default::default(), LoadOptions::default());
    Sdxl {
        unet: source.load_unet(&device, &options).unwrap(),
        te1: source.load_text_encoder(&device, &options).unwrap(),
        te2: source.load_text_encoder_2(&device, &options).unwrap().expect("an SDXL model has a second encoder"),
    }
}

fn added<Bk: Backend>(text_embeds: Tensor<Bk, 2>) -> Option<AddedConditions<Bk>> {
    Some(AddedConditions { text_embeds, time_ids: input("time_ids") })
}

fn unet_out<Bk: Backend>(unet: &UNet2DConditionModel<Bk>) -> Tensor<Bk, 4> {
    let (latents, t) = (input("unet_latents"), input("timesteps"));
    unet.forward_added(latents, t, output("context"), added(output("te2_text_embeds"))).unwrap()
}

/// SDXL's conditioning from both encoders: the penultimate layers' raw states side by side,
/// and the second encoder's projected pooled output.
fn encode(m: &Sdxl<B>) -> (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 3>, Tensor<B, 2>) {
    let one = m.te1.forward_pooled(ids("input_ids_1"), 2, false).unwrap();
    let two = m.te2.forward_pooled(ids("input_ids_2"), 2, false).unwrap();
    (one.hidden, one.pooled, two.hidden, two.pooled)
}

#[test]
fn text_encoders_match_transformers_in_both_layouts() {
    for source in sources() {
        let m = load::<B>(&source);
        assert_eq!(m.te2.component, Component::TextEncoder2);
        assert!(m.te1.text_projection.is_none() && m.te2.text_projection.is_some());
        let (h1, p1, h2, p2) = encode(&m);
        assert_close(h1.clone(), "te1_hidden_penultimate");
        assert_close(p1, "te1_pooled");
        assert_close(h2.clone(), "te2_hidden_penultimate");
        assert_close(p2, "te2_text_embeds");
        assert_close(Tensor::cat(vec![h1, h2], 2), "context");
        assert_close(m.te1.forward(ids("input_ids_1"), 1).unwrap(), "te1_last");
        assert_close(m.te2.forward(ids("input_ids_2"), 1).unwrap(), "te2_last");
    }
}

#[test]
fn unet_with_added_conditioning_matches_diffusers_in_both_layouts() {
    for source in sources() {
        let m = load::<B>(&source);
        assert!(m.unet.has_added_conditions());
        assert_close(unet_out(&m.unet), "unet_out");
        // The added conditioning is required, and checked.
        let (latents, t) = (input::<B, 4>("unet_latents"), input::<B, 1>("timesteps"));
        let err = m.unet.forward(latents.clone(), t.clone(), output("context")).unwrap_err();
        assert!(err.to_string().contains("text_embeds and time_ids"), "{err}");
        let short = added(output::<B, 2>("te2_text_embeds").slice([0..2, 0..31]));
        let err = m.unet.forward_added(latents, t, output("context"), short).unwrap_err();
        assert!(err.to_string().contains("must be 80"), "{err}");
    }
}

#[test]
fn gradient_through_the_added_conditioning_matches_torch() {
    type A = Autodiff<Flex>;
    let mut m = load::<A>(&sources()[0]);
    let linear = &mut m.unet.add_embedding.as_mut().unwrap().linear_1.base;
    linear.weight = linear.weight.clone().set_require_grad(true);
    let out = unet_out(&m.unet);
    let grads = (out * input::<A, 4>("grad_weights")).sum().backward();
    let weight = &m.unet.add_embedding.as_ref().unwrap().linear_1.base.weight;
    // burn keeps linear weights as [in, out], torch as [out, in].
    let grad = weight.grad(&grads).unwrap().transpose();
    assert_close(grad, "unet_grad_add_linear_1");
}

/// A LoRA of SD1 on the SDXL model fails to fit, and the error says which family it is for.
#[test]
fn a_lora_of_the_other_family_is_named_as_such() {
    let device = Default::default();
    let sd1_lora = fixtures().join("../parity/sd1_lora_kohya.safetensors");
    let mut m = load::<B>(&sources()[0]);
    let err = apply_lora_files_to(&mut m.unet, &mut [&mut m.te1, &mut m.te2], &[LoraFile::new(sd1_lora, 1.0)], false, &device).unwrap_err().to_string();
    assert!(err.contains("sd1_lora_kohya") && err.contains("this LoRA is for SD1.x / SD2.x, and the model is SDXL"), "{err}");
    assert_eq!(err.matches("sd1_lora_kohya").count(), 1, "the file is named once: {err}");
    // An SDXL LoRA with an SD1.x block-weight list (every preset is one): the blocks it
    // names sit at other layers of SDXL's UNet, so it is refused; SDXL's 12 values fit.
    let sdxl_lora = fixtures().join("lora_kohya.safetensors");
    let with = |lbw: &str| format!("{}:1:lbw={lbw}", sdxl_lora.display()).parse::<LoraFile>().unwrap();
    let err = apply_lora_files_to(&mut m.unet, &mut [&mut m.te1, &mut m.te2], &[with("ALL")], false, &device).unwrap_err().to_string();
    assert!(err.contains("lbw=`ALL`") && err.contains("12 or 20 values"), "{err}");
    apply_lora_files_to(&mut m.unet, &mut [&mut m.te1, &mut m.te2], &[with("1,1,1,1,1,1,0,0,0,0,0,0")], false, &device).unwrap();
}

#[test]
fn kohya_sdxl_lora_matches_diffusers_and_bakes_into_the_single_file() {
    let device = Default::default();
    let file = LoraFile::new(fixtures().join("lora_kohya.safetensors"), 1.0);
    for (i, source) in sources().iter().enumerate() {
        let mut m = load::<B>(source);
        let applied = apply_lora_files_to(&mut m.unet, &mut [&mut m.te1, &mut m.te2], std::slice::from_ref(&file), false, &device).unwrap();
        assert_eq!((applied.unet, applied.text_encoder), (194, 42), "every SGM-named UNet module and both encoders' modules");
        let (h1, _, h2, p2) = encode(&m);
        assert_close(h1, "lora_te1_hidden_penultimate");
        assert_close(h2, "lora_te2_hidden_penultimate");
        assert_close(p2, "lora_te2_text_embeds");
        assert_close(unet_out(&m.unet), "lora_unet_out");
        if i == 0 {
            continue;
        }
        // Baked into a copy of the single file (both encoders under their own keys, the
        // projection written back transposed), it loads back as the LoRA'd model (in f32:
        // this LoRA's large updates, rounded to the file's bf16, would move the output ~5%).
        assert_eq!(lora_core::sites::bake_adapters(&mut m.unet), 194);
        assert_eq!(lora_core::sites::bake_adapters(&mut m.te1) + lora_core::sites::bake_adapters(&mut m.te2), 42);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged.safetensors");
        let ModelSource::SingleFile(path) = source else { unreachable!() };
        merge_into_single_file_with(&WeightFile::open(path).unwrap(), &m.unet, &[&m.te1, &m.te2], &out, Some(lora_core::SaveDtype::F32)).unwrap();
        let merged = load::<B>(&ModelSource::detect(&out).unwrap());
        assert_close(unet_out(&merged.unet), "lora_unet_out");
        let (h1, _, h2, p2) = encode(&merged);
        assert_close(h1, "lora_te1_hidden_penultimate");
        assert_close(h2, "lora_te2_hidden_penultimate");
        assert_close(p2, "lora_te2_text_embeds");
        // Two encoders of one kind would share their adapters and keys: refused.
        let err = merge_into_single_file_with(&WeightFile::open(path).unwrap(), &m.unet, &[&m.te1, &m.te1], &dir.path().join("x.safetensors"), None).unwrap_err();
        assert!(err.to_string().contains("two text encoders"), "{err}");
        let base = checkpoint_tensors(&load::<B>(source).te2).unwrap();
        let baked = checkpoint_tensors(&merged.te2).unwrap();
        assert_eq!(base["text_projection.weight"].data, baked["text_projection.weight"].data, "untouched by the LoRA");
    }
}

/// Every parameter's LDM key, built from its module's SGM path, maps back to it; every
/// adapter site has an SGM name, and no two share one.
fn check_sgm_names(config: &UnetConfig) {
    let mut unet = UNet2DConditionModel::<B>::new(config, &Default::default()).unwrap();
    let layout = UnetLayout::of(&unet);
    for key in checkpoint_tensors(&unet).unwrap().keys() {
        let (module, param) = key.rsplit_once('.').unwrap();
        let ldm = layout.ldm_module_path(module).unwrap_or_else(|| panic!("{module}: no SGM name"));
        assert_eq!(layout.ldm_key(&format!("{LDM_UNET_PREFIX}{ldm}.{param}")).as_deref(), Some(key.as_str()), "{module} -> {ldm}");
    }
    let mut names = std::collections::HashSet::new();
    unet.visit_lora_sites(&mut |path, _| {
        let ldm = layout.ldm_module_path(path).unwrap_or_else(|| panic!("{path}: no SGM name"));
        assert!(names.insert(ldm.clone()), "{ldm} twice");
    });
}

#[test]
fn sgm_module_names_invert_the_single_file_key_map() {
    for config in [UnetConfig::tiny(), UnetConfig::tiny_sdxl(), {
        let mut sd1 = UnetConfig::tiny();
        sd1.down_block_types = vec!["CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()];
        sd1.up_block_types = vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into()];
        sd1.layers_per_block = 2;
        sd1
    }] {
        check_sgm_names(&config);
    }
    // Full-size SDXL names, as kohya's SDXL LoRA files spell them.
    let sdxl = UnetLayout { layers: 2, down_attention: vec![false, true, true], up_attention: vec![true, true, false] };
    for (ours, sgm) in [
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "input_blocks.4.1.transformer_blocks.1.attn2.to_k"),
        ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
        ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("add_embedding.linear_1", "label_emb.0.0"),
    ] {
        assert_eq!(sdxl.ldm_module_path(ours).as_deref(), Some(sgm), "{ours}");
    }
    for no_name in ["up_blocks.2.upsamplers.0.conv", "down_blocks.2.downsamplers.0.conv", "down_blocks.0.attentions.0.proj_in", "mid_block.resnets.2.conv1"] {
        assert_eq!(sdxl.ldm_module_path(no_name), None, "{no_name}");
    }
}

#[test]
fn pooled_output_reads_the_first_end_token_whatever_pads_the_row() {
    let device = Default::default();
    let te = ClipTextModel::<B>::new(&ClipTextConfig::tiny_sdxl_text_encoder_2(), &device).unwrap();
    let row = |pad: i32| Tensor::<B, 2, Int>::from_ints([[49406, 320, 1125, 49407, pad, pad, pad]], &device);
    let with_end = te.forward_pooled(row(49407), 1, true).unwrap();
    let with_zero = te.forward_pooled(row(0), 1, true).unwrap();
    let (a, b) = (with_end.pooled.into_data().to_vec::<f32>().unwrap(), with_zero.pooled.into_data().to_vec::<f32>().unwrap());
    assert!(rel_err(&a, &b) < 1e-6, "causal attention: the end token's state ignores what follows");
    // It is the projection of the final-normed last layer at position 3.
    let hidden = te.forward(row(0), 1).unwrap().slice([0..1, 3..4, 0..32]).reshape([1, 32]);
    let projected = te.text_projection.as_ref().unwrap().forward(hidden).into_data().to_vec::<f32>().unwrap();
    assert!(rel_err(&b, &projected) < 1e-6);
    assert!(te.forward_pooled(row(0), 5, false).is_err(), "clip_skip beyond the 4 layers");
}

#[test]
fn configs_and_presets() {
    // SD1.5's text encoder config carries projection_dim but no projection layer.
    let sd15: ClipTextConfig = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":768,"intermediate_size":3072,"num_hidden_layers":12,"num_attention_heads":12,
            "max_position_embeddings":77,"hidden_act":"quick_gelu","projection_dim":768,"architectures":["CLIPTextModel"]}"#,
    )
    .unwrap();
    assert_eq!(sd15.text_projection_dim(), None);
    assert_eq!(ClipTextConfig::sdxl_text_encoder_2().text_projection_dim(), Some(1280));
    let sdxl = UnetConfig::sdxl();
    sdxl.validate("sdxl").unwrap();
    assert!(sdxl.has_text_time());
    let mut bad = sdxl.clone();
    bad.addition_time_embed_dim = None;
    assert!(bad.validate("x").unwrap_err().to_string().contains("addition_time_embed_dim"));
    bad.addition_embed_type = Some("image".into());
    assert!(bad.validate("x").unwrap_err().to_string().contains("`image`"));
    // A plain UNet refuses added conditioning.
    let device = Default::default();
    let unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &device).unwrap();
    let added = AddedConditions { text_embeds: Tensor::zeros([1, 32], &device), time_ids: Tensor::zeros([1, 6], &device) };
    let err = unet.forward_added(Tensor::zeros([1, 4, 8, 8], &device), Tensor::zeros([1], &device), Tensor::zeros([1, 77, 32], &device), Some(added));
    assert!(err.unwrap_err().to_string().contains("no added conditioning"));
}

/// kohya's SDXL names (SGM UNet paths, `lora_te1_` / `lora_te2_`) are kept when a file is
/// read and written again, and given to adapters that come from the model.
#[test]
fn sdxl_kohya_names_survive_reading_and_writing() {
    use lora_core::{AdapterFormat, AdapterSet, ReadOptions, SaveDtype};
    let mut m = load::<B>(&sources()[0]);
    let index = sd_model::lora::module_index_of(&mut m.unet, &mut [&mut m.te1, &mut m.te2]).unwrap();
    let path = fixtures().join("lora_kohya.safetensors");
    let (set, _) = AdapterSet::load(&path, &index, ReadOptions { lenient: false }).unwrap();
    let names = |bytes: &[u8]| -> std::collections::BTreeSet<String> {
        safetensors::SafeTensors::deserialize(bytes).unwrap().names().into_iter().map(String::from).collect()
    };
    let original = names(&std::fs::read(&path).unwrap());
    assert_eq!(names(&set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap()), original);
    let mut fresh = AdapterSet::new();
    for (key, weights) in set.iter() {
        fresh.insert(key.clone(), weights.clone()).unwrap();
    }
    assert_ne!(names(&fresh.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap()), original);
    assert_eq!(sd_model::lora::use_sdxl_kohya_names(&mut fresh, &m.unet), 194 + 18);
    assert_eq!(names(&fresh.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap()), original);
}

/// A file that names one module twice (its SGM and its diffusers name) is refused.
#[test]
fn a_module_named_twice_is_an_error() {
    use lora_core::{AdapterSet, LoraError, ReadOptions};
    let mut m = load::<B>(&sources()[0]);
    let index = sd_model::lora::module_index_of(&mut m.unet, &mut [&mut m.te1, &mut m.te2]).unwrap();
    let bytes = std::fs::read(fixtures().join("lora_kohya.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(rest) = name.strip_prefix("lora_unet_middle_block_1_proj_in") {
            views.push((format!("lora_unet_mid_block_attentions_0_proj_in{rest}"), view.clone()));
        }
        views.push((name, view));
    }
    let doubled = safetensors::serialize(views, None).unwrap();
    let err = AdapterSet::from_bytes(&doubled, Path::new("doubled.safetensors"), &index, ReadOptions { lenient: false }).unwrap_err();
    assert!(matches!(err, LoraError::DuplicateModule { .. }), "{err}");
    assert!(err.to_string().contains("mid_block.attentions.0.proj_in"), "{err}");
}
