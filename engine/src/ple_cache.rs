//! The PLE cache file: for every text token id `v < vocab_size_per_layer_input`, the
//! complete per-layer input vector `PLI[v] ∈ [L, P]` (architecture doc §2.3, §3), built
//! once from the checkpoint and served from a read-only mapping, so that neither the
//! checkpoint's `embed_tokens_per_layer` table (2 G parameters in E2B) nor the per-token
//! projection matvec is needed while serving text.
//!
//! # File format (version [`VERSION`], little-endian)
//!
//! ```text
//! [0, 4096)            header (one page; fields below, xxh64 of bytes [0, 4088) at 4088)
//! [4096, rows_end)     rows: `rows` × `row_bytes`, token-major (row v = PLI[v, 0..L, 0..P])
//! [pad_off, +L·P·4)    pad section: 16·PLE[pad_id] as f32 (the table part of positions
//!                      whose id has no row: multimodal soft/hard tokens), page-aligned
//! [sums_off, +rows·4)  row checksums: low 32 bits of xxh64(row bytes), page-aligned
//! ```
//!
//! Header fields: magic `GEMMAPLE`, version, header size, row dtype, L, P, hidden size,
//! rows, row bytes, section offsets and sizes, total file size, the checkpoint key
//! (128 bits), xxh64 of the pad and checksum sections, and the header's own xxh64.
//!
//! # Validity
//!
//! At open, everything but the rows is verified (header checksum, magic, version, dims,
//! dtype, checkpoint key, exact file size, pad and checksum-table checksums); any mismatch
//! makes the file stale and it is rebuilt. Rows are verified lazily, each time one is read
//! from the mapping into the hot-row cache or a forward pass (a 15 KiB xxh64, ~µs): a
//! corrupt row is never used — the engine computes that token's vector from the checkpoint
//! instead, logs the corruption and renames the file to `*.corrupt`, so that the next load
//! rebuilds it. [`PleCache::verify_all`] checks every row up front.
//!
//! # Checkpoint key
//!
//! The checkpoint key of `derived` (config, index, shard names, sizes, mtimes and
//! safetensors headers), salted with this format's version and the row dtype.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memmap2::Mmap;

use crate::checkpoint::{Checkpoint, DType, TensorView};
use crate::config::{ModelConfig, TextConfig};
use crate::derived::{checkpoint_key, folder_hash, rd64, xxh64, TempFile};
use crate::error::{EngineError, Result};
use crate::model::ops;
use crate::residency::{self, Advice, MappedRegion};
use crate::weights::Matrix;

pub const MAGIC: [u8; 8] = *b"GEMMAPLE";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 4096;
/// Token ids computed per batch while building.
const BUILD_CHUNK: usize = 256;
/// Bytes written between `fdatasync` + page-cache drops while building.
const BUILD_FLUSH_BYTES: u64 = 256 << 20;

/// Storage type of the cached rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RowDType {
    /// Exact: the engine's own f32 per-layer inputs, bit for bit.
    F32,
    /// bf16, round-to-nearest-even (half the size; the default).
    #[default]
    Bf16,
    /// IEEE f16, round-to-nearest: same size as bf16, 8× finer mantissa (the values are
    /// well inside f16's range).
    F16,
    /// ggml Q8_0 blocks of 32 (f16 scale + 32 × i8): ~0.53 of bf16.
    Q8_0,
}

impl RowDType {
    fn code(self) -> u32 {
        match self {
            RowDType::F32 => 0,
            RowDType::Bf16 => 1,
            RowDType::Q8_0 => 2,
            RowDType::F16 => 3,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            0 => RowDType::F32,
            1 => RowDType::Bf16,
            2 => RowDType::Q8_0,
            3 => RowDType::F16,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RowDType::F32 => "f32",
            RowDType::Bf16 => "bf16",
            RowDType::Q8_0 => "q8_0",
            RowDType::F16 => "f16",
        }
    }

