//! Writing a cache file: rows in id order, then the pad section, the row checksums and
//! the header, into a temporary file of the cache directory (`derived::CacheDir`)
//! renamed into place when complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};

use super::format::{row_sum, Header, RowDType, HEADER_BYTES};
use crate::checkpoint::DType;
use crate::config::TextConfig;
use crate::derived::{xxh64, CacheDir, TempFile};
use crate::error::{EngineError, Result};
use crate::residency;

/// Bytes written between `fdatasync` + page-cache drops.
const FLUSH_BYTES: u64 = 256 << 20;

/// A cache file being written. Dropped before [`Writer::finish`], it leaves nothing.
pub(crate) struct Writer {
    hdr: Header,
    // Declared before `tmp`: the file is closed before the temp guard removes it.
    w: BufWriter<File>,
    tmp: TempFile,
    sums: Vec<u32>,
    enc: Vec<u8>,
    written: u64,
    synced: u64,
}

impl Writer {
    /// Starts the file `name` in `dir` for a model of `c` whose table is of
    /// `table_dtype`, with rows of `dtype` and `key`.
    pub fn create(
        dir: &CacheDir,
        name: &str,
        c: &TextConfig,
        dtype: RowDType,
        table_dtype: DType,
        key: [u8; 16],
    ) -> Result<Writer> {
        let hdr =
            Header::layout(dtype, c, table_dtype, key).map_err(|reason| EngineError::PleCache {
                path: dir.path_of(name),
                reason,
            })?;
        let (tmp, file) = dir.create_temp(name)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&vec![0u8; HEADER_BYTES])
            .map_err(|e| EngineError::io(tmp.path(), e))?;
        Ok(Writer {
            sums: Vec::with_capacity(hdr.rows as usize),
            hdr,
            w,
            tmp,
            enc: Vec::new(),
            written: HEADER_BYTES as u64,
            synced: 0,
        })
    }

    /// Values per row (`L · P`).
    pub fn row_len(&self) -> usize {
        (self.hdr.layers * self.hdr.per_layer_dim) as usize
    }

    /// Appends the next precomputed rows (`row_len()` values each), encoded to the
    /// file's row type. Returns whether the file was written back and its pages
    /// dropped: every 256 MiB and after the last row, so that a build keeps neither its
    /// output nor (the caller's part) its input in RAM.
    pub fn push(&mut self, rows: &[f32]) -> Result<bool> {
        if !self.hdr.dtype.precomputed() {
            return Err(EngineError::PleCache {
                path: self.tmp.path().to_path_buf(),
                reason: "raw rows are copied from the checkpoint, not encoded from f32".into(),
            });
        }
        let (lp, rb) = (self.row_len(), self.hdr.row_bytes as usize);
        let n = rows.len() / lp;
        let mut enc = std::mem::take(&mut self.enc);
        enc.resize(n * rb, 0);
        for (o, e) in rows.chunks_exact(lp).zip(enc.chunks_exact_mut(rb)) {
            self.hdr.dtype.encode(o, e);
        }
        let r = self.push_bytes(&enc);
        self.enc = enc;
        r
    }

    /// Appends the next rows as stored bytes (`row_bytes` each; for raw rows, the
    /// checkpoint's). Returns what [`Writer::push`] returns.
    pub fn push_bytes(&mut self, rows: &[u8]) -> Result<bool> {
        let rb = self.hdr.row_bytes as usize;
        let n = rows.len() / rb;
        let rows = &rows[..n * rb];
        self.sums.extend(rows.chunks_exact(rb).map(row_sum));
        let werr = |e: std::io::Error| EngineError::io(self.tmp.path(), e);
        self.w.write_all(rows).map_err(werr)?;
        self.written += (n * rb) as u64;
        let last = self.sums.len() as u64 == self.hdr.rows;
        if self.written - self.synced < FLUSH_BYTES && !last {
            return Ok(false);
        }
        self.w.flush().map_err(werr)?;
        self.w.get_ref().sync_data().map_err(werr)?;
        residency::fadvise_file(self.w.get_ref(), 0, self.written as usize);
        self.synced = self.written;
        Ok(true)
    }

    /// Writes the pad section (`16 · PLE[pad]`, f32), the checksums and the header, and
    /// renames the file into place. Returns the file's size.
    pub fn finish(self, pad_part: &[f32]) -> Result<u64> {
        let Writer {
            mut hdr,
            mut w,
            tmp,
            sums,
            written,
            ..
        } = self;
        let werr = |e: std::io::Error| EngineError::io(tmp.path(), e);
        let pad_bytes: Vec<u8> = pad_part.iter().flat_map(|v| v.to_le_bytes()).collect();
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
        tmp.commit(file)?;
        Ok(hdr.file_bytes)
    }
}
