//! `gemmad export-slice`: writes one MatFormer slice of a checkpoint as a checkpoint of
//! its own (Hugging Face layout), for transformers or for a device that should hold only
//! the slice. The work is the engine's [`gemmad_engine::slice_export`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gemmad_engine::slice_export::{self, ExportOptions};

#[derive(Args, Debug)]
pub struct ExportSliceArgs {
    /// Checkpoint folder as downloaded from the Hugging Face Hub.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Slicing file in Google's configs.csv format (default: the slices built in for the
    /// checkpoint: `full`, and the official mix-n-match table for an E4B-shaped one).
    #[arg(long, value_name = "FILE")]
    pub matformer_config: Option<PathBuf>,
    /// Name of the slice to write, e.g. "Config for official E2B Model".
    #[arg(long)]
    pub slice: String,
    /// Folder to write the checkpoint into; it must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `gemmad export-slice` and prints a one-line summary to stdout.
pub fn export_slice(a: ExportSliceArgs) -> Result<()> {
    let spec = slice_export::find_slice(&a.model, a.matformer_config.as_deref(), &a.slice)
        .with_context(|| format!("cannot find slice {:?} of {}", a.slice, a.model.display()))?;
    let r = slice_export::export_slice(&a.model, &spec, &a.out, &ExportOptions::default())
        .with_context(|| {
            format!(
                "cannot export slice {:?} of {} to {}",
                a.slice,
                a.model.display(),
                a.out.display()
            )
        })?;
    println!(
        "{}: slice {:?}: {} layers, {} tensors, {} bytes in {} safetensors file(s), \
         {} params ({} effective)",
        r.out.display(),
        r.slice,
        r.layers,
        r.tensors,
        r.bytes,
        r.weight_files.len(),
        r.params,
        r.effective_params
    );
    Ok(())
}
