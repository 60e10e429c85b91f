//! The quantized-weights cache file: what `--quant` produced from a checkpoint, written
//! once into the cache directory and memory-mapped on later starts (no re-quantization,
//! and the pages are file-backed: the kernel can drop and re-read them).
//!
//! Decode streams every stored byte once per token, and with 4 KiB pages the TLB misses
//! cost a third of the read rate (measured: LM head 20.5 GB/s on 4 KiB pages, 30.6 GB/s
//! on 2 MiB). So the mapping asks for huge pages (`MADV_HUGEPAGE` before the first
//! fault, which makes the page cache read the file in 2 MiB folios where the filesystem
//! allows, e.g. ext4 on Linux ≥ 6.16), and the writer drops the freshly written file
//! from the page cache, whose small write-time folios would otherwise be mapped as they
//! are on the next start. A store that is nevertheless found on 4 KiB pages when opened
//! (the file was written or read in small folios outside gemmad, or reclaim split its
//! folios) is re-read in 2 MiB folios once (`residency::ensure_huge`).
//!
//! Keyed by the checkpoint key (`derived`: config, index, shard names, sizes, mtimes and
//! safetensors headers) plus the quant type, the layout and this format's version. The
//! header carries XXH64 checksums of the index and of the data; a file whose key,
//! version or checksums do not match is rebuilt, never used, and so is one the cache
//! directory does not trust (`derived::CacheDir`: a symlink, someone else's file).
//! Written and opened through `CacheDir` only (temp file renamed into place).
//!
//! Layout: a 4096-byte header page (magic, version, quant, key, entry count, index and
//! data extents and checksums), the index (per entry: name, storage code, rows, cols,
//! offset, length), then the data, each entry 64-byte aligned.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::Matrix;
use crate::checkpoint::Checkpoint;
use crate::derived::{checkpoint_key, folder_hash, rd64, xxh64, xxh64_128, CacheDir, Existing};
use crate::error::{EngineError, Result};
use crate::quant::{packed, QuantType};
use crate::residency::{advise_huge, ensure_huge};

const MAGIC: &[u8; 8] = b"GEMMAQW\0";
const VERSION: u32 = 3; // 2: packed blocks carry their scales inline; 3: Q4_K mins in pairs
const HEADER: usize = 4096;
const ALIGN: usize = 64;

/// The salt of the checkpoint key under a store's key: the bytes the PLE cache salts the
/// key of its f32 files with (format 1). Stores were first keyed with that key, and the
/// same bytes keep existing stores valid.
const CKPT_SALT: &[u8] = b"gemmad-ple\0\x01\0\0\0f32";

/// The file name (in the cache directory) of the quantized weights of `ckpt` as
/// `quant`, and their key.
pub fn store_name(ckpt: &Checkpoint, quant: QuantType) -> Result<(String, [u8; 16])> {
    let base = checkpoint_key(ckpt, CKPT_SALT)?;
    let mut buf = Vec::with_capacity(48);
    buf.extend_from_slice(b"gemmad-quant\0");
    buf.extend_from_slice(&base);
    buf.extend_from_slice(quant.as_str().as_bytes());
    buf.extend_from_slice(packed::layout_tag().as_bytes());
    buf.extend_from_slice(&VERSION.to_le_bytes());
    let key = xxh64_128(&buf, [1, 2]);
    let h = folder_hash(&ckpt.dir);
    Ok((
        format!("weights-{h:016x}-{quant}-{}.gemmaqw", packed::layout_tag()),
        key,
    ))
}

/// An opened, validated store: matrices by name, mapped in place.
#[derive(Debug)]
pub struct QuantStore {
    pub path: PathBuf,
    map: Arc<Mmap>,
    entries: HashMap<String, (u8, usize, usize, usize, usize)>,
}

