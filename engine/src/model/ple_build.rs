//! Building the PLE cache: the checkpoint's per-layer table rows copied as they are (raw
//! rows, the default), or every text token's whole per-layer inputs computed by the
//! forward pass's own code (`per_layer`), written through `ple_cache::Writer`. It lives
//! with the model because the model reads the cache: in `ple_cache` it would close a
//! cycle.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::per_layer::{combine, projection_part, table_part};
use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::ModelConfig;
use crate::derived::CacheDir;
use crate::error::{EngineError, Result};
use crate::ple_cache::{
    cache_key, cache_name, remove_older_versions, Invalid, PleCache, RowDType, Writer,
};
use crate::residency::{Advice, MappedRegion};
use crate::weights::Matrix;

/// Token ids computed per batch.
const BUILD_CHUNK: usize = 256;

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub rows: u64,
    pub dtype: RowDType,
    pub elapsed: Duration,
}

/// Builds (or rebuilds) the PLE cache of the checkpoint in `model_dir` into `cache_dir`,
/// unconditionally. `progress(done_rows, total_rows)` is called after each batch;
/// returning `ControlFlow::Break` stops the build, removes the partial file and returns
/// [`EngineError::Cancelled`]. This is the entry point for `gemmactl`/`gemmad ple-cache
/// build`.
pub fn build(
    model_dir: &Path,
    cache_dir: &Path,
    dtype: RowDType,
    progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<BuildReport> {
    let cfg = ModelConfig::from_dir(model_dir)?;
    let ckpt = Checkpoint::open(model_dir)?;
    let dir = CacheDir::open(cache_dir)?;
    build_file(
        &cfg,
        &ckpt,
        dtype,
        &dir,
        &cache_name(model_dir, dtype),
        progress,
    )
}

/// Builds the cache of an opened checkpoint into the file `name` of `dir` (temp file +
/// rename).
pub fn build_file(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    dtype: RowDType,
    dir: &CacheDir,
    name: &str,
    progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    let path = &dir.path_of(name);
    let c = &cfg.text;
    let perr = |reason: String| EngineError::PleCache {
        path: path.to_path_buf(),
        reason,
    };
    let key = cache_key(ckpt, dtype)?;
    let prefix = cfg.layout.text_prefix();
    let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
    let rows = c.vocab_size_per_layer_input;
    let pad = c.pad_token_id as usize;
    if pad >= rows {
        return Err(perr(format!(
            "pad_token_id {pad} is outside the per-layer vocabulary ({rows})"
        )));
    }
    let table = ckpt.get(
        &format!("{prefix}embed_tokens_per_layer.weight"),
        &[c.vocab_size_per_layer_input, lp],
    )?;
    // From here on, a failure or a cancel removes the temp file.
    let mut file = Writer::create(dir, name, c, dtype, table.dtype, key)?;
    let table_row_bytes = lp * table.dtype.size();
    let table_region = |from: usize, to: usize| MappedRegion {
        map: table.map.clone(),
        path: table.path.clone(),
        offset: table.start + from * table_row_bytes,
        len: (to - from) * table_row_bytes,
    };
    let mut tok = vec![0.0f32; lp];
    if dtype.precomputed() {
        push_precomputed(cfg, ckpt, &table, &mut file, &table_region, progress)?;
    } else {
        // Raw rows: the table's own bytes, in the order and layout they have there.
        let mut released_rows = 0usize;
        let mut start = 0usize;
        while start < rows {
            let n = BUILD_CHUNK.min(rows - start);
            let flushed = file.push_bytes(
                &table.bytes()[start * table_row_bytes..(start + n) * table_row_bytes],
            )?;
            start += n;
            if flushed {
                table_region(released_rows, start).advise(Advice::Release);
                released_rows = start;
            }
            if progress(start as u64, rows as u64).is_break() {
                return Err(EngineError::Cancelled("building the PLE cache"));
            }
        }
    }

    // Pad section: 16 · PLE[pad] in f32.
    table_part(&table, c, pad, &mut tok);
    let file_bytes = file.finish(&tok)?;
    let rep = BuildReport {
        path: path.to_path_buf(),
        file_bytes,
        rows: rows as u64,
        dtype,
        elapsed: t0.elapsed(),
    };
    tracing::info!(path = %path.display(), bytes = rep.file_bytes, rows, %dtype,
        secs = rep.elapsed.as_secs_f64(), "PLE cache built");
    Ok(rep)
}

/// Computes every text token's whole per-layer inputs and appends them to `file`.
fn push_precomputed(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    table: &TensorView,
    file: &mut Writer,
    table_region: &dyn Fn(usize, usize) -> MappedRegion,
    progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<()> {
    let c = &cfg.text;
    let prefix = cfg.layout.text_prefix();
    let (h, l, p) = (
        c.hidden_size,
        c.num_hidden_layers,
        c.hidden_size_per_layer_input,
    );
    let lp = l * p;
    let rows = c.vocab_size_per_layer_input;
    let embed_view = ckpt.get(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
    let embed = Matrix::from_view(&embed_view)?;
    let proj = Matrix::from_view(&ckpt.get(
        &format!("{prefix}per_layer_model_projection.weight"),
        &[lp, h],
    )?)?;
    let norm = ckpt
        .get(&format!("{prefix}per_layer_projection_norm.weight"), &[p])?
        .to_f32_vec();
    let eps = c.rms_norm_eps as f32;
    let emb_scale = (h as f64).sqrt() as f32;

    let mut embeds = vec![0.0f32; BUILD_CHUNK * h];
    let mut out = vec![0.0f32; BUILD_CHUNK * lp];
    let mut tok = vec![0.0f32; lp];
    let mut released_rows = 0usize;
    let mut start = 0usize;
    while start < rows {
        let n = BUILD_CHUNK.min(rows - start);
        for i in 0..n {
            let row = &mut embeds[i * h..(i + 1) * h];
            embed.row_to_f32(start + i, row);
            for v in row.iter_mut() {
                *v *= emb_scale;
            }
        }
        projection_part(
            &proj,
            &norm,
            eps,
            c,
            &embeds[..n * h],
            n,
            &mut out[..n * lp],
        );
        for i in 0..n {
            table_part(table, c, start + i, &mut tok);
            combine(&mut out[i * lp..(i + 1) * lp], &tok);
        }
        let flushed = file.push(&out[..n * lp])?;
        start += n;
        if flushed {
            // The output's pages are gone; drop the table pages read so far too.
            table_region(released_rows, start).advise(Advice::Release);
            released_rows = start;
        }
        if progress(start as u64, rows as u64).is_break() {
            return Err(EngineError::Cancelled("building the PLE cache"));
        }
    }
    Ok(())
}

// Here rather than beside `PleCache::open`: building needs the model's math, and
// `ple_cache` sits below the model.
impl PleCache {
    /// Opens the cache for `ckpt` in `cache_dir`, building it first if it is missing,
    /// stale or corrupt. Build progress goes to `progress` (and the log).
    pub fn open_or_build(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        dir: &CacheDir,
        dtype: RowDType,
        hot_bytes: usize,
        progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<PleCache> {
        let name = cache_name(&ckpt.dir, dtype);
        let path = dir.path_of(&name);
        let key = cache_key(ckpt, dtype)?;
        let c = &cfg.text;
        let table_dtype = ckpt
            .get(
                &format!("{}embed_tokens_per_layer.weight", cfg.layout.text_prefix()),
                &[
                    c.vocab_size_per_layer_input,
                    c.num_hidden_layers * c.hidden_size_per_layer_input,
                ],
            )?
            .dtype;
        match PleCache::open(dir, &name, c, dtype, table_dtype, key, hot_bytes)? {
            Ok(c) => {
                tracing::info!(path = %path.display(), %dtype, "PLE cache valid");
                return Ok(c);
            }
            Err(why) if why.is_missing() => {
                tracing::info!(path = %path.display(), %dtype, "no PLE cache yet; building");
            }
            Err(Invalid(why)) => {
                tracing::warn!(path = %path.display(), reason = %why,
                    "PLE cache is stale, corrupt or untrusted; rebuilding");
            }
        }
        remove_older_versions(dir, &ckpt.dir);
        build_file(cfg, ckpt, dtype, dir, &name, progress)?;
        match PleCache::open(dir, &name, c, dtype, table_dtype, key, hot_bytes)? {
            Ok(c) => Ok(c),
            Err(Invalid(why)) => Err(EngineError::PleCache {
                path,
                reason: format!("freshly built file does not validate: {why}"),
            }),
        }
    }
}
