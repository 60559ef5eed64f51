//! Prints the 77 CLIP token ids of each line of a prompts file, one JSON array per line.
//!
//! ```text
//! cargo run --release -p sd-model --example tokenize -- PROMPTS.txt [--model DIR]
//! ```
//!
//! With `--model`, the model folder's `tokenizer/` is used when it has one (SD 2.x folders pad
//! with id 0); otherwise the bundled CLIP tokenizer (SD 1.x padding). `--pad-id` overrides the
//! pad token, e.g. `--pad-id 0` for an SD 2.x single-file checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sd_model::tokenizer::ClipTokenizer;

#[derive(Parser)]
#[command(about = "Print the CLIP token ids of each prompt line as a JSON array")]
struct Args {
    /// Text file with one prompt per line.
    prompts: PathBuf,
    /// Diffusers model folder; its `tokenizer/` sub-folder overrides the bundled tokenizer.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pad token id to use instead of the tokenizer's own.
    #[arg(long)]
    pad_id: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut tokenizer = match &args.model {
        Some(dir) => ClipTokenizer::from_model_dir(dir)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?,
        None => ClipTokenizer::bundled()?,
    };
    if let Some(id) = args.pad_id {
        tokenizer = tokenizer.with_pad_token_id(id)?;
    }
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    for line in text.lines() {
        println!("{}", serde_json::to_string(&tokenizer.encode(line)?)?);
    }
    Ok(())
}
