//! Developer tasks. Run `cargo xtask help`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const HELP: &str = "\
cargo xtask <task>

tasks:
  fixtures [NAME...]   regenerate parity fixtures with the Python scripts in xtask/fixtures/
                       (not the `_*` helper modules they import)
                       (creates .venv from xtask/fixtures/requirements.txt on first use);
                       check_* scripts (end-to-end checks, no fixtures) run only when named
  help                 this message
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&args[1..]),
        Some("help") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{HELP}"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Creates the fixture venv if needed and runs each fixture script (all by default).
fn fixtures(names: &[String]) -> Result<()> {
    let root = root();
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-r"])
            .arg(root.join("xtask/fixtures/requirements.txt")))?;
    }
    let dir = root.join("xtask/fixtures");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .filter(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            // `_*` modules are helpers the scripts import, not scripts.
            if stem.starts_with('_') {
                return false;
            }
            // check_* scripts write no fixtures (e.g. check_trainer_lora.py trains LoRAs and
            // compares them with diffusers): only run when asked for by name.
            if names.is_empty() {
                !stem.starts_with("check_")
            } else {
                names.contains(&stem)
            }
        })
        .collect();
    scripts.sort();
    if scripts.is_empty() {
        bail!("no fixture script matches {names:?} in {}", dir.display());
    }
    for script in scripts {
        println!("== {}", script.display());
        run(Command::new(&python).arg(&script).current_dir(&root))?;
    }
    Ok(())
}
