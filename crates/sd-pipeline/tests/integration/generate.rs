//! Generation is reproducible and LoRAs change it.

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use lora_core::sites::{LoraSiteMut, LoraSites};
use lora_core::LoraConfig;
use sd_model::targets::{attach_new_adapters, Selection, TextEncoderTargets, UnetTargets};
use sd_pipeline::{denoise, initial_latents, latents_from_noise, merge_adapters, to_precision, GenerateOptions};
use sd_pipeline::{load_components, Components};

type B = Flex;

fn opts(sampler: &str) -> GenerateOptions {
    GenerateOptions {
        prompts: vec!["a red circle, demostyle".into(), "a blue square".into()],
        negative_prompt: String::new(),
        sampler: sampler.into(),
        steps: 4,
        cfg_scale: 5.0,
        seed: 7,
        width: 32,
        height: 32,
        clip_skip: 1,
        max_token_length: 75,
    }
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// `||a - b|| / ||b||`.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    (diff / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
}

#[test]
fn same_seed_same_latents_for_every_sampler() {
    let _rng = crate::common::seeded();
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    for sampler in ["ddim", "euler_a", "dpmpp_2m_karras", "pndm", "ddpm", "euler", "heun", "dpm_2_a", "lms_karras"] {
        let o = opts(sampler);
        let a = values(denoise(&c, &o, initial_latents(&c, &o, &device).unwrap(), &device).unwrap());
        let b = values(denoise(&c, &o, initial_latents(&c, &o, &device).unwrap(), &device).unwrap());
        assert_eq!(a, b, "{sampler}");
        assert!(a.iter().all(|v| v.is_finite()), "{sampler}");
    }
    // Given latents replace the seeded noise: passing the seeded noise itself is identical.
    let o = opts("ddim");
    let noise = sd_sched::NoiseSource::<B>::sample(&mut sd_sched::SeededNoise::new(o.seed), [2, 4, 8, 8], &device).unwrap();
    let from_file = values(denoise(&c, &o, latents_from_noise(&c, &o, noise).unwrap(), &device).unwrap());
    let seeded = values(denoise(&c, &o, initial_latents(&c, &o, &device).unwrap(), &device).unwrap());
    assert_eq!(from_file, seeded);
    // Bad sizes are typed errors.
    let bad = GenerateOptions { width: 30, ..opts("ddim") };
    assert!(initial_latents(&c, &bad, &device).is_err());
    assert!(latents_from_noise(&c, &opts("ddim"), Tensor::zeros([1, 4, 8, 8], &device)).is_err());
}

/// Gives every attached adapter a random `up` (new adapters start at zero: no effect);
/// returns how many there are.
fn randomize_adapters(model: &mut impl LoraSites<B>) -> usize {
    let mut n = 0;
    let noise = Distribution::Normal(0.0, 0.2);
    model.visit_lora_sites(&mut |_, site| match site {
        LoraSiteMut::Linear(l) => {
            if let Some(a) = l.adapter.as_mut() {
                a.up.weight = a.up.weight.clone().map(|w| w.random_like(noise));
                n += 1;
            }
        }
        LoraSiteMut::Conv(c) => {
            if let Some(a) = c.adapter.as_mut() {
                a.up.weight = a.up.weight.clone().map(|w| w.random_like(noise));
                n += 1;
            }
        }
        LoraSiteMut::Norm(_) => {}
    });
    n
}

/// Merging the adapters into the weights (as `trainer generate` and the training loop's
/// samples do) gives what the unmerged adapters give, and the adapters do change the result.
#[test]
fn merged_loras_generate_what_unmerged_ones_do() {
    let _rng = crate::common::seeded();
    let device = Default::default();
    let o = opts("ddim");
    let run = |c: &Components<B>| values(denoise(c, &o, initial_latents(c, &o, &device).unwrap(), &device).unwrap());
    let mut c = load_components::<B>("tiny", 0, &device).unwrap();
    let plain = run(&c);
    attach_new_adapters(&mut c.unet, &Selection::new(UnetTargets::Conv), &LoraConfig::new(4), &device).unwrap();
    attach_new_adapters(&mut c.text_encoder, &Selection::new(TextEncoderTargets::Attn), &LoraConfig::new(4), &device).unwrap();
    let adapters = randomize_adapters(&mut c.unet) + randomize_adapters(&mut c.text_encoder);
    assert!(adapters > 10, "{adapters} adapters");
    let unmerged = run(&c);
    assert_eq!(merge_adapters(&mut c), adapters);
    let merged = run(&c);
    assert!(rel(&unmerged, &plain) > 1e-2, "the adapters change little: {}", rel(&unmerged, &plain));
    assert!(rel(&merged, &unmerged) < 1e-4, "merged vs unmerged: {}", rel(&merged, &unmerged));
    // Nothing is left to merge.
    assert_eq!(merge_adapters(&mut c), 0);
}

