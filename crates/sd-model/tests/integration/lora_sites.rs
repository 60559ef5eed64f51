//! Adapter files attach to the text encoder by module path, in both layouts.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use lora_core::sites::{self, LoraSites};
use lora_core::{AdapterFormat, AdapterKey, AdapterSet, Component, HostTensor, LoraWeights, ModuleIndex, ReadOptions, SaveDtype};
use sd_model::load::{LoadOptions, ModelSource};
use sd_model::{ClipTextConfig, ClipTextModel};

type B = Flex;

#[test]
fn kohya_keys_resolve_for_every_text_encoder_site() {
    for (config, layers) in [(ClipTextConfig::sd15(), 12), (ClipTextConfig::sd21(), 23)] {
        // Small widths keep the model cheap; the module tree is what matters.
        let config = ClipTextConfig { hidden_size: 64, intermediate_size: 64, vocab_size: 10, num_attention_heads: 1, ..config };
        let mut model = ClipTextModel::<B>::new(&config, &Default::default()).unwrap();
        let paths = sites::site_paths(&mut model);
        assert_eq!(paths.len(), 6 * layers, "kohya's text-encoder target set");
        let mut index = ModuleIndex::new();
        sites::add_to_index(&mut index, &mut model).unwrap();
        for path in &paths {
            let key = AdapterKey::new(Component::TextEncoder, path.clone());
            assert_eq!(index.resolve_kohya(&key.kohya_name()), Some(&key));
        }
        assert!(paths.contains(&"text_model.encoder.layers.0.self_attn.q_proj".to_string()));
        assert!(paths.contains(&format!("text_model.encoder.layers.{}.mlp.fc2", layers - 1)));
    }
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.4).collect()
}

#[test]
fn lora_file_changes_the_encoder_like_merged_weights() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/sd1");
    let source = ModelSource::detect(&fixture).unwrap();
    let device = Default::default();
    let mut model: ClipTextModel<B> = source.load_text_encoder(&device, &LoadOptions::default()).unwrap();
    let ids: Tensor<B, 2, Int> = Tensor::from_data(TensorData::new((0..77).map(|i| i % 100).collect::<Vec<i32>>(), [1, 77]), &device);
    let before = model.forward(ids.clone(), 1).unwrap();

    // A rank-2 adapter with alpha 1 on every site.
    let mut set = AdapterSet::new();
    let mut seed = 0;
    model.visit_lora_sites(&mut |path, site| {
        let (d_in, d_out) = match site {
            lora_core::LoraSiteMut::Linear(l) => l.features(),
            lora_core::LoraSiteMut::Conv(_) | lora_core::LoraSiteMut::Norm(_) => unreachable!("the text encoder's sites are linear"),
        };
        seed += 1;
        let w = LoraWeights::new(
            HostTensor::new(vec![2, d_in], pseudo_random(2 * d_in, seed)).unwrap(),
            HostTensor::new(vec![d_out, 2], pseudo_random(2 * d_out, seed + 1000)).unwrap(),
            1.0,
            path,
        )
        .unwrap();
        set.insert(AdapterKey::new(Component::TextEncoder, path), w).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let mut index = ModuleIndex::new();
    sites::add_to_index(&mut index, &mut model).unwrap();
    let mut outputs = Vec::new();
    for format in [AdapterFormat::Kohya, AdapterFormat::Peft] {
        let path = dir.path().join("te.safetensors");
        set.save(&path, format, SaveDtype::F32).unwrap();
        let (loaded, _) = AdapterSet::load(&path, &index, ReadOptions::default()).unwrap();
        let mut with_lora = model.clone();
        assert_eq!(sites::attach_adapters(&mut with_lora, &loaded, 0.8, &device).unwrap(), 18);
        let y = with_lora.forward(ids.clone(), 1).unwrap();
        // Merging gives the same output as running the adapters.
        with_lora.visit_lora_sites(&mut |_, mut site| site.merge_in_place());
        let merged = with_lora.forward(ids.clone(), 1).unwrap();
        let diff = (y.clone() - merged).abs().max().into_scalar();
        assert!(diff < 1e-4, "merged vs unmerged: {diff}");
        outputs.push(y);
    }
    let change = (outputs[0].clone() - before).abs().max().into_scalar();
    assert!(change > 1e-2, "the adapters must change the output ({change})");
    let formats = (outputs[0].clone() - outputs[1].clone()).abs().max().into_scalar();
    assert!(formats < 1e-5, "kohya and PEFT files give the same model ({formats})");
    // Collecting the adapters back gives the same update as the file.
    let mut with_lora = model.clone();
    sites::attach_adapters(&mut with_lora, &set, 1.0, &device).unwrap();
    let mut collected = AdapterSet::new();
    assert_eq!(sites::collect_adapters(&mut with_lora, &mut collected).unwrap(), 18);
    for (key, w) in set.iter() {
        let got = collected.get(key).unwrap();
        assert_eq!(got.delta(), w.delta());
    }
}

#[test]
fn adapters_for_missing_modules_are_an_error() {
    let mut model = ClipTextModel::<B>::new(&ClipTextConfig::tiny(), &Default::default()).unwrap();
    let mut set = AdapterSet::new();
    let w = LoraWeights::new(
        HostTensor::new(vec![1, 32], vec![0.0; 32]).unwrap(),
        HostTensor::new(vec![32, 1], vec![0.0; 32]).unwrap(),
        1.0,
        "x",
    )
    .unwrap();
    set.insert(AdapterKey::new(Component::TextEncoder, "text_model.encoder.layers.9.mlp.fc1"), w.clone()).unwrap();
    let err = sites::attach_adapters(&mut model, &set, 1.0, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("layers.9.mlp.fc1"), "{err}");
    // Wrong shape for a real module names the module.
    let mut set = AdapterSet::new();
    let bad = LoraWeights::new(
        HostTensor::new(vec![1, 16], vec![0.0; 16]).unwrap(),
        HostTensor::new(vec![32, 1], vec![0.0; 32]).unwrap(),
        1.0,
        "x",
    )
    .unwrap();
    set.insert(AdapterKey::new(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc2"), bad).unwrap();
    let err = sites::attach_adapters(&mut model, &set, 1.0, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("layers.0.mlp.fc2"), "{err}");
    // Unused adapters for other components are left alone.
    let mut set = AdapterSet::new();
    set.insert(AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in"), w).unwrap();
    assert_eq!(sites::attach_adapters(&mut model, &set, 1.0, &Default::default()).unwrap(), 0);
}
