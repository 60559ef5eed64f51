//! Runs the model components on tensors from a safetensors file, for parity checks against
//! diffusers / transformers.
//!
//! ```text
//! cargo run --release -p sd-model --example components -- \
//!     --model DIR_OR_FILE --inputs IN.safetensors --out OUT.safetensors \
//!     [--lora FILE[:S] ... [--lora-scale S]] [--clip-skip N]
//! ```
//!
//! IN may hold `input_ids` [B,77] (i32 or i64), `pixels` [B,3,H,W] f32 in [-1,1],
//! `latents` [B,4,h,w] f32, `timesteps` [B] (int or float) and `encoder_hidden_states`
//! [B,77,D] f32. OUT receives, for the inputs present, `text_embeds` (last_hidden_state),
//! `vae_mean` (posterior mean), `vae_decoded` (decoder output for unscaled latents) and
//! `unet_out` (the UNet's prediction for `latents` at `timesteps`, conditioned on
//! `encoder_hidden_states`, or else on `text_embeds`), all f32. LoRA files apply to the text
//! encoder and the UNet.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use sd_model::load::{LoadOptions, ModelSource};
use sd_model::lora::{apply_lora_files, LoraFile};

#[cfg(feature = "cuda")]
type B = burn::backend::Cuda;
#[cfg(not(feature = "cuda"))]
type B = burn::backend::Flex;

#[derive(Parser)]
#[command(about = "Run SD components on input tensors (parity checks)")]
struct Args {
    /// A diffusers model folder or a single-file checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Input tensors (safetensors).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// LoRA files (kohya or diffusers/PEFT layout) as FILE[:STRENGTH]; repeatable.
    #[arg(long)]
    lora: Vec<sd_model::lora::LoraFile>,
    /// Strength multiplier for every LoRA file.
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f32,
    /// CLIP skip (1 = last layer, 2 = penultimate, ...).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
}

/// Shape and values of an output tensor.
type HostData = (Vec<usize>, Vec<f32>);

struct Inputs {
    tensors: HashMap<String, (Vec<usize>, TensorData)>,
}

impl Inputs {
    fn read(path: &PathBuf) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not safetensors", path.display()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let shape = view.shape().to_vec();
            let b = view.data();
            let data = match view.dtype() {
                safetensors::Dtype::F32 => TensorData::new(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>(), shape.clone()),
                safetensors::Dtype::I64 => TensorData::new(
                    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as i32).collect::<Vec<_>>(),
                    shape.clone(),
                ),
                safetensors::Dtype::I32 => TensorData::new(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>(), shape.clone()),
                safetensors::Dtype::F64 => TensorData::new(
                    b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect::<Vec<_>>(),
                    shape.clone(),
                ),
                other => bail!("{}: tensor `{name}` has dtype {other:?}; expected F32, I32 or I64", path.display()),
            };
            tensors.insert(name.to_string(), (shape, data));
        }
        Ok(Self { tensors })
    }

    fn float4<Bk: Backend>(&self, name: &str, device: &Bk::Device) -> Result<Option<Tensor<Bk, 4>>> {
        let Some((shape, data)) = self.tensors.get(name) else { return Ok(None) };
        if shape.len() != 4 {
            bail!("`{name}` must be 4-d, got shape {shape:?}");
        }
        Ok(Some(Tensor::from_data(data.clone().convert::<f32>(), device)))
    }

    fn float<const D: usize, Bk: Backend>(&self, name: &str, device: &Bk::Device) -> Result<Option<Tensor<Bk, D>>> {
        let Some((shape, data)) = self.tensors.get(name) else { return Ok(None) };
        if shape.len() != D {
            bail!("`{name}` must be {D}-d, got shape {shape:?}");
        }
        Ok(Some(Tensor::from_data(data.clone().convert::<f32>(), device)))
    }

    fn ids<Bk: Backend>(&self, vocab: usize, device: &Bk::Device) -> Result<Option<Tensor<Bk, 2, Int>>> {
        let Some((shape, data)) = self.tensors.get("input_ids") else { return Ok(None) };
        if shape.len() != 2 {
            bail!("`input_ids` must be [batch, 77], got shape {shape:?}");
        }
        let ids = data.clone().convert::<i32>();
        if let Some(bad) = ids.iter::<i32>().find(|i| *i < 0 || *i as usize >= vocab) {
            bail!("`input_ids` holds token id {bad}, outside the vocabulary of {vocab}");
        }
        Ok(Some(Tensor::from_data(ids, device)))
    }
}