/// `trainer generate --precision bf16|f16`: the UNet and the text encoder in half precision
/// follow the f32 result within their rounding, and the latents stay f32.
#[test]
fn half_precision_generation_follows_f32() {
    let _rng = crate::common::seeded();
    use burn::tensor::{DType, FloatDType};
    let device = Default::default();
    let o = opts("dpmpp_2m");
    let run = |c: &Components<B>| {
        let out = denoise(c, &o, initial_latents(c, &o, &device).unwrap(), &device).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        values(out)
    };
    // One model for all: the tiny weights come from burn's process-global RNG, which the
    // other tests' threads draw from too.
    let model = load_components::<B>("tiny", 0, &device).unwrap();
    let full = run(&model);
    // Rounding each weight to 8 (bf16) or 11 (f16) significant bits moves the result by a few
    // times that through the network; a model that ignored the precision would match exactly.
    for (dtype, low, high) in [(FloatDType::BF16, 1e-4, 5e-2), (FloatDType::F16, 1e-5, 1e-2)] {
        let half = run(&to_precision(model.clone(), dtype));
        assert!(half.iter().all(|v| v.is_finite()), "{dtype:?}");
        let err = rel(&half, &full);
        assert!(err > low && err < high, "{dtype:?}: relative difference {err}");
    }
}

#[test]
fn sample_prompts_take_kohyas_options_and_batch_what_they_can() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{decode, grid, sample_images};
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let defaults = GenerateOptions { prompts: vec![], ..opts("ddim") };
    let prompts: Vec<String> = ["a red circle, demostyle", "a green circle --d 5 --w 64 --n blurry --l 3 --s 3", "a blue square"].map(String::from).to_vec();
    let images = sample_images(&c, &prompts, &defaults, &device).unwrap();
    assert_eq!(images.iter().map(|i| i.dimensions()).collect::<Vec<_>>(), [(32, 32), (64, 32), (32, 32)]);
    // The plain prompts are sampled together, as one batch of them would be ...
    let plain = GenerateOptions { prompts: vec![prompts[0].clone(), prompts[2].clone()], ..defaults.clone() };
    let batch = decode(&c, denoise(&c, &plain, initial_latents(&c, &plain, &device).unwrap(), &device).unwrap()).unwrap();
    assert!(images[0] == batch[0] && images[2] == batch[1]);
    // ... and the one with options alone, with them.
    let own = GenerateOptions {
        prompts: vec!["a green circle".into()],
        seed: 5,
        width: 64,
        negative_prompt: "blurry".into(),
        cfg_scale: 3.0,
        steps: 3,
        ..defaults.clone()
    };
    let alone = decode(&c, denoise(&c, &own, initial_latents(&c, &own, &device).unwrap(), &device).unwrap()).unwrap();
    assert!(images[1] == alone[0]);
    // A prompt with its own seed gets that seed's noise wherever it stands, also with a
    // stochastic sampler; sizes round down to the model's size step, as kohya rounds.
    let euler_a = GenerateOptions { sampler: "euler_a".into(), ..defaults.clone() };
    let seeded: Vec<String> = ["a --d 9", "b", "a --d 9", "c --w 70"].map(String::from).to_vec();
    let with_seeds = sample_images(&c, &seeded, &euler_a, &device).unwrap();
    assert!(with_seeds[0] == with_seeds[2], "the same prompt and seed, the same image");
    let alone = sample_images(&c, &seeded[..1], &euler_a, &device).unwrap();
    assert!(with_seeds[0] == alone[0]);
    let step = (c.vae.downsample_factor() * c.unet.size_multiple()) as u32;
    assert_eq!(with_seeds[3].width(), (70 - 70 % step).max(step), "{:?}", with_seeds[3].dimensions());
    // Mixed sizes share a grid of the largest cell.
    assert_eq!(grid(&images, 3).dimensions(), (3 * 64, 32));
    // Bad options (sizes too past 8192 px, which no memory holds) are errors naming the
    // prompt.
    for bad in ["x --q 3", "x --w wide", "x --ss nosuchsampler", "x --w 1e15", "x --h 8200"] {
        let err = sd_pipeline::parse_sample_prompt(bad, &defaults).unwrap_err();
        assert!(matches!(err, sd_pipeline::PipelineError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("sample prompt `{bad}`")), "{err}");
    }
}

