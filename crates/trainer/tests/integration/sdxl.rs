//! SDXL LoRA training and sampling on the built-in `tiny-sdxl` model: both text encoders
//! condition the UNet (states and pooled embedding), each sample's size and crop go in as
//! time ids, both text encoders can train, files carry kohya's SDXL names, block-wise
//! settings follow kohya's SDXL numbering, and the unsupported settings are typed errors.

use burn::backend::{Autodiff, Flex};
use lora_core::{AdapterFormat, AdapterSet, ReadOptions};
use sd_pipeline::{condition_prompts, decode, denoise, initial_latents, GenerateOptions};
use sd_pipeline::load_components;
use trainer::train::train;
use trainer::TrainConfig;

type B = Autodiff<Flex>;

use crate::common::seeded;

fn sdxl_config(dir: &std::path::Path, steps: usize) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.pretrained = "tiny-sdxl".into();
    c.output.output_dir = dir.to_path_buf();
    c.train.max_train_steps = steps;
    c.train.lr_warmup_steps = 1;
    c.data.demo_images = 6;
    c.output.sample_prompts.truncate(1);
    c.output.sample_steps = 2;
    c.output.log_interval_s = 0.0;
    c
}

fn tensor_names(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect()
}

/// The tiny SDXL's modules, SGM names included (`sd_model::lora::module_index_of`).
fn tiny_sdxl_index() -> lora_core::ModuleIndex {
    let mut c = load_components::<Flex>("tiny-sdxl", 0, &Default::default()).unwrap();
    let te2 = c.text_encoder_2.as_mut().unwrap();
    sd_model::lora::module_index_of(&mut c.unet, &mut [&mut c.text_encoder, te2]).unwrap()
}

#[test]
fn tiny_sdxl_trains_with_checkpointing_alike_and_writes_kohya_sdxl_names() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(dir.path(), 3);
    let plain = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(plain.losses.len(), 3);
    assert!(plain.losses.iter().all(|l| l.is_finite()), "{:?}", plain.losses);
    assert!(plain.sample_grid.as_ref().is_some_and(|p| p.is_file()));

    // kohya's SDXL layout: UNet modules by their SGM paths, SDXL's model version.
    let names = tensor_names(&plain.lora);
    assert!(names.iter().any(|n| n.starts_with("lora_unet_input_blocks_")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.")));
    assert!(names.iter().any(|n| n.starts_with("lora_unet_output_blocks_")));
    assert!(!names.iter().any(|n| n.contains("down_blocks") || n.contains("mid_block_")), "{names:?}");
    let bytes = std::fs::read(&plain.lora).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    assert_eq!(meta["ss_base_model_version"], "tiny_sdxl");

    // It applies by those names, every adapter to its module.
    let (set, _) = AdapterSet::load(&plain.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    assert_eq!(set.len() * 3, names.len(), "down, up and alpha per module");
    let mut c = load_components::<Flex>("tiny-sdxl", config.model.tiny_seed, &Default::default()).unwrap();
    let file = sd_model::lora::LoraFile::new(plain.lora.clone(), 1.0);
    let te2 = c.text_encoder_2.as_mut().unwrap();
    let applied = sd_model::lora::apply_lora_files_to(&mut c.unet, &mut [&mut c.text_encoder, te2], &[file], false, &Default::default()).unwrap();
    assert_eq!((applied.unet, applied.text_encoder), (set.len(), 0));

    // Gradient checkpointing gives the same training (the added conditioning included).
    config.train.gradient_checkpointing = true;
    let checkpointed = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    for (a, b) in plain.losses.iter().zip(&checkpointed.losses) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "losses {:?} vs {:?}", plain.losses, checkpointed.losses);
    }
    let (again, _) = AdapterSet::load(&checkpointed.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    for ((ka, wa), (kb, wb)) in set.iter().zip(again.iter()) {
        assert_eq!(ka, kb);
        let peak = wa.up.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = wa.up.data.iter().zip(&wb.up.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(peak > 0.0 && diff <= 1e-3 * peak, "{ka:?}: {diff} of {peak}");
    }

    // `trainer convert` reads the SGM names without the model, and keeps them.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {text}");
    };
    let (peft, kohya) = (dir.path().join("peft.safetensors"), dir.path().join("kohya.safetensors"));
    run(&["convert", plain.lora.to_str().unwrap(), kohya.to_str().unwrap(), "--to", "kohya", "--dtype", "f32"]);
    assert_eq!(tensor_names(&kohya).into_iter().collect::<std::collections::BTreeSet<_>>(), names.iter().cloned().collect());
    run(&["convert", plain.lora.to_str().unwrap(), peft.to_str().unwrap(), "--to", "peft", "--dtype", "f32"]);
    assert!(tensor_names(&peft).iter().all(|n| n.starts_with("unet.") && !n.contains("input_blocks")));
    let (from_peft, _) = AdapterSet::load(&peft, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    assert_eq!(from_peft.len(), set.len());

    // PEFT files keep diffusers' names.
    config.output.save_format = AdapterFormat::Peft;
    config.train.max_train_steps = 1;
    let peft = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(tensor_names(&peft.lora).iter().all(|n| n.starts_with("unet.down_blocks.") || n.starts_with("unet.mid_block.") || n.starts_with("unet.up_blocks.")));
}

#[test]
fn sdxl_runs_resume_bit_for_bit() {
    let _guard = seeded();
    let straight_dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(straight_dir.path(), 4);
    config.output.sample_prompts.clear();
    assert_resumes_bit_for_bit(config);
}

/// `config` run straight through and interrupted after step 2 then resumed (each in a
/// fresh folder): the same losses and adapters, bit for bit.
fn assert_resumes_bit_for_bit(mut config: TrainConfig) {
    config.output.save_state = true;
    let straight_dir = tempfile::tempdir().unwrap();
    config.output.output_dir = straight_dir.path().to_path_buf();
    let straight = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    config.output.output_dir = dir.path().to_path_buf();
    let first = train::<B>(&config, &Default::default(), &mut |info| info.step < 2).unwrap();
    assert!(first.interrupted);
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses));
    let data = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header..].to_vec()
    };
    assert!(data(&second.lora) == data(&straight.lora), "the same adapters");
}

