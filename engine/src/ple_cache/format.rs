//! The file's format: the row types, the header page, the per-row checksums and the
//! file's name and key.

use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use crate::checkpoint::{Checkpoint, DType};
use crate::config::TextConfig;
use crate::derived::{checkpoint_key, folder_hash, rd64, xxh64, CacheDir, Existing};
use crate::error::Result;

pub const MAGIC: [u8; 8] = *b"GEMMAPLE";
/// 2: raw checkpoint rows (the new default) and the table's dtype in the header. Version 1
/// files (bf16 whole vectors by default) are stale and rebuilt.
pub const VERSION: u32 = 2;
pub const HEADER_BYTES: usize = 4096;

/// What the cached rows hold, and in which type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RowDType {
    /// The default, exact: the checkpoint's own `embed_tokens_per_layer` rows, bit for
    /// bit, in the checkpoint's dtype and unscaled (the token part only). At use they
    /// are scaled and combined with the projection part by the same code as the table's
    /// rows, so the per-layer inputs, logits and output are the table path's bits. The
    /// projection matvec still runs per token.
    #[default]
    Raw,
    /// Whole per-layer inputs, precomputed, in f32: no projection matvec at use. Close
    /// to the table path (~1e-6) but not bit-identical: the build projects with the
    /// checkpoint's own weights in batches, serving with `quant`'s at its batch size.
    F32,
    /// Whole per-layer inputs in bf16, round-to-nearest-even: approximate (~5e-3 in
    /// the fixture's logits; greedy output may differ from the table path).
    Bf16,
    /// Whole per-layer inputs in IEEE f16, round-to-nearest: approximate, 8× finer
    /// mantissa than bf16 (the values are well inside f16's range).
    F16,
    /// Whole per-layer inputs as ggml Q8_0 blocks of 32 (f16 scale + 32 × i8), ~0.53
    /// of bf16: the smallest and least exact.
    Q8_0,
}

/// The header code of a checkpoint dtype.
fn table_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

fn table_from_code(c: u32) -> Option<DType> {
    Some(match c {
        0 => DType::F32,
        1 => DType::BF16,
        2 => DType::F16,
        _ => return None,
    })
}

impl RowDType {
    pub const ALL: [RowDType; 5] = [
        RowDType::Raw,
        RowDType::F32,
        RowDType::Bf16,
        RowDType::F16,
        RowDType::Q8_0,
    ];

    fn code(self) -> u32 {
        match self {
            RowDType::F32 => 0,
            RowDType::Bf16 => 1,
            RowDType::Q8_0 => 2,
            RowDType::F16 => 3,
            RowDType::Raw => 4,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            0 => RowDType::F32,
            1 => RowDType::Bf16,
            2 => RowDType::Q8_0,
            3 => RowDType::F16,
            4 => RowDType::Raw,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RowDType::F32 => "f32",
            RowDType::Bf16 => "bf16",
            RowDType::Q8_0 => "q8_0",
            RowDType::F16 => "f16",
            RowDType::Raw => "raw",
        }
    }

    /// Whether rows are whole precomputed per-layer inputs (else the checkpoint's raw
    /// token-part rows).
    pub fn precomputed(self) -> bool {
        self != RowDType::Raw
    }

    /// Bytes of one row of `n` values, for a checkpoint whose table is of `table`;
    /// `None` when `n` does not fit the format.
    pub fn row_bytes(self, n: usize, table: DType) -> Option<usize> {
        match self {
            RowDType::Raw => Some(n * table.size()),
            RowDType::F32 => Some(n * 4),
            RowDType::Bf16 | RowDType::F16 => Some(n * 2),
            RowDType::Q8_0 => n.is_multiple_of(32).then_some(n / 32 * 34),
        }
    }

