//! Inspects a dataset folder: images found, repeats, bucket table and every problem file.
//!
//! ```text
//! cargo run --release -p sd-data --example inspect -- DIR [--resolution 512] [--skip-bad-images]
//!     [--no-upscale] [--min-bucket-reso 256] [--max-bucket-reso 1024] [--bucket-reso-steps 64]
//!     [--config dataset.json] [--write-demo N]
//! ```
//!
//! `--write-demo N` first writes N procedural demo images into DIR. Exits with status 1 on an
//! error (including any bad file without `--skip-bad-images`) and 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use sd_data::{demo, scan, Dataset, DatasetConfig, Resolution};

struct Args {
    dir: Option<PathBuf>,
    config: Option<PathBuf>,
    resolution: Option<Resolution>,
    skip_bad_images: bool,
    no_upscale: bool,
    min_bucket: Option<u32>,
    max_bucket: Option<u32>,
    steps: Option<u32>,
    write_demo: Option<usize>,
}

const USAGE: &str = "usage: inspect DIR [--resolution 512|768,512] [--skip-bad-images] [--no-upscale] \
[--min-bucket-reso N] [--max-bucket-reso N] [--bucket-reso-steps N] [--config FILE.json] [--write-demo N]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        config: None,
        resolution: None,
        skip_bad_images: false,
        no_upscale: false,
        min_bucket: None,
        max_bucket: None,
        steps: None,
        write_demo: None,
    };
    let mut it = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<u32, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|_| format!("{flag}: `{v}` is not a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--resolution" => {
                let v = it.next().ok_or("--resolution needs a value")?;
                a.resolution = Some(v.parse().map_err(|e| format!("--resolution: {e}"))?);
            }
            "--skip-bad-images" => a.skip_bad_images = true,
            "--no-upscale" => a.no_upscale = true,
            "--min-bucket-reso" => a.min_bucket = Some(num(&arg, it.next())?),
            "--max-bucket-reso" => a.max_bucket = Some(num(&arg, it.next())?),
            "--bucket-reso-steps" => a.steps = Some(num(&arg, it.next())?),
            "--config" => a.config = Some(it.next().ok_or("--config needs a file")?.into()),
            "--write-demo" => a.write_demo = Some(num(&arg, it.next())? as usize),
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`")),
            _ if a.dir.is_none() => a.dir = Some(arg.into()),
            _ => return Err(format!("unexpected argument `{arg}`")),
        }
    }
    if a.dir.is_none() && a.config.is_none() {
        return Err("give a dataset folder or --config".into());
    }
    Ok(a)
}

fn build_config(a: &Args) -> Result<DatasetConfig, sd_data::DataError> {
    let mut c = match &a.config {
        // kohya sd-scripts' TOML, or sd-data's JSON.
        Some(path) if path.extension().is_some_and(|e| e == "toml") => DatasetConfig::from_kohya_toml_file(path, &DatasetConfig::default())?,
        Some(path) => DatasetConfig::from_json_file(path)?,
        None => DatasetConfig::default(),
    };
    if let Some(dir) = &a.dir {
        c.subsets = vec![sd_data::SubsetConfig::new(dir)];
    }
    if let Some(r) = a.resolution {
        c.resolution = r;
    }
    c.skip_bad_images |= a.skip_bad_images;
    c.bucket_no_upscale |= a.no_upscale;
    if let Some(v) = a.steps {
        c.bucket_reso_steps = v;
    }
    if let Some(v) = a.min_bucket {
        c.min_bucket_reso = v;
    }
    if let Some(v) = a.max_bucket {
        c.max_bucket_reso = v;
    }
    Ok(c)
}

fn run(a: &Args) -> Result<(), sd_data::DataError> {
    if let (Some(n), Some(dir)) = (a.write_demo, &a.dir) {
        demo::write(
            dir,
            &demo::DemoConfig {
                count: n,
                ..Default::default()
            },
        )?;
        println!("wrote {n} demo images to {}", dir.display());
    }
    let config = build_config(a)?;
    let scan = scan(&config)?;
    if !scan.problems.is_empty() {
        println!("problem files ({}):", scan.problems.len());
        for p in &scan.problems {
            println!("  {p}");
        }
    }
    let ds = Dataset::from_scan(scan)?;
    println!("images ({}):", ds.images().len());
    for (i, img) in ds.images().iter().enumerate() {
        let a = ds.assignment(i);
        let caption: String = img.caption.chars().take(60).collect();
        println!(
            "  {}  {}x{} -> bucket {}x{} (resize {}x{})  x{}  \"{}\"",
            ds.image_path(i).display(),
            img.width,
            img.height,
            a.bucket.0,
            a.bucket.1,
            a.resized.0,
            a.resized.1,
            ds.repeats(i),
            caption
        );
    }
    println!("subsets:");
    for s in ds.subsets() {
        println!(
            "  {}  repeats {}  class tokens {:?}  reg {}  loss weight {}",
            s.config.image_dir.display(),
            s.num_repeats,
            s.config.class_tokens.as_deref().unwrap_or(""),
            s.config.is_reg,
            s.loss_weight
        );
    }
    println!("buckets (resolution -> samples per epoch):");
    for ((w, h), n) in ds.bucket_table() {
        println!("  {w}x{h} -> {n}");
    }
    println!(
        "{} images, {} samples per epoch, {} batches of up to {}",
        ds.images().len(),
        ds.samples_per_epoch(),
        ds.plan_epoch(0).len(),
        ds.config().batch_size
    );
    if let Some(s) = ds.skipped_summary() {
        eprintln!("warning: {s}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