#[test]
fn unsupported_sdxl_settings_are_typed_errors() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(dir.path(), 1);
    config.model.clip_skip = 2;
    let err = train::<B>(&config, &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("model.clip_skip"), "{err}");
}

/// The last layer of encoder `component` in `set` (its adapters' largest layer index).
fn last_layer(set: &AdapterSet, component: lora_core::Component) -> usize {
    set.iter()
        .filter(|(k, _)| k.component == component)
        .filter_map(|(k, _)| k.path.strip_prefix("text_model.encoder.layers.")?.split('.').next()?.parse().ok())
        .max()
        .unwrap()
}

/// The largest |up| of the adapters of `component` in `set` whose layer index is (`last`)
/// or is not (`!last`) `layer`.
fn largest_up(set: &AdapterSet, component: lora_core::Component, layer: usize, last: bool) -> f32 {
    let prefix = format!("text_model.encoder.layers.{layer}.");
    set.iter()
        .filter(|(k, _)| k.component == component && k.path.starts_with(&prefix) == last)
        .flat_map(|(_, w)| w.up.data.iter().map(|v| v.abs()))
        .fold(0.0, f32::max)
}

/// Both SDXL text encoders train (as kohya's sd-scripts train them): the first through
/// its penultimate states, the second through those and its pooled embedding, whose
/// last layer only the pooled embedding reaches. Checkpointing gives the same training,
/// the file names the encoders `lora_te1_` / `lora_te2_`, a run resumes bit for bit, and
/// the file starts a new run (`dim_from_weights`).
#[test]
fn sdxl_text_encoders_train_through_states_and_pooled_embedding() {
    use lora_core::Component::{TextEncoder, TextEncoder2};
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(dir.path(), 2);
    config.output.sample_prompts.clear();
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::AttnMlp;
    config.train.text_encoder_lr = 5e-4;
    let plain = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let names = tensor_names(&plain.lora);
    assert!(names.iter().any(|n| n.starts_with("lora_te1_text_model_encoder_layers_0_")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("lora_te2_text_model_encoder_layers_0_")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("lora_te_")), "{names:?}");
    let (set, _) = AdapterSet::load(&plain.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    let (last1, last2) = (last_layer(&set, TextEncoder), last_layer(&set, TextEncoder2));
    // The first encoder's last layer feeds nothing SDXL uses; the second's feeds the
    // pooled embedding only.
    assert_eq!(largest_up(&set, TextEncoder, last1, true), 0.0);
    assert!(largest_up(&set, TextEncoder, last1, false) > 0.0);
    assert!(largest_up(&set, TextEncoder2, last2, true) > 0.0, "no gradient reached the pooled embedding's layer");
    assert!(largest_up(&set, TextEncoder2, last2, false) > 0.0);

    // Gradient checkpointing: the same training, the pooled embedding's gradient included.
    config.train.gradient_checkpointing = true;
    let checkpointed = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    for (a, b) in plain.losses.iter().zip(&checkpointed.losses) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "losses {:?} vs {:?}", plain.losses, checkpointed.losses);
    }
    let (again, _) = AdapterSet::load(&checkpointed.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    assert_eq!(set.len(), again.len());
    for ((ka, wa), (kb, wb)) in set.iter().zip(again.iter()) {
        assert_eq!(ka, kb);
        let peak = wa.up.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = wa.up.data.iter().zip(&wb.up.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-3 * peak.max(1e-6), "{ka:?}: {diff} of {peak}");
    }

    // An interrupted run resumes to the same adapters, both encoders' optimizer states
    // included.
    config.train.gradient_checkpointing = false;
    config.train.max_train_steps = 3;
    assert_resumes_bit_for_bit(config);

    // The file starts a new run with its modules, both encoders' included.
    let next_dir = tempfile::tempdir().unwrap();
    let mut next = sdxl_config(next_dir.path(), 1);
    next.output.sample_prompts.clear();
    next.lora.network_weights = plain.lora.display().to_string();
    next.lora.dim_from_weights = true;
    let continued = train::<B>(&next, &Default::default(), &mut |_| true).unwrap();
    let (from_file, _) = AdapterSet::load(&continued.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    assert_eq!(from_file.len(), set.len());
    assert!(from_file.iter().any(|(k, _)| k.component == TextEncoder2));
}

/// kohya's block-wise settings in SDXL's numbering (23 blocks: the embeddings, 9 down,
/// the middle block's 3 layers, 9 up, the output), read off the adapters after one AdamW
/// step: a zero-initialised `up` weight moves by the learning rate times its block's
/// weight.
#[test]
fn sdxl_block_ranks_and_learning_rates_use_kohyas_sdxl_numbering() {
    use sd_model::blocks::BlockLayout;
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(dir.path(), 1);
    config.train.lr_warmup_steps = 0;
    config.output.sample_prompts.clear();
    config.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    let per_block = |edge: &str, down: &str, mid: &str, up: &str| {
        let mut v = vec![edge];
        v.extend([down; 9]);
        v.extend([mid; 3]);
        v.extend([up; 9]);
        v.push(edge);
        v.join(",")
    };
    config.lora.block_dims = per_block("0", "2", "4", "3");
    config.lora.block_alphas = per_block("0", "1", "0", "1.5");
    // The middle block's transformer (block 11) does not train; its ResNets do.
    config.lora.mid_lr_weight = "1,0".into();
    // The first up block (`output_blocks.0`, 13) at half the rate; a short list ends in ones.
    config.lora.up_lr_weight = "0.5".into();
    let lr = config.train.learning_rate as f32;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&report.lora, &tiny_sdxl_index(), ReadOptions::default()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (key, w) in set.iter() {
        let spatial = w.is_conv() && w.down.shape[2..] != [1, 1];
        let block = BlockLayout::Sdxl.block(&key.path).unwrap_or_else(|| panic!("{key}: every UNet site has an SDXL block"));
        assert_ne!(block, 11, "the middle transformer's weight is 0: {key}");
        seen.insert(block);
        let (rank, alpha) = match block {
            _ if spatial => (config.lora.rank, config.lora.alpha),
            1..=9 => (2, 1.0),
            10 | 12 => (4, 4.0),
            13..=21 => (3, 1.5),
            other => panic!("{key}: block {other} has rank 0"),
        };
        assert_eq!((w.rank(), w.alpha), (rank, alpha), "{key} (block {block})");
        let want = lr * if block == 13 { 0.5 } else { 1.0 };
        let moved: Vec<f32> = w.up.data.iter().map(|v| v.abs()).filter(|v| *v > 0.0).collect();
        let max = moved.iter().fold(0.0f32, |m, v| m.max(*v));
        let half = moved.iter().filter(|v| **v > 0.5 * want).count();
        assert!((max - want).abs() <= 2e-3 * want && 2 * half > moved.len(), "{key}: max {max} vs {want}, {half} of {} above half", moved.len());
    }
    // (The tiny SDXL has one ResNet per level: some blocks are empty.)
    assert!([10, 12, 13].iter().all(|b| seen.contains(b)), "{seen:?}");
    assert!(seen.iter().any(|b| (1..=9).contains(b)) && seen.iter().any(|b| (14..=21).contains(b)), "{seen:?}");

    // SD1.x's 25-entry lists do not fit SDXL: the error says how many do, at load time.
    let sd_dims = ["4"; 25].join(",");
    let err = TrainConfig::load(None, &["model.pretrained=\"tiny-sdxl\"".into(), format!("lora.block_dims={sd_dims:?}")]).unwrap_err().to_string();
    assert!(err.contains("lora.block_dims") && err.contains("23"), "{err}");
    let err = TrainConfig::load(None, &["model.pretrained=\"tiny-sdxl\"".into(), "lora.mid_lr_weight=\"1,1,1,1\"".into()]).unwrap_err().to_string();
    assert!(err.contains("lora.mid_lr_weight") && err.contains("3 blocks"), "{err}");
}

#[test]
fn sdxl_sampling_uses_both_encoders_and_the_pooled_embedding() {
    type I = Flex;
    let _guard = seeded();
    let device = Default::default();
    let c = load_components::<I>("tiny-sdxl", 0, &device).unwrap();
    assert!(c.is_sdxl());
    let prompts = vec!["a red circle".to_string(), "a blue square on grass".to_string()];
    let cond = condition_prompts(&c, &prompts, 1, 1, &device).unwrap();
    // Both encoders' 32-wide states side by side, and the second's 32-wide projection.
    assert_eq!(cond.context.dims(), [2, 77, 64]);
    assert_eq!(cond.pooled.as_ref().unwrap().dims(), [2, 32]);
    // The pooled embedding is the second encoder's projected end-token state.
    let ids = c.tokenizer_2.as_ref().unwrap().encode(&prompts[0]).unwrap();
    let ids = burn::tensor::Tensor::<I, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids.iter().map(|i| *i as i32).collect::<Vec<_>>(), [1, 77]),
        &device,
    );
    let direct = c.text_encoder_2.as_ref().unwrap().forward_pooled(ids, 2, false).unwrap();
    let a = direct.pooled.into_data().to_vec::<f32>().unwrap();
    let b = cond.pooled.unwrap().slice([0..1, 0..32]).into_data().to_vec::<f32>().unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5), "{a:?} vs {b:?}");

    // Long prompts: rows of 75 tokens joined, the pooled embedding from each prompt's first row.
    let long: Vec<String> = vec![format!("{} and more", "a red circle on a blue square, ".repeat(12))];
    let two_rows = sd_pipeline::condition_captions(sd_pipeline::TextEncoders::of(&c), &long, sd_pipeline::CaptionSyntax::Literal, 1, 150, &device).unwrap();
    assert_eq!(two_rows.context.dims(), [1, 152, 64]);
    let first_row: Vec<u32> = c.tokenizer_2.as_ref().unwrap().encode_chunked(&long[0], 2).unwrap()[..77].to_vec();
    let ids = burn::tensor::Tensor::<I, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(first_row.iter().map(|i| *i as i32).collect::<Vec<_>>(), [1, 77]),
        &device,
    );
    let want = c.text_encoder_2.as_ref().unwrap().forward_pooled(ids, 2, false).unwrap().pooled.into_data().to_vec::<f32>().unwrap();
    let got = two_rows.pooled.unwrap().into_data().to_vec::<f32>().unwrap();
    assert!(want.iter().zip(&got).all(|(x, y)| (x - y).abs() <= 1e-5), "{want:?} vs {got:?}");

    let opts = GenerateOptions {
        prompts: prompts.clone(),
        negative_prompt: String::new(),
        sampler: "euler".into(),
        steps: 2,
        cfg_scale: 5.0,
        seed: 3,
        width: 32,
        height: 32,
        clip_skip: 1,
        max_token_length: 75,
    };
    let images = decode(&c, denoise(&c, &opts, initial_latents(&c, &opts, &device).unwrap(), &device).unwrap()).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].width(), images[0].height()), (32, 32));
    assert_ne!(images[0], images[1], "different prompts, different images");
}

