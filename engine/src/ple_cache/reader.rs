//! Serving rows from an opened, validated cache file.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;

use super::format::{row_sum, Header, RowDType};
use super::hot::HotRows;
use crate::checkpoint::DType;
use crate::config::TextConfig;
use crate::derived::{xxh64, CacheDir, Existing};
use crate::error::{EngineError, Result};
use crate::residency::{self, Advice, MappedRegion};

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
    /// Where it lives (moving a corrupt file aside goes through it).
    dir: CacheDir,
    name: String,
    path: PathBuf,
    map: Arc<Mmap>,
    hdr: Header,
    sums: Vec<u32>,
    pad_part: Vec<f32>,
    hot: Mutex<HotRows>,
    corrupt_rows: AtomicU64,
    quarantined: AtomicBool,
}

/// Why a cache file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl Invalid {
    const MISSING: &'static str = "no such file";

    /// Whether there is no file at all (not yet built, rather than bad).
    pub fn is_missing(&self) -> bool {
        self.0 == Self::MISSING
    }
}

impl PleCache {
    /// Opens `name` in `dir` and checks it against the model (`c`, its table's
    /// `table_dtype`), the row type and key; `Ok(Err(_))` says why the file is missing,
    /// untrusted, stale or corrupt (it should then be rebuilt).
    pub fn open(
        dir: &CacheDir,
        name: &str,
        c: &TextConfig,
        dtype: RowDType,
        table_dtype: DType,
        key: [u8; 16],
        hot_bytes: usize,
    ) -> Result<std::result::Result<PleCache, Invalid>> {
        let file = match dir.open_existing(name) {
            Ok(Existing::File(f)) => f,
            Ok(Existing::Missing) => return Ok(Err(Invalid(Invalid::MISSING.into()))),
            Ok(Existing::Untrusted(why)) => return Ok(Err(Invalid(format!("not trusted: {why}")))),
            Err(e) => return Ok(Err(Invalid(format!("cannot open: {e}")))),
        };
        // SAFETY: read-only mapping of a file gemmad wrote via rename, in a directory
        // writable by nobody else (checked by `CacheDir`); a file truncated underneath a
        // running engine is outside what mmap can defend against (the size is checked
        // here).
        let map = match unsafe { Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => return Ok(Err(Invalid(format!("cannot map: {e}")))),
        };
        Self::from_map(dir, name, map, c, dtype, table_dtype, key, hot_bytes)
    }

    /// [`PleCache::open`] of an already-mapped file (`name` in `dir`, where a corrupt
    /// file is moved aside).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_map(
        dir: &CacheDir,
        name: &str,
        map: Mmap,
        c: &TextConfig,
        dtype: RowDType,
        table_dtype: DType,
        key: [u8; 16],
        hot_bytes: usize,
    ) -> Result<std::result::Result<PleCache, Invalid>> {
        let path = &dir.path_of(name);
        let hdr = match Header::parse(&map) {
            Ok(h) => h,
            Err(r) => return Ok(Err(Invalid(r))),
        };
        let want =
            Header::layout(dtype, c, table_dtype, key).map_err(|reason| EngineError::PleCache {
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
                "layout differs from this model/dtype: file has {} rows × {} ({}, table \
                 {:?}), L={} P={}; expected {} rows × {} ({}, table {:?}), L={} P={}",
                hdr.rows,
                hdr.row_bytes,
                hdr.dtype,
                hdr.table_dtype,
                hdr.layers,
                hdr.per_layer_dim,
                want.rows,
                want.row_bytes,
                want.dtype,
                want.table_dtype,
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
            dir: dir.clone(),
            name: name.to_string(),
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

    /// The checkpoint table's dtype (that of raw rows).
    pub fn table_dtype(&self) -> DType {
        self.hdr.table_dtype
    }

    /// Calls `f` with the stored bytes of row `id` (`< rows()`; `row_bytes` of them,
    /// verified), from the hot-row cache or the mapping. `Err(())` when the row fails
    /// its checksum: the caller must compute the vector another way.
    #[allow(clippy::result_unit_err)]
    pub fn with_row<R>(&self, id: usize, f: impl FnOnce(&[u8]) -> R) -> std::result::Result<R, ()> {
        {
            let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
            if hot.cap_bytes > 0 {
                if let Some(b) = hot.get(id as u32) {
                    return Ok(f(b));
                }
            }
        }
        let (s, e) = self.row_range(id);
        let b = &self.map[s..e];
        if row_sum(b) != self.sums[id] {
            self.note_corrupt(id);
            return Err(());
        }
        let r = f(b);
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        if hot.cap_bytes > 0 {
            hot.insert(id as u32, b);
        }
        Ok(r)
    }

    /// Decodes precomputed row `id` (`< rows()`) into `out` (`row_len()` values);
    /// `Err(())` as [`PleCache::with_row`]. Raw rows are the model's to widen.
    #[allow(clippy::result_unit_err)]
    pub fn read_row(&self, id: usize, out: &mut [f32]) -> std::result::Result<(), ()> {
        let dtype = self.hdr.dtype;
        self.with_row(id, |b| dtype.decode(b, out))
    }

    fn note_corrupt(&self, id: usize) {
        let n = self.corrupt_rows.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(path = %self.path.display(), row = id, corrupt_rows = n,
            "PLE cache row fails its checksum; using the checkpoint for it");
        if !self.quarantined.swap(true, Ordering::Relaxed) {
            match self
                .dir
                .rename(&self.name, &format!("{}.corrupt", self.name))
            {
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
    /// (dropping its pages as it goes); `progress(done, total)` is called after each
    /// step, and `ControlFlow::Break` stops the check with [`EngineError::Cancelled`].
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