    /// Bytes of one row of `n` values; `None` when `n` does not fit the format.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        match self {
            RowDType::F32 => Some(n * 4),
            RowDType::Bf16 | RowDType::F16 => Some(n * 2),
            RowDType::Q8_0 => n.is_multiple_of(32).then_some(n / 32 * 34),
        }
    }

    /// Encodes `src` into `dst` (`dst.len() == row_bytes(src.len())`).
    pub fn encode(self, src: &[f32], dst: &mut [u8]) {
        match self {
            RowDType::F32 => {
                for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            RowDType::Bf16 => {
                for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            RowDType::F16 => {
                for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            RowDType::Q8_0 => {
                for (d, x) in dst.chunks_exact_mut(34).zip(src.chunks_exact(32)) {
                    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    d[..2].copy_from_slice(&half::f16::from_f32(scale).to_bits().to_le_bytes());
                    for (q, v) in d[2..].iter_mut().zip(x) {
                        *q = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                    }
                }
            }
        }
    }

    /// Decodes a row into `dst`.
    pub fn decode(self, src: &[u8], dst: &mut [f32]) {
        match self {
            RowDType::F32 => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            RowDType::Bf16 => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            RowDType::F16 => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            RowDType::Q8_0 => {
                for (o, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                    let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                    for (v, &q) in o.iter_mut().zip(&b[2..]) {
                        *v = (q as i8) as f32 * d;
                    }
                }
            }
        }
    }
}

impl std::fmt::Display for RowDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RowDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => RowDType::F32,
            "bf16" => RowDType::Bf16,
            "f16" => RowDType::F16,
            "q8_0" | "q8" => RowDType::Q8_0,
            other => {
                return Err(format!(
                    "unknown PLE row dtype `{other}` (f32, bf16, f16, q8_0)"
                ))
            }
        })
    }
}

/// A row's checksum: the low 32 bits of its xxh64.
#[inline]
fn row_sum(row: &[u8]) -> u32 {
    xxh64(row, 0) as u32
}

// ---------------------------------------------------------------------------------------
// Header

/// The parsed header of a cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub dtype: RowDType,
    pub layers: u32,
    pub per_layer_dim: u32,
    pub hidden: u32,
    pub rows: u64,
    pub row_bytes: u64,
    pub rows_offset: u64,
    pub pad_offset: u64,
    pub pad_bytes: u64,
    pub sums_offset: u64,
    pub sums_bytes: u64,
    pub file_bytes: u64,
    pub key: [u8; 16],
    pub pad_sum: u64,
    pub sums_sum: u64,
}