/// Prompts are encoded in rows of 75 tokens: a short prompt keeps its states in a longer
/// layout (the encoder is causal), a long one gets the rows it needs (as in A1111), at
/// least those of `max_token_length`, and all prompts of a batch share them.
#[test]
fn long_prompts_are_encoded_in_rows_of_75_tokens() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{encode_prompts, overlong_prompts, prompt_rows};
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let long = "a lighthouse, ".repeat(30); // 90 tokens
    let prompts = vec!["a red circle".to_string(), long.clone()];
    let one_row = encode_prompts(&c, &prompts, 1, 1, &device).unwrap();
    let two_rows = encode_prompts(&c, &prompts, 1, 2, &device).unwrap();
    assert_eq!((one_row.dims(), two_rows.dims()), ([2, 77, 32], [2, 152, 32]));
    let diff = |a: Tensor<B, 3>, b: Tensor<B, 3>| (a - b).abs().max().into_scalar();
    assert!(diff(one_row.clone().slice([0..2, 0..76]), two_rows.clone().slice([0..2, 0..76])) < 1e-6);
    assert!(diff(one_row.slice([1..2, 76..77]), two_rows.slice([1..2, 76..77])) > 1e-3, "the long prompt's 76th token replaces its end token");
    assert_eq!(overlong_prompts(&c.tokenizer, prompts.iter().map(String::as_str), 75).unwrap(), (1, 90));
    assert_eq!(overlong_prompts(&c.tokenizer, prompts.iter().map(String::as_str), 150).unwrap(), (0, 90));
    let rows = |ps: &[&str], mtl| prompt_rows(&c.tokenizer, ps.iter().copied(), mtl).unwrap();
    assert_eq!((rows(&["a red circle"], 75), rows(&["a red circle"], 150), rows(&["a red circle", &long], 75)), (1, 2, 2));
    assert_eq!((rows(&["a BREAK b"], 75), rows(&["a BREAK"], 75), rows(&[&"x ".repeat(1000)], 75)), (2, 1, 8));

    let run = |o: &GenerateOptions| values(denoise(&c, o, initial_latents(&c, o, &device).unwrap(), &device).unwrap());
    // A short prompt in the layout of a LoRA trained with 150 tokens: other samples.
    let short = GenerateOptions { prompts: vec!["a red circle".into()], ..opts("ddim") };
    let short150 = GenerateOptions { max_token_length: 150, ..short.clone() };
    assert!(rel(&run(&short), &run(&short150)) > 1e-4, "the longer layout changes the samples");
    // A long prompt (or negative prompt) gets two rows either way.
    let o = GenerateOptions { prompts, negative_prompt: "blurry, ".repeat(40), ..opts("ddim") };
    let o150 = GenerateOptions { max_token_length: 150, ..o.clone() };
    let (a, b) = (run(&o), run(&o150));
    assert!(b.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);
}

/// Sample prompts read A1111 emphasis; plain prompts encode as captions do.
#[test]
fn prompt_emphasis_weights_the_text_embedding() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{encode_captions, encode_prompts, CaptionSyntax::Literal};
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let encode = |p: &str| encode_prompts(&c, &[p.to_string()], 1, 1, &device).unwrap();
    let plain = encode("a red circle");
    let literal = encode_captions(&c.text_encoder, &c.tokenizer, &["a red circle".to_string()], Literal, 1, 75, &device).unwrap();
    assert_eq!((plain.clone() - literal).abs().max().into_scalar(), 0.0);
    let weighted = encode("a (red:1.5) circle");
    let diff = (weighted.clone() - plain.clone()).abs().max().into_scalar();
    assert!(diff > 1e-3, "emphasis changes the embedding ({diff})");
    let mean = |t: Tensor<B, 3>| t.mean().into_scalar();
    assert!((mean(weighted) - mean(plain)).abs() < 1e-5, "the mean is kept");
    let o = GenerateOptions { prompts: vec!["a (red:1.5) circle".into()], ..opts("ddim") };
    let p = GenerateOptions { prompts: vec!["a red circle".into()], ..opts("ddim") };
    let run = |o: &GenerateOptions| values(denoise(&c, o, initial_latents(&c, o, &device).unwrap(), &device).unwrap());
    assert!(rel(&run(&o), &run(&p)) > 1e-5);
}

/// kohya's `weighted_captions`: captions read with emphasis in the rows of
/// `max_token_length`; a caption without emphasis encodes as it does literally, a weighted
/// word's hidden states are scaled by its weight and nothing else changes (kohya's
/// training restores no mean), and `BREAK` is a word.
#[test]
fn weighted_captions_encode_as_weighted_prompts() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{encode_captions, CaptionSyntax::{Literal, Weighted}};
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let captions = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let weighted = |p: &[&str], tokens: usize| encode_captions(&c.text_encoder, &c.tokenizer, &captions(p), Weighted, 1, tokens, &device).unwrap();
    let literal = |p: &[&str], tokens: usize| encode_captions(&c.text_encoder, &c.tokenizer, &captions(p), Literal, 1, tokens, &device).unwrap();
    let plain = weighted(&["a red circle", "a blue square"], 75);
    assert_eq!((plain - literal(&["a red circle", "a blue square"], 75)).abs().max().into_scalar(), 0.0);
    assert_eq!((weighted(&["a (red:1.0) circle"], 75) - literal(&["a red circle"], 75)).abs().max().into_scalar(), 0.0);
    let emphasis = weighted(&["a (red:1.5) circle"], 150);
    assert_eq!(emphasis.dims()[1], 152, "two rows for max_token_length = 150");
    let plain = literal(&["a red circle"], 150);
    // State 2 is `red` (after the start token and `a`): 1.5 times; the others unchanged.
    let diff = |a: Tensor<B, 3>, b: Tensor<B, 3>| (a - b).abs().max().into_scalar();
    assert!(diff(emphasis.clone().slice([0..1, 2..3]), plain.clone().slice([0..1, 2..3]).mul_scalar(1.5)) < 1e-5);
    assert!(diff(emphasis.clone().slice([0..1, 2..3]), plain.clone().slice([0..1, 2..3])) > 1e-3);
    assert_eq!(diff(emphasis.clone().slice([0..1, 0..2]), plain.clone().slice([0..1, 0..2])), 0.0);
    assert_eq!(diff(emphasis.slice([0..1, 3..152]), plain.slice([0..1, 3..152])), 0.0);
    assert_eq!(diff(weighted(&["a BREAK circle"], 75), literal(&["a break circle"], 75)), 0.0);
}