fn host(t: Tensor<B, 3>) -> Result<(Vec<usize>, Vec<f32>)> {
    host_dyn(t.dims().to_vec(), t.into_data())
}

fn host4(t: Tensor<B, 4>) -> Result<(Vec<usize>, Vec<f32>)> {
    host_dyn(t.dims().to_vec(), t.into_data())
}

fn host_dyn(shape: Vec<usize>, data: TensorData) -> Result<(Vec<usize>, Vec<f32>)> {
    let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((shape, values))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Default::default();
    let source = ModelSource::detect(&args.model)?;
    let inputs = Inputs::read(&args.inputs)?;
    let options = LoadOptions::default();
    let mut outputs: Vec<(String, HostData)> = Vec::new();
    let loras: Vec<LoraFile> = args
        .lora
        .iter()
        .map(|f| LoraFile { path: f.path.clone(), strength: f.strength * args.lora_scale, text_encoder: f.text_encoder.map(|s| s * args.lora_scale), block_weights: f.block_weights.clone() })
        .collect();

    let latents = inputs.float::<4, B>("latents", &device)?;
    let timesteps = inputs.float::<1, B>("timesteps", &device)?;
    let mut context = inputs.float::<3, B>("encoder_hidden_states", &device)?;
    let wants_unet = latents.is_some() && timesteps.is_some();
    let mut unet = if wants_unet || !loras.is_empty() {
        Some(source.load_unet::<B>(&device, &options)?)
    } else {
        None
    };

    let vocab = source.text_encoder_config().map(|c| c.vocab_size).unwrap_or(49408);
    let ids = inputs.ids::<B>(vocab, &device)?;
    let mut te = if ids.is_some() || !loras.is_empty() {
        Some(source.load_text_encoder::<B>(&device, &options)?)
    } else {
        None
    };
    if !loras.is_empty() && let Some(unet) = unet.as_mut() {
        let applied = apply_lora_files(unet, te.as_mut(), &loras, false, &device)?;
        eprintln!("LoRA: {} UNet and {} text-encoder adapters", applied.unet, applied.text_encoder);
    }
    if let (Some(ids), Some(te)) = (ids, &te) {
        let embeds = te.forward(ids, args.clip_skip)?;
        context = context.or_else(|| Some(embeds.clone()));
        outputs.push(("text_embeds".into(), host(embeds)?));
    }
    if let Some(p) = inputs.float4::<B>("pixels", &device)? {
        let vae = source.load_vae::<B>(&device, &options)?;
        outputs.push(("vae_mean".into(), host4(vae.encode(p)?.mean)?));
        if let Some(z) = latents.clone() {
            outputs.push(("vae_decoded".into(), host4(vae.decode(z)?)?));
        }
    } else if let Some(z) = latents.clone() {
        let vae = source.load_vae::<B>(&device, &options)?;
        outputs.push(("vae_decoded".into(), host4(vae.decode(z)?)?));
    }
    if let (Some(unet), Some(z), Some(t)) = (&unet, latents, timesteps) {
        let Some(ctx) = context else {
            bail!("unet_out needs `encoder_hidden_states` or `input_ids` in {}", args.inputs.display());
        };
        outputs.push(("unet_out".into(), host4(unet.forward(z, t, ctx)?)?));
    }
    if outputs.is_empty() {
        bail!("{} holds none of input_ids, pixels, latents", args.inputs.display());
    }
    let hosts: Vec<(String, lora_core::HostTensor)> = outputs
        .into_iter()
        .map(|(k, (shape, data))| Ok((k, lora_core::HostTensor::new(shape, data)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(String, &lora_core::HostTensor)> = hosts.iter().map(|(k, t)| (k.clone(), t)).collect();
    let bytes = lora_core::tensor_io::serialize(&refs, lora_core::SaveDtype::F32, Default::default())?;
    lora_core::tensor_io::write_atomic(&args.out, &bytes)?;
    for (k, t) in &hosts {
        eprintln!("{k}: {:?}", t.shape);
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