fn rd32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl QuantStore {
    /// Opens `name` in `dir` if it is a complete, uncorrupted store for `key` and
    /// `quant`; `None` when it is missing or must be rebuilt (the reason is logged).
    pub fn open(dir: &CacheDir, name: &str, key: &[u8; 16], quant: QuantType) -> Option<Self> {
        let path = &dir.path_of(name);
        let file = match dir.open_existing(name) {
            Ok(Existing::File(f)) => f,
            Ok(Existing::Missing) => return None,
            Ok(Existing::Untrusted(reason)) => {
                tracing::warn!(path = %path.display(), %reason, "quantized weights cache is not trusted; rebuilding");
                return None;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the quantized weights cache; rebuilding");
                return None;
            }
        };
        // SAFETY: read-only map of a file only gemmad writes (atomically, by rename), and
        // that the cache directory checked is gemmad's own and writable by nobody else.
        let map = match unsafe { Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot map the quantized weights cache; rebuilding");
                return None;
            }
        };
        advise_huge(&map[..]);
        match Self::parse(&map, key, quant) {
            Ok(entries) => {
                ensure_huge(path, &map, &file);
                Some(QuantStore {
                    path: path.to_path_buf(),
                    map: Arc::new(map),
                    entries,
                })
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "quantized weights cache is stale or corrupt; rebuilding");
                None
            }
        }
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn parse(
        m: &[u8],
        key: &[u8; 16],
        quant: QuantType,
    ) -> std::result::Result<HashMap<String, (u8, usize, usize, usize, usize)>, String> {
        if m.len() < HEADER || &m[..8] != MAGIC {
            return Err("bad magic or short file".into());
        }
        if rd32(&m[8..]) != VERSION {
            return Err(format!("version {} != {VERSION}", rd32(&m[8..])));
        }
        if &m[16..32] != key {
            return Err("checkpoint changed (key mismatch)".into());
        }
        if m[12] != code_of(quant) {
            return Err("quant type mismatch".into());
        }
        let count = rd64(&m[32..]) as usize;
        let (ioff, ilen) = (rd64(&m[40..]) as usize, rd64(&m[48..]) as usize);
        let (doff, dlen) = (rd64(&m[56..]) as usize, rd64(&m[64..]) as usize);
        let (ixx, dxx) = (rd64(&m[72..]), rd64(&m[80..]));
        if ioff.checked_add(ilen).is_none_or(|e| e > m.len())
            || doff.checked_add(dlen).is_none_or(|e| e != m.len())
        {
            return Err("extents do not match the file size (truncated?)".into());
        }
        let index = &m[ioff..ioff + ilen];
        if xxh64(index, 0) != ixx {
            return Err("index checksum mismatch".into());
        }
        if xxh64(&m[doff..], 0) != dxx {
            return Err("data checksum mismatch".into());
        }
        // The count is not covered by a checksum: size the table by what the index can
        // hold (an entry takes at least 35 bytes), not by the count.
        let mut entries = HashMap::with_capacity(count.min(index.len() / 35));
        let mut p = 0usize;
        for _ in 0..count {
            let need = |p: usize, n: usize| {
                if p + n <= index.len() {
                    Ok(())
                } else {
                    Err("index truncated".to_string())
                }
            };
            need(p, 2)?;
            let nl = u16::from_le_bytes([index[p], index[p + 1]]) as usize;
            p += 2;
            need(p, nl + 1 + 32)?;
            let name = std::str::from_utf8(&index[p..p + nl])
                .map_err(|_| "bad name")?
                .to_string();
            p += nl;
            let code = index[p];
            p += 1;
            let rows = rd64(&index[p..]) as usize;
            let cols = rd64(&index[p + 8..]) as usize;
            let off = rd64(&index[p + 16..]) as usize;
            let len = rd64(&index[p + 24..]) as usize;
            p += 32;
            if off.checked_add(len).is_none_or(|e| e > dlen) || !off.is_multiple_of(ALIGN) {
                return Err(format!("entry {name} out of range"));
            }
            entries.insert(name, (code, rows, cols, doff + off, len));
        }
        Ok(entries)
    }

    /// A store over an already-mapped file, with [`QuantStore::open`]'s checks; the
    /// reason when it must not be used.
    pub(crate) fn from_map(
        path: &Path,
        map: Mmap,
        key: &[u8; 16],
        quant: QuantType,
    ) -> std::result::Result<Self, String> {
        let entries = Self::parse(&map, key, quant)?;
        Ok(QuantStore {
            path: path.to_path_buf(),
            map: Arc::new(map),
            entries,
        })
    }

    /// Name, rows and columns of every stored matrix.
    pub(crate) fn shapes(&self) -> impl Iterator<Item = (&str, usize, usize)> {
        self.entries
            .iter()
            .map(|(n, &(_, r, c, _, _))| (n.as_str(), r, c))
    }

    /// The stored matrix `name` if it has the expected shape.
    pub fn get(&self, name: &str, rows: usize, cols: usize) -> Option<Matrix> {
        let &(code, r, c, off, len) = self.entries.get(name)?;
        if r != rows || c != cols {
            return None;
        }
        Matrix::from_mapped(code, rows, cols, self.map.clone(), off, len)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn code_of(q: QuantType) -> u8 {
    match q {
        QuantType::F32 => 4,
        QuantType::Bf16 => 5,
        QuantType::Q8_0 => 1,
        QuantType::Q4_0 => 2,
        QuantType::Q4K => 3,
    }
}

/// Writes `mats` (owned, converted matrices) as the store `name` in `dir` for `key`,
/// atomically. A failed write (ENOSPC, ...) leaves nothing in `dir`.
pub fn write(
    dir: &CacheDir,
    name: &str,
    key: &[u8; 16],
    quant: QuantType,
    mats: &[(String, Matrix)],
) -> Result<()> {
    let mut index = Vec::new();
    let mut off = 0usize;
    let mut blobs: Vec<(&[u8], usize)> = Vec::with_capacity(mats.len());
    for (name, m) in mats {
        let Some((code, bytes)) = m.stored_bytes() else {
            continue;
        };
        let pad = (ALIGN - off % ALIGN) % ALIGN;
        off += pad;
        index.extend_from_slice(&(name.len() as u16).to_le_bytes());
        index.extend_from_slice(name.as_bytes());
        index.push(code);
        for v in [m.rows as u64, m.cols as u64, off as u64, bytes.len() as u64] {
            index.extend_from_slice(&v.to_le_bytes());
        }
        blobs.push((bytes, pad));
        off += bytes.len();
    }
    let ioff = HEADER;
    let doff = (ioff + index.len()).div_ceil(4096) * 4096;
    let dlen = off;
    let (tmp, f) = dir.create_temp(name)?;
    let werr = |e: std::io::Error| EngineError::io(tmp.path(), e);
    let write_all = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
        w.write_all(&vec![0u8; doff])?; // header + index placeholder, rewritten below
        for (bytes, pad) in &blobs {
            w.write_all(&vec![0u8; *pad])?;
            w.write_all(bytes)?;
        }
        w.flush()
    };
    write_all().map_err(werr)?;
    // Checksum the data by mapping what was written (XXH64 is not incremental here).
    // SAFETY: private temp file, not yet visible under its final name.
    let map = unsafe { Mmap::map(&f) }.map_err(werr)?;
    let dxx = xxh64(&map[doff..doff + dlen], 0);
    drop(map);
    let mut head = vec![0u8; HEADER];
    head[..8].copy_from_slice(MAGIC);
    head[8..12].copy_from_slice(&VERSION.to_le_bytes());
    head[12] = code_of(quant);
    head[16..32].copy_from_slice(key);
    for (i, v) in [
        blobs.len() as u64,
        ioff as u64,
        index.len() as u64,
        doff as u64,
        dlen as u64,
        xxh64(&index, 0),
        dxx,
    ]
    .iter()
    .enumerate()
    {
        head[32 + 8 * i..40 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    use std::os::unix::fs::FileExt;
    f.write_all_at(&head, 0).map_err(werr)?;
    f.write_all_at(&index, ioff as u64).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    // Clean after the sync, so this drops them (see the module docs).
    crate::residency::fadvise_file(&f, 0, 0);
    tmp.commit(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a store of one f32 matrix, as the real writer writes it.
    fn written(key: &[u8; 16]) -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open(tmp.path()).unwrap();
        let m = Matrix::from_f32(2, 4, (0..8).map(|i| i as f32).collect());
        write(&dir, "w.gemmaqw", key, QuantType::F32, &[("w".into(), m)]).unwrap();
        std::fs::read(tmp.path().join("w.gemmaqw")).unwrap()
    }

    #[test]
    fn a_huge_entry_count_is_refused_not_allocated() {
        // Found by fuzz/weights_cache_header: the count (outside the checksums) sized
        // the entry table before any entry was read; u64::MAX overflowed the capacity.
        let key = [7u8; 16];
        let mut b = written(&key);
        assert_eq!(
            QuantStore::parse(&b, &key, QuantType::F32).unwrap().len(),
            1
        );
        for count in [u64::MAX, 1 << 40, 2] {
            b[32..40].copy_from_slice(&count.to_le_bytes());
            let e = QuantStore::parse(&b, &key, QuantType::F32).unwrap_err();
            assert!(e.contains("index truncated"), "{count}: {e}");
        }
    }

    #[test]
    fn stored_dimensions_whose_product_overflows_are_refused() {
        // Found by fuzz/weights_cache_header: an entry's rows × cols (read from the
        // file) overflowed in Matrix::from_mapped when a caller asked for that shape.
        let key = [7u8; 16];
        let mut b = written(&key);
        let huge = 1u64 << 62;
        // The index starts at the header's end: name length (2), name "w", code, rows.
        let rows_at = HEADER + 2 + 1 + 1;
        b[rows_at..rows_at + 8].copy_from_slice(&huge.to_le_bytes());
        let ixx = xxh64(&b[HEADER..HEADER + rd64(&b[48..]) as usize], 0);
        b[72..80].copy_from_slice(&ixx.to_le_bytes());
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("w.gemmaqw"), &b).unwrap();
        let dir = CacheDir::open(tmp.path()).unwrap();
        let store = QuantStore::open(&dir, "w.gemmaqw", &key, QuantType::F32).unwrap();
        assert_eq!(
            store.shapes().collect::<Vec<_>>(),
            [("w", huge as usize, 4)]
        );
        assert!(store.get("w", huge as usize, 4).is_none());
        // Packed codes multiply differently.
        for code in 1..=8 {
            let m = memmap2::MmapMut::map_anon(8192 + 32).unwrap();
            let m = Arc::new(m.make_read_only().unwrap());
            assert!(Matrix::from_mapped(code, usize::MAX, 256, m, 8192, 32).is_none());
        }
    }
}