/// img2img (diffusers' `StableDiffusionImg2ImgPipeline`): `image_pixels` lays the image out
/// as `[1, 3, h, w]` in `[-1, 1]`; the run starts at the step where `strength` of the steps
/// remain (two timestep entries per step for Heun and DPM-2), from the image's latents
/// noised to that level, reproducibly; a weak strength ends near the image's latents, far
/// nearer than a full-strength run does.
#[test]
fn img2img_starts_from_the_image_at_its_strength() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{denoise_from, image_pixels, img2img_latents, init_image_size};
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let image = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8]));
    let px = image_pixels::<B>(&image, 32, 32, &device);
    let flat = values(px.clone());
    for (x, y) in [(0usize, 0usize), (5, 9), (31, 30)] {
        let p = image.get_pixel(x as u32, y as u32);
        for ch in 0..3 {
            let want = f32::from(p[ch]) / 127.5 - 1.0;
            assert!((flat[ch * 32 * 32 + y * 32 + x] - want).abs() < 1e-6, "pixel ({x}, {y}) channel {ch}");
        }
    }
    assert_eq!(image_pixels::<B>(&image, 16, 8, &device).dims(), [1, 3, 8, 16]);
    let o = opts("ddim");
    assert_eq!(init_image_size(&c, &GenerateOptions { width: 0, height: 0, ..o.clone() }, (70, 33)), (64, 32));
    assert_eq!(init_image_size(&c, &o, (70, 33)), (32, 32));

    // The image's own latents, as img2img_latents draws its posterior sample.
    let posterior = c.vae.encode(px).unwrap();
    let eps = sd_sched::NoiseSource::<B>::sample(&mut sd_sched::SeededNoise::new(o.seed + 2), posterior.mean.dims(), &device).unwrap();
    let clean = values(c.vae.scale_latents(posterior.sample(eps).unwrap()).repeat_dim(0, 2));

    for (sampler, strength, first) in [("ddim", 0.5, 2), ("dpmpp_2m", 1.0, 0), ("heun", 0.5, 4), ("dpm_2_a", 0.75, 2), ("pndm", 0.25, 3), ("lms_karras", 0.5, 2)] {
        let o = opts(sampler);
        let (z, begin) = img2img_latents(&c, &o, &image, strength, &device).unwrap();
        assert_eq!(begin, first, "{sampler} at {strength}");
        assert_eq!(z.dims(), [2, 4, 8, 8]);
        let a = values(denoise_from(&c, &o, z, begin, &device).unwrap());
        let (z, _) = img2img_latents(&c, &o, &image, strength, &device).unwrap();
        assert_eq!(a, values(denoise_from(&c, &o, z, begin, &device).unwrap()), "{sampler}: reproducible");
        assert!(a.iter().all(|v| v.is_finite()), "{sampler}");
    }
    let o = GenerateOptions { steps: 10, ..opts("ddim") };
    let (weak, begin) = img2img_latents(&c, &o, &image, 0.1, &device).unwrap();
    assert_eq!(begin, 9);
    let weak = values(denoise_from(&c, &o, weak, begin, &device).unwrap());
    let (full, _) = img2img_latents(&c, &o, &image, 1.0, &device).unwrap();
    let full = values(denoise_from(&c, &o, full, 0, &device).unwrap());
    let (near, far) = (rel(&weak, &clean), rel(&full, &clean));
    assert!(near < 0.5 && near < far / 20.0, "strength 0.1 ends {near} from the image's latents, strength 1 {far}");
}

