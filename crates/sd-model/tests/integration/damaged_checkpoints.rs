//! Damaged checkpoints are typed errors, never panics: the tiny single-file checkpoints of
//! the parity fixtures (SD1, SD2 with OpenCLIP's fused attention, SDXL with two text
//! encoders), each with one thing done to it, go through everything a run does with a
//! user's checkpoint: detecting the layout, inferring every config from the shapes, and
//! loading each component.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use proptest::prelude::*;
use sd_model::load::{LoadOptions, ModelSource};

type B = Flex;

fn fixture(which: usize) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    match which % 3 {
        0 => dir.join("parity/sd1_single_file.safetensors"),
        1 => dir.join("parity/sd2_single_file.safetensors"),
        _ => dir.join("sdxl/tiny_single_file.safetensors"),
    }
}

/// One thing done to a checkpoint; places are taken modulo what the file has.
#[derive(Clone, Debug)]
enum Damage {
    /// Cut the file to this many thousandths of its length.
    Truncate(usize),
    /// Overwrite the byte at this many thousandths of the length.
    Byte(usize, u8),
    /// Leave out a tensor.
    Drop(usize),
    /// Give a tensor another shape (any rank, sizes from 0; its bytes repeated or cut).
    Reshape(usize, Vec<usize>),
    /// Change one digit of a tensor's name (`input_blocks.1.` to `input_blocks.7.`).
    Renumber(usize, u8),
    /// Store a tensor's bytes as another type (sizes that no longer match are cut or padded).
    Retype(usize, safetensors::Dtype),
    /// Leave out the header's metadata (the configs this project embeds), so that every
    /// config is inferred from the shapes as for downloaded checkpoints; then do the rest.
    Plain(Box<Damage>),
}

fn damage() -> impl Strategy<Value = Damage> {
    use safetensors::Dtype::*;
    prop_oneof![
        (0usize..1000).prop_map(Damage::Truncate),
        (0usize..1000, any::<u8>()).prop_map(|(p, b)| Damage::Byte(p, b)),
        any::<usize>().prop_map(Damage::Drop),
        (any::<usize>(), prop::collection::vec(0usize..9, 0..5)).prop_map(|(i, s)| Damage::Reshape(i, s)),
        (any::<usize>(), 0u8..10).prop_map(|(i, d)| Damage::Renumber(i, d)),
        (any::<usize>(), prop::sample::select(vec![F32, F16, BF16, I64, U8, F64])).prop_map(|(i, t)| Damage::Retype(i, t)),
    ]
    .prop_flat_map(|d| prop_oneof![Just(d.clone()), Just(Damage::Plain(Box::new(d)))])
}

/// `bytes` (a valid safetensors file) with `damage` done to it.
fn damaged(bytes: &[u8], damage: &Damage) -> Vec<u8> {
    let at = |thousandths: usize| bytes.len() * thousandths / 1000;
    let (damage, metadata) = match damage {
        Damage::Plain(inner) => (&**inner, false),
        other => (other, true),
    };
    match damage {
        Damage::Truncate(t) => return bytes[..at(*t)].to_vec(),
        Damage::Byte(p, b) => {
            let mut out = bytes.to_vec();
            if let Some(x) = out.get_mut(at(*p)) {
                *x = *b;
            }
            return out;
        }
        _ => {}
    }
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let header = safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone().filter(|_| metadata);
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let n = tensors.len();
    // Bytes for `count` elements of `dtype`, from the old ones (repeated or cut).
    let fit = |data: &[u8], dtype: safetensors::Dtype, shape: &[usize]| -> Vec<u8> {
        let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        (0..len).map(|i| if data.is_empty() { 0 } else { data[i % data.len()] }).collect()
    };
    match damage {
        Damage::Drop(i) => drop(tensors.remove(i % n)),
        Damage::Reshape(i, shape) => {
            let t = &mut tensors[i % n];
            t.3 = fit(&t.3, t.1, shape);
            t.2 = shape.clone();
        }
        Damage::Renumber(i, digit) => {
            let name = &mut tensors[i % n].0;
            if let Some(p) = name.find(|c: char| c.is_ascii_digit()) {
                name.replace_range(p..p + 1, &digit.to_string());
            }
        }
        Damage::Retype(i, dtype) => {
            let t = &mut tensors[i % n];
            t.3 = fit(&t.3, *dtype, &t.2);
            t.1 = *dtype;
        }
        Damage::Truncate(_) | Damage::Byte(..) | Damage::Plain(_) => {}
    }
    // A renamed tensor may land on one already there: the later one stays.
    let unique: std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(k, d, s, b)| (k, (d, s, b))).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = unique
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, header).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Each damaged checkpoint is detected, its configs inferred and its components
    /// loaded — or refused with an error naming the file — and never panics.
    #[test]
    fn damaged_single_file_checkpoints_are_errors_not_panics(which in 0usize..3, damage in damage()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, damaged(&std::fs::read(fixture(which)).unwrap(), &damage)).unwrap();
        let source = match ModelSource::detect(&path) {
            Ok(source) => source,
            Err(err) => {
                prop_assert!(err.to_string().contains("model.safetensors"), "{}", err);
                return Ok(());
            }
        };
        let (device, options) = (Default::default(), LoadOptions::default());
        let named = |err: sd_model::SdModelError| err.to_string().contains("model.safetensors");
        let results = [
            source.unet_config().map(drop),
            source.text_encoder_config().map(drop),
            source.text_encoder_2_config().map(drop),
            source.vae_config().map(drop),
            source.load_unet::<B>(&device, &options).map(drop),
            source.load_text_encoder::<B>(&device, &options).map(drop),
            source.load_text_encoder_2::<B>(&device, &options).map(drop),
            source.load_vae::<B>(&device, &options).map(drop),
        ];
        for result in results {
            if let Err(err) = result {
                let text = err.to_string();
                prop_assert!(named(err), "an error that does not name the file: {}", text);
            }
        }
    }
}

/// `bytes` (a safetensors file) with `extra` tensors: (name, copy of this tensor of the
/// file); without its header metadata unless `keep_metadata` (the configs this project
/// embeds; without them they are inferred from the shapes, as for downloaded checkpoints).
fn with_tensors(bytes: &[u8], extra: &[(&str, &str)], keep_metadata: bool) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    for (name, like) in extra {
        views.push((name.to_string(), st.tensor(like).unwrap()));
    }
    let header = safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone().filter(|_| keep_metadata);
    safetensors::serialize(views, header).unwrap()
}

/// A block index no model has (`input_blocks.99999999999`) is an error naming the key, not
/// a config inference that loops over every index below it; two keys of one text-encoder
/// weight (`transformer.text_model.X` beside `transformer.X`) are refused, not loaded in
/// whichever order the header's map gives.
#[test]
fn absurd_block_indices_and_two_keys_of_one_weight_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(fixture(0)).unwrap();
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    std::fs::write(&path, with_tensors(&bytes, &[("model.diffusion_model.input_blocks.99999999999.0.weight", conv_in)], false)).unwrap();
    let err = ModelSource::detect(&path).and_then(|s| s.unet_config().map(drop)).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("input_blocks.99999999999") && err.contains("at most"), "{err}");
    let token = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
    std::fs::write(&path, with_tensors(&bytes, &[("cond_stage_model.transformer.embeddings.token_embedding.weight", token)], true)).unwrap();
    let source = ModelSource::detect(&path).unwrap();
    let err = source.load_text_encoder::<B>(&Default::default(), &LoadOptions::default()).map(drop).unwrap_err().to_string();
    assert!(err.contains("a second key") && err.contains("token_embedding"), "{err}");
}
