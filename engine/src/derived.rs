//! What the files derived from a checkpoint (the PLE cache, the quantized-weights store)
//! share: XXH64 for their keys and checksums, the checkpoint key that tells whether a
//! file was built from this very checkpoint, their per-folder names, and the cache
//! directory they are written to and read from ([`CacheDir`], in `cache_dir.rs`: the one
//! safe, atomic way to write and open them).
//!
//! # Checkpoint key
//!
//! Hashing 11 GB of weights at every start is too slow, so the key is xxh64 (two seeds,
//! 128 bits) over: the caller's salt (which separates the files' keys), the bytes of
//! `config.json` and of `model.safetensors.index.json` (if any), and for each weight file
//! (sorted) its name, size, mtime (seconds + nanoseconds) and the bytes of its
//! safetensors header (which holds every tensor's name, dtype, shape and offsets).
//! Replacing a shard, even with one of the same size, changes its mtime; copying a model
//! folder without preserving times causes a (harmless) rebuild.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};

mod cache_dir;

pub use cache_dir::{CacheDir, Existing, TempFile};

// ---------------------------------------------------------------------------------------
// xxh64 (the reference algorithm)

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_CA63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// The little-endian u64 at the start of `b` (at least 8 bytes).
#[inline]
pub fn rd64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[inline]
fn xround(acc: u64, v: u64) -> u64 {
    acc.wrapping_add(v.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline]
fn xmerge(acc: u64, v: u64) -> u64 {
    (acc ^ xround(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed`.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        let mut stripes = rest.chunks_exact(32);
        for s in &mut stripes {
            v[0] = xround(v[0], rd64(&s[0..]));
            v[1] = xround(v[1], rd64(&s[8..]));
            v[2] = xround(v[2], rd64(&s[16..]));
            v[3] = xround(v[3], rd64(&s[24..]));
        }
        rest = stripes.remainder();
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for x in v {
            h = xmerge(h, x);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    while rest.len() >= 8 {
        h ^= xround(0, rd64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let k = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
        h ^= k.wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    h
}

/// Two seeds of XXH64 over `data`, as 128 bits.
pub fn xxh64_128(data: &[u8], seeds: [u64; 2]) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&xxh64(data, seeds[0]).to_le_bytes());
    key[8..].copy_from_slice(&xxh64(data, seeds[1]).to_le_bytes());
    key
}

// ---------------------------------------------------------------------------------------
// Checkpoint key and file naming

/// The 128-bit key of `ckpt` salted with `salt` (see the module docs for what it covers).
pub fn checkpoint_key(ckpt: &Checkpoint, salt: &[u8]) -> Result<[u8; 16]> {
    let dir = &ckpt.dir;
    let mut buf: Vec<u8> = salt.to_vec();
    for name in ["config.json", "model.safetensors.index.json"] {
        let p = dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => {
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
                buf.extend_from_slice(&b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io(p, e)),
        }
    }
    let mut files: Vec<_> = ckpt.files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    for f in files {
        let md = std::fs::metadata(&f.path).map_err(|e| EngineError::io(&f.path, e))?;
        let name = f
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        buf.extend_from_slice(&md.len().to_le_bytes());
        let (secs, nanos) = {
            use std::os::unix::fs::MetadataExt;
            (md.mtime(), md.mtime_nsec())
        };
        buf.extend_from_slice(&secs.to_le_bytes());
        buf.extend_from_slice(&nanos.to_le_bytes());
        // The safetensors header: 8-byte length + JSON (already validated at open).
        let m = &f.map;
        let n = if m.len() >= 8 {
            (rd64(&m[..8]) as usize).saturating_add(8).min(m.len())
        } else {
            m.len()
        };
        buf.extend_from_slice(&m[..n]);
    }
    Ok(xxh64_128(&buf, [0, 0x5eed_9e3f_7c15_ab01]))
}

/// A hash of the canonical path of `model_dir`, for derived files' names: stable per
/// model folder, so that a stale file is replaced rather than left behind.
pub fn folder_hash(model_dir: &Path) -> u64 {
    let canon = std::fs::canonicalize(model_dir).unwrap_or_else(|_| model_dir.to_path_buf());
    xxh64(canon.to_string_lossy().as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_reference_values() {
        // Known answers of the reference implementation.
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
    }
}