/// Inpainting (diffusers' inpainting pipeline with a text-to-image UNet): the mask is
/// binarised at half white and sampled down by the nearest pixel; the run ends with the
/// image's own latents wherever the mask keeps them and repaints the rest; strength 1
/// starts from pure noise times the sampler's initial sigma, lower strengths as img2img.
#[test]
fn inpainting_keeps_the_image_outside_the_mask() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{denoise_masked, img2img_latents, inpaint_latents, mask_latents};
    let device = Default::default();
    // Left half white (repaint), right half black; one grey column just under one half.
    let mask = image::RgbImage::from_fn(32, 32, |x, _| match x {
        0..=15 => image::Rgb([255, 255, 255]),
        16 => image::Rgb([127, 127, 127]),
        _ => image::Rgb([0, 0, 0]),
    });
    let m = values(mask_latents::<B>(&mask, (32, 32), (8, 8), &device).unwrap());
    for (i, v) in m.iter().enumerate() {
        assert_eq!(*v, if i % 8 < 4 { 1.0 } else { 0.0 }, "mask at ({}, {})", i % 8, i / 8);
    }
    // Luma, as PIL's convert("L"): pure green is 150/255 (repaint), pure blue 29/255 (keep).
    let colours = image::RgbImage::from_fn(2, 1, |x, _| if x == 0 { image::Rgb([0, 255, 0]) } else { image::Rgb([0, 0, 255]) });
    assert_eq!(values(mask_latents::<B>(&colours, (2, 1), (2, 1), &device).unwrap()), [1.0, 0.0]);

    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let image = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 90]));
    for (sampler, strength) in [("euler_a", 1.0), ("ddim", 0.6), ("heun", 0.5), ("dpmpp_2m", 0.75)] {
        let o = opts(sampler);
        let (z, first, keep) = inpaint_latents(&c, &o, &image, &mask, strength, &device).unwrap();
        assert_eq!(keep.mask.dims(), [2, 1, 8, 8]);
        let (img2img, img2img_first) = img2img_latents(&c, &o, &image, strength, &device).unwrap();
        assert_eq!(first, img2img_first, "{sampler}");
        if strength == 1.0 {
            let sigma = {
                let mut s = o.sampler.parse::<sd_sched::SamplerSpec>().unwrap().build::<B>(&c.scheduler).unwrap();
                s.set_timesteps(o.steps).unwrap();
                s.init_noise_sigma()
            };
            assert_eq!(values(z.clone()), values(keep.noise.clone() * sigma), "{sampler}: pure noise at strength 1");
        } else {
            assert_eq!(values(z.clone()), values(img2img), "{sampler}: img2img's start below strength 1");
        }
        let out = denoise_masked(&c, &o, z, first, Some(&keep), &device).unwrap();
        let (out, image_latents) = (values(out), values(keep.image.clone()));
        let mut repainted = 0.0f32;
        for (i, (a, b)) in out.iter().zip(&image_latents).enumerate() {
            if i % 8 >= 4 {
                assert_eq!(a, b, "{sampler}: kept latent {i}");
            } else {
                repainted += (a - b).abs();
            }
        }
        assert!(repainted > 1.0, "{sampler}: the masked half was repainted ({repainted})");
    }
}

/// The latent hires fix's upscale matches `torch.nn.functional.interpolate(x, (6, 8),
/// mode="bicubic")` (values from torch 2.15 for `x = arange(12).reshape(1, 1, 3, 4) ** 1.5 / 10`).
#[test]
fn latent_upscale_is_torchs_bicubic() {
    let _rng = crate::common::seeded();
    let device = Default::default();
    let x: Vec<f32> = (0..12).map(|i| (i as f32).powf(1.5) / 10.0).collect();
    let x = burn::tensor::Tensor::<burn::backend::Flex, 4>::from_data(burn::tensor::TensorData::new(x, [1, 1, 3, 4]), &device);
    let y = sd_pipeline::upscale_latents(x, [6, 8]).into_data().to_vec::<f32>().unwrap();
    let torch = [
        -0.092497, -0.072731, -0.042223, 0.030358, 0.09963, 0.225239, 0.334724, 0.40244, 0.114511, 0.155088, 0.219226, 0.330202, 0.420063, 0.575431, 0.705686, 0.786406, 0.43747, 0.511882,
        0.630699, 0.804011, 0.927229, 1.130781, 1.294637, 1.396395, 1.176961, 1.285292, 1.458824, 1.697214, 1.857479, 2.115378, 2.317967, 2.44394, 1.915388, 2.038568, 2.235955, 2.505414,
        2.685497, 2.973215, 3.197795, 3.337486, 2.369572, 2.502269, 2.714947, 3.004199, 3.196817, 3.503368, 3.74181, 3.890149,
    ];
    for (i, (a, b)) in y.iter().zip(torch).enumerate() {
        assert!((a - b).abs() < 1e-5, "{i}: {a} vs torch {b}");
    }
}