/// `trainer merge` bakes a kohya SDXL LoRA (SGM names, both encoders) into an SDXL
/// checkpoint in either layout, rewriting both encoders and leaving the projection alone;
/// `trainer generate` samples the merged folder.
#[test]
fn merge_and_generate_take_sdxl_checkpoints() {
    // Building models draws from the process-global RNG (before loading the weights).
    let _guard = seeded();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/sdxl");
    let lora = fixtures.join("lora_kohya.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let tensor = |path: &std::path::Path, key: &str| {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        t.data().to_vec()
    };
    let single = fixtures.join("tiny_single_file.safetensors");
    let merged = dir.path().join("merged.safetensors");
    let text = run(&["merge", "--model", single.to_str().unwrap(), "--lora", lora.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(text.contains("merged 194 UNet and 42 text-encoder adapters"), "{text}");
    for (key, changed) in [
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight", true),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", true),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", true),
        ("conditioner.embedders.1.model.text_projection", false),
        ("model.diffusion_model.label_emb.0.0.weight", false),
    ] {
        assert_eq!(tensor(&single, key) != tensor(&merged, key), changed, "{key}");
    }

    let folder = dir.path().join("merged-folder");
    run(&["merge", "--model", fixtures.join("tiny").to_str().unwrap(), "--lora", lora.to_str().unwrap(), "--out", folder.to_str().unwrap()]);
    let te2 = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    let before = fixtures.join("tiny/text_encoder_2/model.fp16.safetensors");
    assert_ne!(tensor(&before, te2), tensor(&folder.join("text_encoder_2/model.safetensors"), te2));
    // The merged folder loads whole (a tokenizer of its own it has not: CLIP's is used).
    let merged_model = load_components::<Flex>(folder.to_str().unwrap(), 0, &Default::default()).unwrap();
    assert!(merged_model.is_sdxl() && merged_model.base_version == sd_pipeline::SDXL_BASE_VERSION);
    let image = dir.path().join("sample.png");
    let text = run(&["generate", "--model", "tiny-sdxl", "--prompt", "a red circle", "--steps", "2", "--width", "32", "--height", "32", "--out", image.to_str().unwrap()]);
    assert!(image.is_file(), "{text}");
}

/// A real SDXL base model's LoRA metadata: kohya's model version, the SAI model spec's
/// architecture and Stability AI's implementation (kohya's rule for SDXL LoRAs).
#[test]
fn sdxl_lora_metadata_names_the_architecture() {
    use trainer::metadata::{BaseModel, RunMetadata};
    let config = TrainConfig::default();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    let base = BaseModel { version: sd_pipeline::SDXL_BASE_VERSION, v_prediction: false };
    let keys = RunMetadata::new(&config, &dataset, base, std::time::SystemTime::now()).at_save(1, 1, std::time::SystemTime::now());
    assert_eq!(keys["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(keys["ss_v2"], "False");
    assert_eq!(keys["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
    assert_eq!(keys["modelspec.implementation"], "https://github.com/Stability-AI/generative-models");
}

/// An SDXL embedding trains in both text encoders and is written as SDXL embeddings are
/// (`clip_l`, `clip_g`), alone or bundled in the LoRA (`bundle_emb.WORD.clip_l` / `clip_g`).
#[test]
fn sdxl_embeddings_train_in_both_text_encoders() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = sdxl_config(dir.path(), 2);
    config.lora.unet_targets = sd_model::targets::UnetTargets::None;
    config.embedding.token = "demostyle".into();
    config.embedding.vectors = 2;
    config.embedding.init_word = "red circle".into();
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(report.embedding_file && report.losses.iter().all(|l| l.is_finite()));
    let mut names = tensor_names(&report.lora);
    names.sort();
    assert_eq!(names, ["clip_g", "clip_l"]);
    let e = sd_model::textual_inversion::read_embedding(&report.lora).unwrap();
    assert_eq!(e.vectors.iter().map(|v| v.shape.clone()).collect::<Vec<_>>(), [[2, 32], [2, 32]]);

    config.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(!report.embedding_file);
    let names = tensor_names(&report.lora);
    for part in ["clip_l", "clip_g"] {
        assert!(names.contains(&format!("bundle_emb.demostyle.{part}")), "{names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("lora_unet_")));
}