    /// Encodes `src` into `dst` (`dst.len() == row_bytes(src.len())`); precomputed types
    /// only.
    pub fn encode(self, src: &[f32], dst: &mut [u8]) {
        match self {
            // Raw rows are the checkpoint's bytes, copied, never encoded: `Writer::push`
            // refuses them.
            RowDType::Raw => {}
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

    /// Decodes a row into `dst`; precomputed types only.
    pub fn decode(self, src: &[u8], dst: &mut [f32]) {
        match self {
            // Raw rows are widened and scaled by `model::per_layer::token_part`, the
            // function the table path uses: the model dispatches on `precomputed()`.
            RowDType::Raw => {}
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
            "raw" => RowDType::Raw,
            other => {
                return Err(format!(
                    "unknown PLE row dtype `{other}` (raw, f32, bf16, f16, q8_0)"
                ))
            }
        })
    }
}

/// A row's checksum: the low 32 bits of its xxh64.
#[inline]
pub(super) fn row_sum(row: &[u8]) -> u32 {
    xxh64(row, 0) as u32
}

/// The parsed header of a cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub dtype: RowDType,
    /// The checkpoint table's dtype (that of `Raw` rows).
    pub table_dtype: DType,
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
    pub(super) fn layout(
        dtype: RowDType,
        c: &TextConfig,
        table_dtype: DType,
        key: [u8; 16],
    ) -> Result<Header, String> {
        let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
        let row_bytes = dtype
            .row_bytes(lp, table_dtype)
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
            table_dtype,
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

    pub(super) fn to_bytes(&self) -> Vec<u8> {
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
        b.extend_from_slice(&table_code(self.table_dtype).to_le_bytes());
        b.resize(HEADER_BYTES - 8, 0);
        let sum = xxh64(&b, 0);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    pub(super) fn parse(b: &[u8]) -> Result<Header, String> {
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
        let table_dtype = table_from_code(u32_at(128))
            .ok_or_else(|| format!("unknown table dtype code {}", u32_at(128)))?;
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[96..112]);
        Ok(Header {
            version,
            dtype,
            table_dtype,
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
    pub(super) fn same_layout(&self, want: &Header) -> bool {
        let strip = |h: &Header| Header {
            key: [0; 16],
            pad_sum: 0,
            sums_sum: 0,
            ..h.clone()
        };
        strip(self) == strip(want)
    }
}

/// The checkpoint key of a cache with rows of `dtype` (see the module docs).
pub fn cache_key(ckpt: &Checkpoint, dtype: RowDType) -> Result<[u8; 16]> {
    let mut salt: Vec<u8> = b"gemmad-ple\0".to_vec();
    salt.extend_from_slice(&VERSION.to_le_bytes());
    salt.extend_from_slice(dtype.as_str().as_bytes());
    checkpoint_key(ckpt, &salt)
}

/// The cache file's name (in the cache directory) for the checkpoint in `model_dir` with
/// rows of `dtype`: `ple-<hash of the canonical model path>-<dtype>.gemmaple`. The name
/// is stable per model folder so that a stale file is replaced rather than left behind.
pub fn cache_name(model_dir: &Path, dtype: RowDType) -> String {
    let h = folder_hash(model_dir);
    format!("ple-{h:016x}-{dtype}.gemmaple")
}

/// Removes the cache files of the model in `model_dir`, of any row type, that an older
/// format version wrote: this build cannot read them, and since the default row type
/// changed with version 2 no build would ever replace the old default's file (GBs).
pub(crate) fn remove_older_versions(dir: &CacheDir, model_dir: &Path) {
    for dtype in RowDType::ALL {
        let name = cache_name(model_dir, dtype);
        let Ok(Existing::File(mut f)) = dir.open_existing(&name) else {
            continue;
        };
        let mut head = [0u8; 12];
        if f.read_exact(&mut head).is_err() || head[..8] != MAGIC {
            continue;
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version >= VERSION {
            continue;
        }
        let path = dir.path_of(&name);
        match dir.remove(&name) {
            Ok(()) => tracing::info!(path = %path.display(), version,
                "removed a PLE cache of an older format version"),
            Err(e) => tracing::warn!(path = %path.display(), version, err = %e,
                "could not remove a PLE cache of an older format version"),
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
            let mut b = vec![0u8; dt.row_bytes(64, DType::BF16).unwrap()];
            dt.encode(&v, &mut b);
            let mut back = vec![0.0; 64];
            dt.decode(&b, &mut back);
            let tol = match dt {
                RowDType::F32 => 0.0,
                RowDType::Bf16 => 0.05,
                RowDType::F16 => 0.01,
                RowDType::Q8_0 => 0.1,
                RowDType::Raw => unreachable!(),
            };
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dt}: {a} vs {b}");
            }
        }
        assert_eq!(RowDType::Q8_0.row_bytes(48, DType::BF16), None);
        assert_eq!(RowDType::Raw.row_bytes(48, DType::BF16), Some(96));
        assert_eq!(RowDType::Raw.row_bytes(48, DType::F32), Some(192));
        assert_eq!(RowDType::default(), RowDType::Raw);
    }
}