/// A textual-inversion embedding whose vector is the token embedding of "red" (one set
/// for SD1, `clip_l` / `clip_g` for SDXL) makes "a NAME circle" generate exactly what
/// "a red circle" does; an embedding of the wrong width is refused.
#[test]
fn textual_inversion_embeddings_stand_for_their_vectors() {
    let _rng = crate::common::seeded();
    use sd_model::textual_inversion::expand_prompt;
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    for model in ["tiny", "tiny-sdxl"] {
        let plain = load_components::<B>(model, 0, &device).unwrap();
        let red = plain.tokenizer.encode_unpadded("red").unwrap()[0] as usize;
        let row = |e: &sd_model::ClipTextModel<B>| {
            let w = e.text_model.embeddings.token_embedding.weight.val();
            let d = w.dims()[1];
            lora_core::HostTensor::new(vec![1, d], w.slice([red..red + 1, 0..d]).into_data().to_vec::<f32>().unwrap()).unwrap()
        };
        let mut tensors = vec![];
        match &plain.text_encoder_2 {
            None => tensors.push(("emb_params".to_string(), row(&plain.text_encoder))),
            Some(second) => {
                tensors.push(("clip_l".to_string(), row(&plain.text_encoder)));
                tensors.push(("clip_g".to_string(), row(second)));
            }
        }
        let path = dir.path().join(format!("MyColor{}.safetensors", model.len()));
        let refs: Vec<(String, &lora_core::HostTensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
        std::fs::write(&path, lora_core::tensor_io::serialize(&refs, lora_core::SaveDtype::F32, Default::default()).unwrap()).unwrap();

        let mut with = plain.clone();
        let names = sd_pipeline::load_embeddings(&mut with, std::slice::from_ref(&path), &[], &device).unwrap();
        let name = path.file_stem().unwrap().to_str().unwrap().to_lowercase();
        let o = |c: &Components<B>, prompt: &str| {
            let o = GenerateOptions { prompts: vec![prompt.into()], ..opts("ddim") };
            values(denoise(c, &o, initial_latents(c, &o, &device).unwrap(), &device).unwrap())
        };
        let expanded = expand_prompt(&format!("a {name} circle"), &names);
        assert!(expanded.starts_with("a <emb:"), "{expanded}");
        assert_eq!(o(&with, &expanded), o(&plain, "a red circle"), "{model}");
        assert_ne!(o(&with, "a blue circle"), o(&with, &expanded), "{model}");

        // The same vectors bundled in a LoRA file (A1111's `bundle_emb.NAME.…`; SD1 as a
        // `.pt` embedding's `string_to_param.*`): the bundle stands for "red" too.
        let lora = dir.path().join(format!("bundle{}.safetensors", model.len()));
        let bundled: Vec<(String, lora_core::HostTensor)> = tensors
            .iter()
            .map(|(k, t)| (format!("bundle_emb.Crimson.{}", if k == "emb_params" { "string_to_param.*" } else { k }), t.clone()))
            .collect();
        let refs: Vec<(String, &lora_core::HostTensor)> = bundled.iter().map(|(k, t)| (k.clone(), t)).collect();
        std::fs::write(&lora, lora_core::tensor_io::serialize(&refs, lora_core::SaveDtype::F32, Default::default()).unwrap()).unwrap();
        let mut from_lora = plain.clone();
        let names = sd_pipeline::load_embeddings(&mut from_lora, &[], std::slice::from_ref(&lora), &device).unwrap();
        assert_eq!(names.iter().map(|(n, t)| (n.as_str(), t.len())).collect::<Vec<_>>(), [("Crimson", 1)]);
        assert_eq!(o(&from_lora, &expand_prompt("a crimson circle", &names)), o(&plain, "a red circle"), "{model}: bundled");
        // A file's embedding of the same name wins over the bundle's.
        let file_named = dir.path().join("crimson.safetensors");
        std::fs::copy(&path, &file_named).unwrap();
        let mut both = plain.clone();
        let names = sd_pipeline::load_embeddings(&mut both, std::slice::from_ref(&file_named), std::slice::from_ref(&lora), &device).unwrap();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_file(&file_named).unwrap();

        // The other family's file: the wrong number of sets or width.
        let mut other = load_components::<B>(if model == "tiny" { "tiny-sdxl" } else { "tiny" }, 0, &device).unwrap();
        let e = sd_pipeline::load_embeddings(&mut other, std::slice::from_ref(&path), &[], &device).unwrap_err().to_string();
        assert!(e.contains(path.file_name().unwrap().to_str().unwrap()), "{e}");
    }
}

/// Inputs that would sample nonsense or panic are errors naming them: no prompts, a
/// non-finite guidance scale, latents or inpainting tensors that do not fit the prompts,
/// empty images and masks, a second set of LoRA files over attached adapters, an unknown
/// image extension, the hires fix's steps; a width of 0 samples img2img at the image's size.
#[test]
fn bad_inputs_are_errors_that_name_them() {
    let _rng = crate::common::seeded();
    use sd_pipeline::{generate, img2img_latents, inpaint_latents, mask_latents, HiresFix, PipelineError};
    let device = Default::default();
    let mut c = load_components::<B>("tiny", 0, &device).unwrap();
    let o = GenerateOptions { prompts: vec!["a red circle".into()], ..opts("ddim") };
    let origin = |e: PipelineError| match e {
        PipelineError::Invalid { origin, .. } => origin,
        e => panic!("not an input error: {e:?}"),
    };
    let bad = |edit: fn(&mut GenerateOptions)| {
        let mut bad = o.clone();
        edit(&mut bad);
        origin(generate(&c, &bad, &device).unwrap_err())
    };
    assert_eq!(bad(|o| o.prompts.clear()), "prompts");
    assert_eq!(bad(|o| o.cfg_scale = f32::NAN), "cfg_scale");
    assert_eq!(bad(|o| o.cfg_scale = f32::INFINITY), "cfg_scale");
    assert_eq!(bad(|o| o.steps = 0), "steps");
    assert_eq!(bad(|o| o.clip_skip = 0), "clip_skip");
    assert_eq!(bad(|o| o.max_token_length = 0), "max_token_length");
    assert_eq!(bad(|o| o.max_token_length = 100), "max_token_length");

    // Latents for two prompts with one prompt; inpainting tensors for another batch.
    let two = GenerateOptions { prompts: vec!["a".into(), "b".into()], ..o.clone() };
    let z2 = initial_latents(&c, &two, &device).unwrap();
    assert_eq!(origin(denoise(&c, &o, z2, &device).unwrap_err()), "latents");
    let image = image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]));
    let mask = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
    let (z, first, keep) = inpaint_latents(&c, &o, &image, &mask, 0.5, &device).unwrap();
    let (z_two, _, _) = inpaint_latents(&c, &two, &image, &mask, 0.5, &device).unwrap();
    assert_eq!(origin(sd_pipeline::denoise_masked(&c, &two, z_two, first, Some(&keep), &device).unwrap_err()), "inpainting image");
    sd_pipeline::denoise_masked(&c, &o, z, first, Some(&keep), &device).unwrap();

    // Empty images and masks.
    let empty = image::RgbImage::new(0, 0);
    assert_eq!(origin(img2img_latents(&c, &o, &empty, 0.5, &device).unwrap_err()), "init image");
    assert_eq!(origin(inpaint_latents(&c, &o, &image, &empty, 0.5, &device).unwrap_err()), "inpainting mask");
    assert_eq!(origin(mask_latents::<B>(&mask, (0, 0), (8, 8), &device).unwrap_err()), "inpainting mask");
    // A strength error names the strength once.
    let e = img2img_latents(&c, &o, &image, 1.5, &device).unwrap_err().to_string();
    assert!(e.starts_with("img2img strength: must be in (0, 1]") && !e.contains("`strength`"), "{e}");

    // Width and height 0: the image's own size, rounded down to the model's multiple.
    let step = (c.vae.downsample_factor() * c.unet.size_multiple()) as u32;
    let wide = image::RgbImage::from_pixel(3 * step + 1, 2 * step, image::Rgb([10, 200, 30]));
    let own = GenerateOptions { width: 0, height: 0, ..o.clone() };
    let (z, _) = img2img_latents(&c, &own, &wide, 0.5, &device).unwrap();
    let f = c.vae.downsample_factor();
    assert_eq!(z.dims()[2..], [2 * step as usize / f, 3 * step as usize / f]);

    // The hires fix: kohya's / A1111's defaults, and a first pass of no steps.
    assert_eq!(HiresFix::default(), HiresFix { scale: 0.5, steps: 28, strength: 0.7, latents: false });
    let big = GenerateOptions { width: 64, height: 64, ..o.clone() };
    assert_eq!(origin(HiresFix { steps: 0, ..HiresFix::default() }.first_pass(&c, &big).unwrap_err()), "hires fix steps");

    // LoRA files over attached adapters would replace them.
    attach_new_adapters(&mut c.unet, &Selection::new(UnetTargets::Attn), &LoraConfig::new(4), &device).unwrap();
    let file: sd_pipeline::LoraFile = "never-read.safetensors:0.5".parse().unwrap();
    let e = sd_pipeline::attach_lora_files(&mut c, &[file], &device).unwrap_err();
    assert!(e.to_string().contains("merge_adapters first"), "{e}");
    // Adapters that blow the activations up: an error, not black images.
    c.unet.visit_lora_sites(&mut |_, site| {
        if let LoraSiteMut::Linear(l) = site {
            if let Some(a) = l.adapter.as_mut() {
                a.up.weight = a.up.weight.clone().map(|w| w.ones_like() * 1e30);
            }
        }
    });
    assert!(matches!(generate(&c, &o, &device), Err(PipelineError::NonFinite)));
    assert!(matches!(sd_pipeline::sample_images(&c, &o.prompts, &o, &device), Err(PipelineError::NonFinite)));

    // Image files: by extension, or an error naming the file.
    let dir = tempfile::tempdir().unwrap();
    sd_pipeline::save_png(&image, &dir.path().join("x.jpg")).unwrap();
    assert_eq!(image::image_dimensions(dir.path().join("x.jpg")).unwrap(), (32, 32));
    let e = sd_pipeline::save_png(&image, &dir.path().join("x.txt")).unwrap_err().to_string();
    assert!(e.contains("x.txt") && e.contains(".png"), "{e}");
    assert!(!dir.path().join("x.txt").exists());
}