impl Header {
    fn layout(dtype: RowDType, c: &TextConfig, key: [u8; 16]) -> Result<Header, String> {
        let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
        let row_bytes = dtype
            .row_bytes(lp)
            .ok_or_else(|| format!("rows of {lp} values cannot be stored as {dtype}"))?;
        let ps = HEADER_BYTES as u64;
        let rows = c.vocab_size_per_layer_input as u64;
        let rows_offset = HEADER_BYTES as u64;
        let pad_offset = (rows_offset + rows * row_bytes as u64).div_ceil(ps) * ps;
        let pad_bytes = lp as u64 * 4;
        let sums_offset = (pad_offset + pad_bytes).div_ceil(ps) * ps;
        let sums_bytes = rows * 4;
        Ok(Header {
            version: VERSION,
            dtype,
            layers: c.num_hidden_layers as u32,
            per_layer_dim: c.hidden_size_per_layer_input as u32,
            hidden: c.hidden_size as u32,
            rows,
            row_bytes: row_bytes as u64,
            rows_offset,
            pad_offset,
            pad_bytes,
            sums_offset,
            sums_bytes,
            file_bytes: sums_offset + sums_bytes,
            key,
            pad_sum: 0,
            sums_sum: 0,
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        b.extend_from_slice(&self.dtype.code().to_le_bytes());
        b.extend_from_slice(&self.layers.to_le_bytes());
        b.extend_from_slice(&self.per_layer_dim.to_le_bytes());
        b.extend_from_slice(&self.hidden.to_le_bytes());
        for v in [
            self.rows,
            self.row_bytes,
            self.rows_offset,
            self.pad_offset,
            self.pad_bytes,
            self.sums_offset,
            self.sums_bytes,
            self.file_bytes,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.pad_sum.to_le_bytes());
        b.extend_from_slice(&self.sums_sum.to_le_bytes());
        b.resize(HEADER_BYTES - 8, 0);
        let sum = xxh64(&b, 0);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!(
                "file is {} bytes, shorter than its header (truncated)",
                b.len()
            ));
        }
        if b[..8] != MAGIC {
            return Err("bad magic (not a gemmad PLE cache)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| rd64(&b[o..]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads {VERSION}"
            ));
        }
        let stored = u64_at(HEADER_BYTES - 8);
        if xxh64(&b[..HEADER_BYTES - 8], 0) != stored {
            return Err("header checksum mismatch (corrupt header)".into());
        }
        if u32_at(12) as usize != HEADER_BYTES {
            return Err(format!("header size {} is not {HEADER_BYTES}", u32_at(12)));
        }
        let dtype = RowDType::from_code(u32_at(16))
            .ok_or_else(|| format!("unknown row dtype code {}", u32_at(16)))?;
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[96..112]);
        Ok(Header {
            version,
            dtype,
            layers: u32_at(20),
            per_layer_dim: u32_at(24),
            hidden: u32_at(28),
            rows: u64_at(32),
            row_bytes: u64_at(40),
            rows_offset: u64_at(48),
            pad_offset: u64_at(56),
            pad_bytes: u64_at(64),
            sums_offset: u64_at(72),
            sums_bytes: u64_at(80),
            file_bytes: u64_at(88),
            key,
            pad_sum: u64_at(112),
            sums_sum: u64_at(120),
        })
    }

    /// Whether the layout fields equal those expected for this model and dtype.
    fn same_layout(&self, want: &Header) -> bool {
        let strip = |h: &Header| Header {
            key: [0; 16],
            pad_sum: 0,
            sums_sum: 0,
            ..h.clone()
        };
        strip(self) == strip(want)
    }
}

// ---------------------------------------------------------------------------------------
// Checkpoint key and file naming

/// The checkpoint key of a cache with rows of `dtype` (see the module docs).
pub fn cache_key(ckpt: &Checkpoint, dtype: RowDType) -> Result<[u8; 16]> {
    let mut salt: Vec<u8> = b"gemmad-ple\0".to_vec();
    salt.extend_from_slice(&VERSION.to_le_bytes());
    salt.extend_from_slice(dtype.as_str().as_bytes());
    checkpoint_key(ckpt, &salt)
}

/// The cache file for the checkpoint in `model_dir` with rows of `dtype`:
/// `<cache_dir>/ple-<hash of the canonical model path>-<dtype>.gemmaple`. The name is
/// stable per model folder so that a stale file is replaced rather than left behind.
pub fn cache_path(cache_dir: &Path, model_dir: &Path, dtype: RowDType) -> PathBuf {
    let h = folder_hash(model_dir);
    cache_dir.join(format!("ple-{h:016x}-{dtype}.gemmaple"))
}

// ---------------------------------------------------------------------------------------
// The math shared by the builder and the engine's runtime path

/// The projection part of the per-layer inputs for `t` input embeddings
/// (`RMSNorm_P(W · E · H^-0.5)`, `[t, L·P]`).
pub(crate) fn projection_part(
    proj: &Matrix,
    norm: &[f32],
    eps: f32,
    c: &TextConfig,
    embeds: &[f32],
    t: usize,
    out: &mut [f32],
) {
    proj.matmul(embeds, t, out);
    let proj_scale = (c.hidden_size as f64).powf(-0.5) as f32;
    for v in out.iter_mut() {
        *v *= proj_scale;
    }
    ops::rms_norm(out, c.hidden_size_per_layer_input, Some(norm), eps);
}

/// `out = (out + tok_scaled) · 2^-0.5` for one position (`tok_scaled` = 16·PLE row).
#[inline]
pub(crate) fn combine(out: &mut [f32], tok_scaled: &[f32]) {
    let input_scale = std::f64::consts::FRAC_1_SQRT_2 as f32;
    for (o, &t) in out.iter_mut().zip(tok_scaled) {
        *o = (*o + t) * input_scale;
    }
}

