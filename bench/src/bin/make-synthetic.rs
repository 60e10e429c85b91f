//! `make-synthetic --variant e2b|e4b --out DIR [--seed N] [--text-only]`: writes a
//! checkpoint folder laid out like the Hub's `google/gemma-3n-E2B-it` / `-E4B-it`
//! (config.json, generation_config.json, sharded bf16 safetensors + index, tokenizer)
//! filled with seeded random weights of realistic scale. The folder is built next to
//! `DIR` under a temporary name and renamed into place only when complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemmad_bench::spec::{self, Variant};
use gemmad_bench::synth::{self, SynthOptions};

#[derive(Parser, Debug)]
#[command(
    name = "make-synthetic",
    about = "Write a synthetic Gemma 3n checkpoint of real dimensions"
)]
struct Args {
    /// e2b or e4b.
    #[arg(long)]
    variant: Variant,
    /// Output folder (created; must not exist unless --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the text decoder's tensors (no vision/audio towers or their configs).
    #[arg(long)]
    text_only: bool,
    /// Largest shard, in GB (10^9 bytes); a bigger tensor gets a shard of its own.
    #[arg(long, default_value_t = 4.0)]
    max_shard_gb: f64,
    /// tokenizer.json to copy (tokenizer_config.json is taken from the same folder).
    /// Default: the real Gemma 3 tokenizer under target/test-data if fetched, else the
    /// engine's tiny test fixture.
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
}

fn default_tokenizer() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        "target/test-data/gemma3/tokenizer.json",
        "engine/tests/fixtures/text/tokenizer.json",
    ]
    .iter()
    .map(|p| root.join(p))
    .find(|p| p.exists())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let out = a.out.clone();
    let name = out
        .file_name()
        .context("--out needs a final path component")?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("create {}", parent.display()))?;
    if out.exists() && !a.force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let tokenizer = a.tokenizer.clone().or_else(default_tokenizer);
    let opts = SynthOptions {
        variant: a.variant,
        seed: a.seed,
        text_only: a.text_only,
        max_shard_bytes: (a.max_shard_gb * 1e9) as usize,
        tokenizer: tokenizer.clone(),
    };
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    eprintln!(
        "writing a synthetic {} ({}) checkpoint into {} (seed {})",
        a.variant.hub_name(),
        if a.text_only {
            "text only"
        } else {
            "multimodal"
        },
        tmp.display(),
        a.seed
    );
    let report = match synth::write_checkpoint(&tmp, &opts) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        // Move the old folder aside first so that `out` is never half-written; readers
        // holding files of the old one open keep them until they close.
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&out, &old).with_context(|| format!("move {} aside", out.display()))?;
        std::fs::rename(&tmp, &out).with_context(|| format!("rename into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("remove {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, &out).with_context(|| format!("rename into {}", out.display()))?;
    }
    let total: u64 = report.shards.iter().map(|(_, b)| b).sum();
    println!("{}", out.display());
    for (f, b) in &report.shards {
        println!("  {f}  {:.3} GB", *b as f64 / 1e9);
    }
    let text = spec::param_count(&spec::text_tensors(a.variant));
    println!(
        "  {} parameters ({} text), {:.3} GB of safetensors, written in {:.1}s ({:.2} GB/s)",
        report.params,
        text,
        total as f64 / 1e9,
        report.seconds,
        total as f64 / 1e9 / report.seconds.max(1e-9)
    );
    match &tokenizer {
        Some(t) => println!("  tokenizer copied from {}", t.display()),
        None => println!("  no tokenizer found: the checkpoint has none (ids-only use)"),
    }
    Ok(())
}