/// SDXL: each encoder's states take their own tokenizer's emphasis weights. The second
/// tokenizer keeps its pad token `!` apart (`wow!!` is two tokens there, `!!` one in the
/// first), so the first tokenizer's weights would land one state early on its states.
#[test]
fn sdxl_emphasis_weighs_each_encoders_states_by_its_own_tokens() {
    use sd_pipeline::text::{condition_captions, condition_prompts, CaptionSyntax, TextEncoders};
    let device = Default::default();
    let c = load_components::<B>("tiny-sdxl", 0, &device).unwrap();
    let (tok, tok_2) = (&c.tokenizer, c.tokenizer_2.as_ref().unwrap());
    let prompt = "wow!! (red:1.5) car";
    let ((_, w1), (_, w2)) = (tok.encode_weighted(prompt, 1).unwrap(), tok_2.encode_weighted(prompt, 1).unwrap());
    assert_ne!(w1, w2, "the two tokenizers place the weight apart");
    let weighted = condition_prompts(&c, &[prompt.to_string()], 1, 1, &device).unwrap().context;
    let plain = condition_captions(TextEncoders::of(&c), &["wow!! red car".to_string()], CaptionSyntax::Literal, 1, 75, &device).unwrap().context;
    let [n, len, d] = plain.dims();
    let width = c.text_encoder.text_model.final_layer_norm.gamma.dims()[0];
    let half = |t: &Tensor<B, 3>, range: std::ops::Range<usize>| t.clone().slice([0..n, 0..len, range]);
    for (range, weights) in [(0..width, &w1), (width..d, &w2)] {
        let want = sd_model::prompt::apply_weights(half(&plain, range.clone()), weights).unwrap();
        let diff = (half(&weighted, range.clone()) - want).abs().max().into_scalar();
        assert!(diff < 1e-4, "{range:?}: {diff}");
    }
}