/// `16 · table[id]` (the scale is `sqrt(P)`) widened to f32.
pub(crate) fn table_part(table: &TensorView, c: &TextConfig, id: usize, out: &mut [f32]) {
    let lp = out.len();
    let es = table.dtype.size();
    let b = &table.bytes()[id * lp * es..(id + 1) * lp * es];
    let tok_scale = (c.hidden_size_per_layer_input as f64).sqrt() as f32;
    match table.dtype {
        DType::F32 => {
            for (o, ch) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) * tok_scale;
            }
        }
        DType::BF16 => {
            for (o, ch) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([ch[0], ch[1]])).to_f32() * tok_scale;
            }
        }
        DType::F16 => {
            for (o, ch) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([ch[0], ch[1]])).to_f32() * tok_scale;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Building

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
    let path = cache_path(cache_dir, model_dir, dtype);
    build_file(&cfg, &ckpt, dtype, &path, progress)
}

/// Builds the cache of an opened checkpoint into `path` (temp file + rename).
pub fn build_file(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    dtype: RowDType,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    let c = &cfg.text;
    let perr = |reason: String| EngineError::PleCache {
        path: path.to_path_buf(),
        reason,
    };
    let key = cache_key(ckpt, dtype)?;
    let mut hdr = Header::layout(dtype, c, key).map_err(perr)?;

    let prefix = cfg.layout.text_prefix();
    let (h, l, p) = (
        c.hidden_size,
        c.num_hidden_layers,
        c.hidden_size_per_layer_input,
    );
    let lp = l * p;
    let rows = c.vocab_size_per_layer_input;
    let pad = c.pad_token_id as usize;
    if pad >= rows {
        return Err(perr(format!(
            "pad_token_id {pad} is outside the per-layer vocabulary ({rows})"
        )));
    }
    let embed_view = ckpt.get(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
    let embed = Matrix::from_view(&embed_view)?;
    let table = ckpt.get(
        &format!("{prefix}embed_tokens_per_layer.weight"),
        &[c.vocab_size_per_layer_input, lp],
    )?;
    let proj = Matrix::from_view(&ckpt.get(
        &format!("{prefix}per_layer_model_projection.weight"),
        &[lp, h],
    )?)?;
    let norm = ckpt
        .get(&format!("{prefix}per_layer_projection_norm.weight"), &[p])?
        .to_f32_vec();
    let eps = c.rms_norm_eps as f32;
    let emb_scale = (h as f64).sqrt() as f32;

    // From here on, a failure or a cancel removes the temp file.
    let (tmp, file) = TempFile::create(path)?;
    let werr = |e: std::io::Error| EngineError::io(tmp.path(), e);
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&vec![0u8; HEADER_BYTES]).map_err(werr)?;

    let rb = hdr.row_bytes as usize;
    let mut sums: Vec<u32> = Vec::with_capacity(rows);
    let mut embeds = vec![0.0f32; BUILD_CHUNK * h];
    let mut out = vec![0.0f32; BUILD_CHUNK * lp];
    let mut tok = vec![0.0f32; lp];
    let mut enc = vec![0u8; BUILD_CHUNK * rb];
    let mut written: u64 = HEADER_BYTES as u64;
    let mut synced: u64 = 0;
    let table_row_bytes = lp * table.dtype.size();
    let table_region = |from: usize, to: usize| MappedRegion {
        map: table.map.clone(),
        path: table.path.clone(),
        offset: table.start + from * table_row_bytes,
        len: (to - from) * table_row_bytes,
    };
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
            table_part(&table, c, start + i, &mut tok);
            let o = &mut out[i * lp..(i + 1) * lp];
            combine(o, &tok);
            let e = &mut enc[i * rb..(i + 1) * rb];
            dtype.encode(o, e);
            sums.push(row_sum(e));
        }
        w.write_all(&enc[..n * rb]).map_err(werr)?;
        written += (n * rb) as u64;
        start += n;
        if written - synced >= BUILD_FLUSH_BYTES || start == rows {
            // Keep neither the output nor the consumed table in memory: write back and
            // drop the written pages, drop the table pages read so far.
            w.flush().map_err(werr)?;
            w.get_ref().sync_data().map_err(werr)?;
            residency::fadvise_file(w.get_ref(), 0, written as usize);
            table_region(released_rows, start).advise(Advice::Release);
            released_rows = start;
            synced = written;
        }
        if progress(start as u64, rows as u64).is_break() {
            // `w` is dropped before `tmp`, which removes the temp file.
            return Err(EngineError::Cancelled("building the PLE cache"));
        }
    }

    // Pad section: 16 · PLE[pad] in f32.
    table_part(&table, c, pad, &mut tok);
    let pad_bytes: Vec<u8> = tok.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sum_bytes: Vec<u8> = sums.iter().flat_map(|v| v.to_le_bytes()).collect();
    hdr.pad_sum = xxh64(&pad_bytes, 0);
    hdr.sums_sum = xxh64(&sum_bytes, 0);
    let zeros = |from: u64, to: u64| vec![0u8; (to - from) as usize];
    w.write_all(&zeros(written, hdr.pad_offset)).map_err(werr)?;
    w.write_all(&pad_bytes).map_err(werr)?;
    w.write_all(&zeros(hdr.pad_offset + hdr.pad_bytes, hdr.sums_offset))
        .map_err(werr)?;
    w.write_all(&sum_bytes).map_err(werr)?;
    let mut file = w.into_inner().map_err(|e| werr(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(werr)?;
    file.write_all(&hdr.to_bytes()).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    residency::fadvise_file(&file, 0, hdr.file_bytes as usize);
    drop(file);
    tmp.commit()?;
    let rep = BuildReport {
        path: path.to_path_buf(),
        file_bytes: hdr.file_bytes,
        rows: rows as u64,
        dtype,
        elapsed: t0.elapsed(),
    };
    tracing::info!(path = %path.display(), bytes = rep.file_bytes, rows, %dtype,
        secs = rep.elapsed.as_secs_f64(), "PLE cache built");
    Ok(rep)
}

// ---------------------------------------------------------------------------------------
// Serving

/// The in-RAM cache of recently used rows (raw bytes, already verified).
#[derive(Debug, Default)]
struct HotRows {
    cap_bytes: usize,
    used: usize,
    tick: u64,
    rows: HashMap<u32, (u64, Box<[u8]>)>,
    order: BTreeMap<u64, u32>,
    hits: u64,
    misses: u64,
}

impl HotRows {
    fn get(&mut self, id: u32) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        match self.rows.get_mut(&id) {
            Some((t, data)) => {
                self.order.remove(t);
                *t = tick;
                self.order.insert(tick, id);
                self.hits += 1;
                Some(data)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    fn insert(&mut self, id: u32, data: &[u8]) {
        if data.len() > self.cap_bytes || self.rows.contains_key(&id) {
            return;
        }
        while self.used + data.len() > self.cap_bytes {
            let Some((&t, &old)) = self.order.iter().next() else {
                break;
            };
            self.order.remove(&t);
            if let Some((_, d)) = self.rows.remove(&old) {
                self.used -= d.len();
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, id);
        self.rows.insert(id, (self.tick, data.into()));
        self.used += data.len();
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.order.clear();
        self.used = 0;
    }
}

/// Counters of a [`PleCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PleStats {
    pub hot_bytes: u64,
    pub hot_capacity: u64,
    pub hot_rows: u64,
    pub hot_hits: u64,
    pub hot_misses: u64,
    /// Rows that failed their checksum (served from the checkpoint instead).
    pub corrupt_rows: u64,
}

/// An opened, validated PLE cache file.
#[derive(Debug)]
pub struct PleCache {
    path: PathBuf,
    map: Arc<Mmap>,
    hdr: Header,
    sums: Vec<u32>,
    pad_part: Vec<f32>,
    hot: Mutex<HotRows>,
    corrupt_rows: AtomicU64,
    quarantined: AtomicBool,
}

/// Why an existing cache file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl PleCache {
    /// Opens `path` and checks it against the model and key; `Ok(Err(_))` says why the
    /// file is stale or corrupt (it should then be rebuilt).
    pub fn open(
        path: &Path,
        c: &TextConfig,
        dtype: RowDType,
        key: [u8; 16],
        hot_bytes: usize,
    ) -> Result<std::result::Result<PleCache, Invalid>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(Invalid(format!("cannot open: {e}")))),
        };
        // SAFETY: read-only mapping of a file this process wrote via rename; a file
        // truncated underneath a running engine is outside what mmap can defend against
        // (the size is checked here).
        let map = match unsafe { Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => return Ok(Err(Invalid(format!("cannot map: {e}")))),
        };
        let hdr = match Header::parse(&map) {
            Ok(h) => h,
            Err(r) => return Ok(Err(Invalid(r))),
        };
        let want = Header::layout(dtype, c, key).map_err(|reason| EngineError::PleCache {
            path: path.to_path_buf(),
            reason,
        })?;
        if hdr.key != key {
            return Ok(Err(Invalid(
                "built from a different checkpoint (key mismatch)".into(),
            )));
        }
        if !hdr.same_layout(&want) {
            return Ok(Err(Invalid(format!(
                "layout differs from this model/dtype: file has {} rows × {} ({}), \
                 L={} P={}; expected {} rows × {} ({}), L={} P={}",
                hdr.rows,
                hdr.row_bytes,
                hdr.dtype,
                hdr.layers,
                hdr.per_layer_dim,
                want.rows,
                want.row_bytes,
                want.dtype,
                want.layers,
                want.per_layer_dim
            ))));
        }
        if map.len() as u64 != hdr.file_bytes {
            return Ok(Err(Invalid(format!(
                "file is {} bytes, header says {} (truncated or extended)",
                map.len(),
                hdr.file_bytes
            ))));
        }
        let section = |o: u64, n: u64| &map[o as usize..(o + n) as usize];
        let pad_b = section(hdr.pad_offset, hdr.pad_bytes);
        if xxh64(pad_b, 0) != hdr.pad_sum {
            return Ok(Err(Invalid("pad section checksum mismatch".into())));
        }
        let sums_b = section(hdr.sums_offset, hdr.sums_bytes);
        if xxh64(sums_b, 0) != hdr.sums_sum {
            return Ok(Err(Invalid("row checksum table is corrupt".into())));
        }
        let pad_part = pad_b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let sums = sums_b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let map = Arc::new(map);
        let cache = PleCache {
            path: path.to_path_buf(),
            map,
            hdr,
            sums,
            pad_part,
            hot: Mutex::new(HotRows {
                cap_bytes: hot_bytes,
                ..Default::default()
            }),
            corrupt_rows: AtomicU64::new(0),
            quarantined: AtomicBool::new(false),
        };
        // Rows are read at random: no readahead around each one.
        cache.rows_region().advise(Advice::Random);
        Ok(Ok(cache))
    }

    /// Opens the cache for `ckpt` in `cache_dir`, building it first if it is missing,
    /// stale or corrupt. Build progress goes to `progress` (and the log).
    pub fn open_or_build(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        cache_dir: &Path,
        dtype: RowDType,
        hot_bytes: usize,
        progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<PleCache> {
        let path = cache_path(cache_dir, &ckpt.dir, dtype);
        let key = cache_key(ckpt, dtype)?;
        if path.exists() {
            match PleCache::open(&path, &cfg.text, dtype, key, hot_bytes)? {
                Ok(c) => {
                    tracing::info!(path = %path.display(), %dtype, "PLE cache valid");
                    return Ok(c);
                }
                Err(Invalid(why)) => {
                    tracing::warn!(path = %path.display(), reason = %why,
                        "PLE cache is stale or corrupt; rebuilding");
                }
            }
        } else {
            tracing::info!(path = %path.display(), %dtype, "no PLE cache yet; building");
        }
        build_file(cfg, ckpt, dtype, &path, progress)?;
        match PleCache::open(&path, &cfg.text, dtype, key, hot_bytes)? {
            Ok(c) => Ok(c),
            Err(Invalid(why)) => Err(EngineError::PleCache {
                path,
                reason: format!("freshly built file does not validate: {why}"),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.hdr
    }

    pub fn dtype(&self) -> RowDType {
        self.hdr.dtype
    }

    pub fn rows(&self) -> usize {
        self.hdr.rows as usize
    }

    /// Values per row (`L · P`).
    pub fn row_len(&self) -> usize {
        (self.hdr.layers * self.hdr.per_layer_dim) as usize
    }

    /// `16 · PLE[pad]` (f32), the table part of positions without a row.
    pub fn pad_part(&self) -> &[f32] {
        &self.pad_part
    }

    fn row_range(&self, id: usize) -> (usize, usize) {
        let rb = self.hdr.row_bytes as usize;
        let s = self.hdr.rows_offset as usize + id * rb;
        (s, s + rb)
    }

    /// The mapped region of all rows.
    pub fn rows_region(&self) -> MappedRegion {
        MappedRegion {
            map: self.map.clone(),
            path: self.path.clone(),
            offset: self.hdr.rows_offset as usize,
            // The padding up to the next section belongs to the rows' last page.
            len: (self.hdr.pad_offset - self.hdr.rows_offset) as usize,
        }
    }

    /// Decodes row `id` (`< rows()`) into `out` (`row_len()` values). `Err(())` when the
    /// row fails its checksum: the caller must compute the vector another way.
    #[allow(clippy::result_unit_err)]
    pub fn read_row(&self, id: usize, out: &mut [f32]) -> std::result::Result<(), ()> {
        let dtype = self.hdr.dtype;
        {
            let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
            if hot.cap_bytes > 0 {
                if let Some(b) = hot.get(id as u32) {
                    dtype.decode(b, out);
                    return Ok(());
                }
            }
        }
        let (s, e) = self.row_range(id);
        let b = &self.map[s..e];
        if row_sum(b) != self.sums[id] {
            self.note_corrupt(id);
            return Err(());
        }
        dtype.decode(b, out);
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        if hot.cap_bytes > 0 {
            hot.insert(id as u32, b);
        }
        Ok(())
    }

    fn note_corrupt(&self, id: usize) {
        let n = self.corrupt_rows.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(path = %self.path.display(), row = id, corrupt_rows = n,
            "PLE cache row fails its checksum; using the checkpoint for it");
        if !self.quarantined.swap(true, Ordering::Relaxed) {
            let mut q = self.path.as_os_str().to_os_string();
            q.push(".corrupt");
            match std::fs::rename(&self.path, &q) {
                Ok(()) => tracing::warn!(path = %self.path.display(),
                    "PLE cache moved aside to *.corrupt; the next load rebuilds it"),
                Err(e) => tracing::warn!(path = %self.path.display(), err = %e,
                    "could not move the corrupt PLE cache aside"),
            }
        }
    }

    /// Whether a corrupt row has been seen (the file was moved aside for a rebuild).
    pub fn is_corrupt(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Checks every row's checksum; returns the ids of corrupt rows. Reads the whole file
    /// (dropping its pages as it goes); `progress` as for [`build`].
    pub fn verify_all(
        &self,
        progress: &mut dyn FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<Vec<usize>> {
        let rows = self.rows();
        let mut bad = Vec::new();
        let step = ((64usize << 20) / self.hdr.row_bytes.max(1) as usize).max(1);
        let mut start = 0;
        while start < rows {
            let end = (start + step).min(rows);
            for id in start..end {
                let (s, e) = self.row_range(id);
                if row_sum(&self.map[s..e]) != self.sums[id] {
                    bad.push(id);
                }
            }
            let (s, _) = self.row_range(start);
            let (_, e) = self.row_range(end - 1);
            MappedRegion {
                map: self.map.clone(),
                path: self.path.clone(),
                offset: s,
                len: e - s,
            }
            .advise(Advice::Release);
            start = end;
            if progress(start as u64, rows as u64).is_break() {
                return Err(EngineError::Cancelled("verifying the PLE cache"));
            }
        }
        Ok(bad)
    }

    /// Starts reading the rows of `ids` (`MADV_WILLNEED`), e.g. a prompt before prefill.
    pub fn prefetch(&self, ids: &[u32]) {
        let ps = residency::page_size();
        let mut pages: Vec<usize> = Vec::new();
        for &id in ids {
            if (id as usize) < self.rows() {
                let (s, e) = self.row_range(id as usize);
                pages.extend(s / ps..e.div_ceil(ps));
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            residency::advise(&self.map, pages[i] * ps, (j - i) * ps, Advice::WillNeed);
            i = j;
        }
    }

    /// Drops the rows' pages (from this process and the page cache) and empties the hot
    /// row cache. Later reads fault rows back in from the file.
    pub fn release(&self) {
        self.hot.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.rows_region().advise(Advice::Release);
    }

    /// Resident bytes of the rows' pages (`mincore`).
    pub fn resident_bytes(&self) -> u64 {
        self.rows_region().resident_bytes() as u64
    }

    /// Bytes held in RAM by the cache itself: the checksum table and pad row (the hot
    /// rows are in [`PleCache::stats`]).
    pub fn index_bytes(&self) -> u64 {
        (self.sums.len() * 4 + self.pad_part.len() * 4) as u64
    }

    /// Sets the hot-row cache's capacity in bytes (0 disables it), evicting as needed.
    pub fn set_hot_capacity(&self, bytes: usize) {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        hot.cap_bytes = bytes;
        if hot.used > bytes {
            hot.clear();
        }
    }

    pub fn stats(&self) -> PleStats {
        let hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        PleStats {
            hot_bytes: hot.used as u64,
            hot_capacity: hot.cap_bytes as u64,
            hot_rows: hot.rows.len() as u64,
            hot_hits: hot.hits,
            hot_misses: hot.misses,
            corrupt_rows: self.corrupt_rows.load(Ordering::Relaxed),
        }
    }
}

/// Where the decoder's per-layer inputs come from.
#[derive(Clone, Debug)]
pub enum PleSource {
    /// The checkpoint's `embed_tokens_per_layer` table, mapped (the standard path).
    Table(Matrix),
    /// The PLE cache file. `table` is the checkpoint tensor, kept only as a view (no page
    /// of it is read) for rows that fail their checksum.
    Cache {
        cache: Arc<PleCache>,
        table: TensorView,
    },
}

impl PleSource {
    /// Bytes read per token from this source (one row).
    pub fn row_bytes(&self) -> usize {
        match self {
            PleSource::Table(m) => m.row_bytes(),
            PleSource::Cache { cache, .. } => cache.header().row_bytes as usize,
        }
    }

    pub fn cache(&self) -> Option<&Arc<PleCache>> {
        match self {
            PleSource::Table(_) => None,
            PleSource::Cache { cache, .. } => Some(cache),
        }
    }

    /// The mapped checkpoint table, when serving from it.
    pub fn table(&self) -> Option<&Matrix> {
        match self {
            PleSource::Table(m) => Some(m),
            PleSource::Cache { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_codecs_round_trip() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        for dt in [RowDType::F32, RowDType::Bf16, RowDType::F16, RowDType::Q8_0] {
            let mut b = vec![0u8; dt.row_bytes(64).unwrap()];
            dt.encode(&v, &mut b);
            let mut back = vec![0.0; 64];
            dt.decode(&b, &mut back);
            let tol = match dt {
                RowDType::F32 => 0.0,
                RowDType::Bf16 => 0.05,
                RowDType::F16 => 0.01,
                RowDType::Q8_0 => 0.1,
            };
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dt}: {a} vs {b}");
            }
        }
        assert_eq!(RowDType::Q8_0.row_bytes(48), None);
    }

    #[test]
    fn hot_rows_evict_least_recent() {
        let mut h = HotRows {
            cap_bytes: 8,
            ..Default::default()
        };
        h.insert(1, &[1; 4]);
        h.insert(2, &[2; 4]);
        assert!(h.get(1).is_some());
        h.insert(3, &[3; 4]);
        assert!(h.get(2).is_none());
        assert!(h.get(1).is_some() && h.get(3).is_some());
        assert_eq!(h.used, 8);
    }
}
