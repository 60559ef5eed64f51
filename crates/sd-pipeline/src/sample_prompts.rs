//! kohya's sample prompts (`PROMPT --n NEGATIVE --w 768 --d 42 ...`) and sampling a list
//! of them as training's sample images are drawn.

use burn::tensor::backend::Backend;
use image::RgbImage;
use sd_sched::SamplerSpec;

use crate::sampling::{generate, GenerateOptions};
use crate::{Components, PipelineError};

/// The most denoising steps a sample may take: SD's training timesteps (sample prompts'
/// `--s` is clamped to it, as sd-scripts clamps it).
pub const MAX_SAMPLE_STEPS: usize = 1000;

/// A sample prompt with kohya's per-prompt options (sd-scripts' sample prompt files):
/// `PROMPT --n NEGATIVE --w WIDTH --h HEIGHT --d SEED --l CFG_SCALE --s STEPS --ss SAMPLER`,
/// each option optional and in any order. Returns `defaults` with the prompt as its only
/// prompt and the options applied; an unknown option or a bad value is an error naming
/// the prompt.
///
/// ```
/// use sd_pipeline::{parse_sample_prompt, GenerateOptions};
/// let defaults = GenerateOptions {
///     prompts: vec![],
///     negative_prompt: String::new(),
///     sampler: "ddim".into(),
///     steps: 20,
///     cfg_scale: 5.0,
///     seed: 1,
///     width: 512,
///     height: 512,
///     clip_skip: 1,
///     max_token_length: 75,
/// };
/// let o = parse_sample_prompt("a lighthouse at dusk, mystyle --n blurry, lowres --w 768 --d 42 --l 7.5", &defaults)?;
/// assert_eq!(o.prompts, ["a lighthouse at dusk, mystyle"]);
/// assert_eq!((o.negative_prompt.as_str(), o.width, o.height, o.seed, o.cfg_scale, o.steps), ("blurry, lowres", 768, 512, 42, 7.5, 20));
/// let err = parse_sample_prompt("a lighthouse --w 0", &defaults).unwrap_err();
/// assert!(err.to_string().contains("--w 0"), "{err}");
/// # Ok::<(), sd_pipeline::PipelineError>(())
/// ```
pub fn parse_sample_prompt(text: &str, defaults: &GenerateOptions) -> Result<GenerateOptions, PipelineError> {
    Ok(parse_prompt_options(text, defaults)?.0)
}

/// [`parse_sample_prompt`], and whether the prompt sets its own seed (`--d`).
fn parse_prompt_options(text: &str, defaults: &GenerateOptions) -> Result<(GenerateOptions, bool), PipelineError> {
    let mut seeded = false;
    let mut parts = text.split(" --");
    let mut o = GenerateOptions { prompts: vec![parts.next().unwrap_or_default().trim().to_string()], ..defaults.clone() };
    for part in parts {
        let (key, value) = part.split_once(char::is_whitespace).unwrap_or((part, ""));
        let value = value.trim();
        let bad = |what: &str| PipelineError::Invalid {
            origin: format!("sample prompt `{text}`"),
            reason: format!("--{key} {value}: {what}"),
        };
        let number = |what: &str| value.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| bad(what));
        let side = |v: f64| match v {
            v if v < 1.0 => Err(bad("expected a size of at least 1 px (it is rounded to the model's size step)")),
            v if v > f64::from(sd_data::MAX_SIDE) => Err(bad(&format!("at most {} px", sd_data::MAX_SIDE))),
            v => Ok(v as usize),
        };
        match key.to_ascii_lowercase().as_str() {
            "n" => o.negative_prompt = value.to_string(),
            "w" => o.width = side(number("expected a width in pixels")?)?,
            "h" => o.height = side(number("expected a height in pixels")?)?,
            "d" => {
                o.seed = value.parse().map_err(|_| bad("expected a seed (a whole number)"))?;
                seeded = true;
            }
            "l" => o.cfg_scale = number("expected a guidance scale (a number, at least 0)")? as f32,
            // As sd-scripts: clamped to the model's training timesteps.
            "s" => o.steps = (number("expected a number of steps")? as usize).clamp(1, MAX_SAMPLE_STEPS),
            "ss" => {
                value.parse::<SamplerSpec>().map_err(|e| bad(&e.to_string()))?;
                o.sampler = value.to_string();
            }
            _ => return Err(bad("unknown option (known: --n, --w, --h, --d, --l, --s, --ss)")),
        }
    }
    Ok((o, seeded))
}

/// Generates one image per sample prompt ([`parse_sample_prompt`]), in prompt order:
/// prompts whose options agree are sampled together in one batch (so plain prompts make
/// one batch, as [`generate`] runs them), except that a prompt with its own seed (`--d`) is
/// sampled alone, so that it gets that seed's noise wherever it stands (as in kohya).
/// Sizes are rounded down to the model's size step (64 px for SD; kohya rounds to 8).
/// Latents gone NaN or infinite are [`PipelineError::NonFinite`] (as in [`generate`]).
pub fn sample_images<B: Backend>(c: &Components<B>, prompts: &[String], defaults: &GenerateOptions, device: &B::Device) -> Result<Vec<RgbImage>, PipelineError> {
    let step = c.vae.downsample_factor() * c.unet.size_multiple();
    let fit = |v: usize| (v - v % step).max(step);
    let mut parsed = Vec::with_capacity(prompts.len());
    for p in prompts {
        let (mut o, seeded) = parse_prompt_options(p, defaults)?;
        (o.width, o.height) = (fit(o.width), fit(o.height));
        parsed.push((o, seeded));
    }
    // Groups of prompts with the same options, in order of first appearance; a prompt
    // with its own seed is a group of its own (a batch would shift its sampler's draws).
    let mut groups: Vec<(GenerateOptions, Vec<usize>, bool)> = Vec::new();
    for (i, (o, seeded)) in parsed.into_iter().enumerate() {
        let same = |g: &GenerateOptions| GenerateOptions { prompts: vec![], ..g.clone() } == GenerateOptions { prompts: vec![], ..o.clone() };
        match groups.iter_mut().find(|(g, _, alone)| !seeded && !alone && same(g)) {
            Some((g, members, _)) => {
                g.prompts.extend(o.prompts);
                members.push(i);
            }
            None => groups.push((o, vec![i], seeded)),
        }
    }
    let mut images: Vec<Option<RgbImage>> = vec![None; prompts.len()];
    for (opts, members, _) in groups {
        for (i, img) in members.into_iter().zip(generate(c, &opts, device)?) {
            images[i] = Some(img);
        }
    }
    Ok(images.into_iter().flatten().collect())
}