/// An embedding whose name a prompt's emphasis would take apart (`neg(v2)`) is an error
/// naming its file, not tokens that never match; names expand longest first.
#[test]
fn embedding_names_must_be_one_word() {
    let device = Default::default();
    let mut c = load_components::<B>("tiny", 0, &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let width = c.text_encoder.hidden_size();
    let vectors = lora_core::HostTensor::new(vec![1, width], vec![0.1; width]).unwrap();
    let write = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, lora_core::tensor_io::serialize(&[("emb_params".to_string(), &vectors)], lora_core::SaveDtype::F32, Default::default()).unwrap()).unwrap();
        path
    };
    let err = sd_pipeline::load_embeddings(&mut c, &[write("neg(v2).safetensors")], &[], &device).unwrap_err().to_string();
    assert!(err.contains("neg(v2).safetensors") && err.contains("rename the file"), "{err}");
    let loaded = sd_pipeline::load_embeddings(&mut c, &[write("style.safetensors"), write("style.v2.safetensors")], &[], &device).unwrap();
    assert_eq!(sd_model::textual_inversion::expand_prompt("style.v2, style", &loaded), "<emb:style.v2:0>, <emb:style:0>");
}

/// A single-file checkpoint samples with its family's official scheduler config, as
/// diffusers' `from_single_file` does and as `convert-model` writes it: SDXL's `leading`
/// spacing with `steps_offset` 1 (SD1.x's config leaves the spacing to each sampler).
#[test]
fn single_files_sample_with_their_familys_scheduler_config() {
    let device = Default::default();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures");
    let sdxl = load_components::<B>(fixtures.join("sdxl/tiny_single_file.safetensors").to_str().unwrap(), 0, &device).unwrap();
    assert_eq!((sdxl.scheduler.timestep_spacing, sdxl.scheduler.steps_offset), (Some(sd_sched::TimestepSpacing::Leading), 1));
    assert_eq!(sdxl.scheduler.class_name.as_deref(), Some("EulerDiscreteScheduler"));
    let sd1 = load_components::<B>(fixtures.join("parity/sd1_single_file.safetensors").to_str().unwrap(), 0, &device).unwrap();
    assert_eq!((sd1.scheduler.timestep_spacing, sd1.scheduler.steps_offset), (None, 1));
    assert_eq!(sd1.scheduler.prediction_type, sd_sched::PredictionType::Epsilon);
}

/// At a guidance scale of 1 or less the prompt's branch alone runs, as in diffusers and
/// sd-scripts: the negative prompt and the scale's value then change nothing.
#[test]
fn guidance_of_one_or_less_runs_the_prompt_alone() {
    let device = Default::default();
    let c = load_components::<B>("tiny", 0, &device).unwrap();
    let run = |cfg_scale: f32, negative: &str| {
        let o = GenerateOptions { cfg_scale, negative_prompt: negative.into(), ..opts("ddim") };
        values(denoise(&c, &o, initial_latents(&c, &o, &device).unwrap(), &device).unwrap())
    };
    let one = run(1.0, "");
    assert_eq!(run(1.0, "a very long negative prompt, blurry, lowres, watermark"), one);
    assert_eq!(run(0.5, "blurry"), one);
    assert_eq!(run(0.0, "blurry"), one);
    // Above 1 the negative prompt is the unconditional branch.
    assert_ne!(run(1.5, "blurry"), run(1.5, ""));
}
