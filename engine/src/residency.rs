//! Residency of memory-mapped files: which pages are in RAM (`mincore`), prefetching
//! (`MADV_WILLNEED`, touching) and dropping pages (`MADV_DONTNEED`, `MADV_PAGEOUT`,
//! `posix_fadvise(POSIX_FADV_DONTNEED)`).
//!
//! A [`MappedRegion`] is a byte range of one mapping; a [`WeightGroup`] is a named set of
//! regions (the decoder, the embeddings, a tower, the PLE cache rows) that the engine and
//! later the governor page in and out as a unit. All calls are advice: failures are
//! logged and otherwise ignored, because the data stays correct whatever the kernel does.
//!
//! Note: for file-backed mappings `mincore` reports whether a page is in the page cache
//! (i.e. in RAM and mappable without I/O), not whether this process has faulted it in.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// What to do with a region's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Read ahead asynchronously (`MADV_WILLNEED`).
    WillNeed,
    /// Disable kernel readahead on faults (`MADV_RANDOM`).
    Random,
    /// Drop the pages from this process and, where possible, from the page cache.
    Release,
    /// Drop the pages from this process only (`MADV_DONTNEED`); the page cache keeps
    /// them for the next reader. For source tensors whose converted copy is in use.
    Unmap,
}

/// A byte range of a mapped file.
#[derive(Clone, Debug)]
pub struct MappedRegion {
    pub map: Arc<Mmap>,
    /// The file behind the mapping (for `posix_fadvise`).
    pub path: PathBuf,
    /// Byte offset inside the mapping (= inside the file: mappings start at offset 0).
    pub offset: usize,
    pub len: usize,
}

impl MappedRegion {
    /// The page-aligned sub-range fully inside this region (`inward`) or covering it
    /// (`!inward`), as (offset, len) relative to the mapping.
    pub fn page_span(&self, inward: bool) -> (usize, usize) {
        page_span(self.offset, self.len, self.map.len(), inward)
    }

    /// Bytes of the region's pages (covering span) that are resident.
    pub fn resident_bytes(&self) -> usize {
        let (o, l) = self.page_span(false);
        resident_bytes(&self.map, o, l)
    }

    /// Bytes of the pages lying fully inside the region that are resident.
    pub fn resident_bytes_inward(&self) -> usize {
        let (o, l) = self.page_span(true);
        resident_bytes(&self.map, o, l)
    }

    /// Applies `advice`. `Release` only drops pages fully inside the region, so that
    /// neighbouring tensors sharing a boundary page keep theirs.
    pub fn advise(&self, advice: Advice) {
        let inward = advice == Advice::Release;
        let (o, l) = self.page_span(inward);
        advise(&self.map, o, l, advice);
        if advice == Advice::Release {
            fadvise_dontneed(&self.path, o, l);
        }
    }

    /// Faults every page in (reads one byte per page), so the region is resident when this
    /// returns.
    pub fn touch(&self) {
        let ps = page_size();
        let data = &self.map[..];
        let end = (self.offset + self.len).min(data.len());
        let mut acc = 0u8;
        let mut i = self.offset;
        while i < end {
            // SAFETY: `i` is in bounds of the mapping.
            acc ^= unsafe { std::ptr::read_volatile(data.as_ptr().add(i)) };
            i = (i / ps + 1) * ps;
        }
        std::hint::black_box(acc);
    }
}

pub(crate) fn page_span(offset: usize, len: usize, map_len: usize, inward: bool) -> (usize, usize) {
    let ps = page_size();
    let end = (offset + len).min(map_len);
    if inward {
        let s = offset.div_ceil(ps) * ps;
        // The mapping's last partial page is still a page of this range.
        let e = if end == map_len { end } else { end / ps * ps };
        if e <= s {
            (s, 0)
        } else {
            (s, e - s)
        }
    } else {
        let s = offset / ps * ps;
        (s, end.saturating_sub(s))
    }
}

/// Bytes of `[offset, offset+len)` of `map` resident in RAM, counted in whole pages.
/// `offset` must be page-aligned.
pub fn resident_bytes(map: &Mmap, offset: usize, len: usize) -> usize {
    let v = residency_vector(map, offset, len);
    let ps = page_size();
    let total = len;
    let mut bytes = 0usize;
    for (i, &b) in v.iter().enumerate() {
        if b & 1 == 1 {
            bytes += ps.min(total - i * ps);
        }
    }
    bytes
}

/// One byte per page of `[offset, offset+len)` (bit 0 = resident). `offset` must be
/// page-aligned; an empty vector when the call fails.
pub fn residency_vector(map: &Mmap, offset: usize, len: usize) -> Vec<u8> {
    let ps = page_size();
    let len = len.min(map.len().saturating_sub(offset));
    if len == 0 || !offset.is_multiple_of(ps) {
        return Vec::new();
    }
    let pages = len.div_ceil(ps);
    let mut v = vec![0u8; pages];
    // SAFETY: the range lies inside a live mapping and starts on a page boundary; `v` has
    // one byte per page.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(offset) as *mut libc::c_void,
            len,
            v.as_mut_ptr() as *mut libc::c_uchar,
        )
    };
    if rc != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "mincore failed");
        return Vec::new();
    }
    v
}

/// `madvise` on a page-aligned range of `map`.
pub fn advise(map: &Mmap, offset: usize, len: usize, advice: Advice) {
    let len = len.min(map.len().saturating_sub(offset));
    if len == 0 || !offset.is_multiple_of(page_size()) {
        return;
    }
    // SAFETY: the range is inside a live read-only shared file mapping. MADV_DONTNEED on
    // such a mapping only drops page-table entries; later reads fault the same file bytes
    // back in, so references into the mapping stay valid and see identical data.
    let ptr = unsafe { map.as_ptr().add(offset) } as *mut libc::c_void;
    let call = |adv: libc::c_int| unsafe { libc::madvise(ptr, len, adv) };
    match advice {
        Advice::WillNeed => {
            if call(libc::MADV_WILLNEED) != 0 {
                tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_WILLNEED failed");
            }
        }
        Advice::Random => {
            if call(libc::MADV_RANDOM) != 0 {
                tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_RANDOM failed");
            }
        }
        Advice::Unmap => {
            if call(libc::MADV_DONTNEED) != 0 {
                tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_DONTNEED failed");
            }
        }
        Advice::Release => {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                // Reclaims the pages from the page cache too (Linux >= 5.4); EINVAL before.
                let _ = call(libc::MADV_PAGEOUT);
            }
            if call(libc::MADV_DONTNEED) != 0 {
                tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_DONTNEED failed");
            }
        }
    }
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on a byte range of the file at `path` (drops its
/// clean pages from the page cache unless another mapping still uses them).
pub fn fadvise_dontneed(path: &Path, offset: usize, len: usize) {
    if len == 0 {
        return;
    }
    match File::open(path) {
        Ok(f) => fadvise_file(&f, offset, len),
        Err(e) => tracing::debug!(path = %path.display(), err = %e, "fadvise: open failed"),
    }
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on an open file.
pub fn fadvise_file(f: &File, offset: usize, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "posix_fadvise(DONTNEED) failed");
    }
}

/// A vector of `n` copies of `fill` whose pages the kernel is asked to back with
/// transparent huge pages: weights are streamed once per token, and 2 MiB pages remove
/// most TLB misses (measured +20% read bandwidth on the development VMs). Must be filled
/// after the advice, which is why it is done here.
pub fn huge_vec<T: Copy>(n: usize, fill: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    madvise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v.resize(n, fill);
    v
}

/// Asks for transparent huge pages under `v`'s untouched pages: a fresh `vec![0; n]`
/// (whose zero pages the allocator maps lazily) or a fresh file mapping (before its first
/// fault, so that the page cache reads the file in 2 MiB folios where the filesystem
/// allows). The pages still come on first touch, 2 MiB at a time. Advisory; ignored
/// where THP is off.
pub fn advise_huge<T>(v: &[T]) {
    madvise_huge(v.as_ptr() as usize, std::mem::size_of_val(v));
}

/// `MADV_HUGEPAGE` on the pages under `bytes` at `p` (4 MiB and up: a smaller span holds
/// at most one aligned huge page).
fn madvise_huge(p: usize, bytes: usize) {
    if bytes < 4 << 20 {
        return;
    }
    let start = p & !4095;
    // SAFETY: advisory only, on pages of the caller's own allocation or mapping; a
    // failure (THP disabled) leaves ordinary pages.
    let rc = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            p + bytes - start,
            libc::MADV_HUGEPAGE,
        )
    };
    if rc != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_HUGEPAGE refused");
    }
}

/// Size of a PMD-mapped (huge) page on x86-64 and arm64 with 4 KiB base pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// Bytes of the mapping at `map` that the kernel maps with 2 MiB pages: the
/// `FilePmdMapped` (file-backed) plus `AnonHugePages` of the VMAs it spans, from
/// `/proc/self/smaps`. `None` where that cannot be read.
pub fn huge_mapped_bytes(map: &[u8]) -> Option<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let (start, end) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
    let mut inside = false;
    let mut total = 0usize;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a < end && b > start;
                continue;
            }
        }
        if !inside {
            continue;
        }
        for field in ["FilePmdMapped:", "AnonHugePages:"] {
            if let Some(rest) = line.strip_prefix(field) {
                let kb = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<usize>().ok());
                total += kb.unwrap_or(0) * 1024;
            }
        }
    }
    Some(total)
}

/// Brings a read-only shared file mapping (advised `MADV_HUGEPAGE`) onto 2 MiB pages when
/// the page cache holds the file in small folios (it was read or written outside the
/// mapping, or reclaim split its folios), which a mapping can only map 4 KiB at a time:
/// measured on this project's VMs, two threads streamed such a file at 36.8 GB/s against
/// 45.0 GB/s once huge (means of 10 alternated reads). Unmaps this process's pages,
/// drops the file's clean pages from the page cache, and faults each 2 MiB range back
/// in, which reads it as one folio. Pages another process maps stay as they are.
/// Returns the huge-mapped bytes after the attempt.
pub fn refault_huge(map: &Mmap, file: &File) -> Option<usize> {
    advise(map, 0, map.len(), Advice::Unmap);
    fadvise_file(file, 0, 0);
    let mut sink = 0u8;
    for off in (0..map.len()).step_by(HUGE_PAGE) {
        // SAFETY: `off` is inside the mapping.
        sink ^= unsafe { std::ptr::read_volatile(map.as_ptr().add(off)) };
    }
    std::hint::black_box(sink);
    huge_mapped_bytes(map)
}

/// For a mapping advised with [`advise_huge`] whose pages have all been faulted in: if
/// most of it sits on 4 KiB pages, re-read it in 2 MiB folios ([`refault_huge`]); costs
/// one read of the file from disk.
pub fn ensure_huge(path: &Path, map: &Mmap, file: &File) {
    // What can be huge: the 2 MiB-aligned span of the mapping.
    let (p, n) = (map.as_ptr() as usize, map.len());
    let span = ((p + n) / HUGE_PAGE * HUGE_PAGE).saturating_sub(p.next_multiple_of(HUGE_PAGE));
    let Some(before) = huge_mapped_bytes(map) else {
        return;
    };
    if span < 16 * HUGE_PAGE || before >= span / 10 * 9 {
        tracing::debug!(path = %path.display(), huge_bytes = before, span, "file mapped");
        return;
    }
    let t0 = std::time::Instant::now();
    let after = refault_huge(map, file).unwrap_or(0);
    tracing::info!(
        path = %path.display(),
        huge_before = before,
        huge_after = after,
        span,
        secs = t0.elapsed().as_secs_f64(),
        "mapped file was on small pages; re-read it in 2 MiB pages"
    );
}

/// A named set of mapped regions that is paged in and out as a unit.
#[derive(Clone, Debug, Default)]
pub struct WeightGroup {
    pub name: String,
    pub regions: Vec<MappedRegion>,
    /// Parameters (elements) the group holds.
    pub params: u64,
}

impl WeightGroup {
    pub fn new(name: impl Into<String>) -> Self {
        WeightGroup {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Adds a region, merging it with the previous one when they are contiguous in the
    /// same mapping (so that page rounding works on whole runs of small tensors).
    pub fn push(&mut self, r: MappedRegion) {
        if let Some(last) = self.regions.last_mut() {
            if Arc::ptr_eq(&last.map, &r.map) && last.offset + last.len == r.offset {
                last.len += r.len;
                return;
            }
        }
        self.regions.push(r);
    }

    /// Sorts regions by (mapping, offset) and merges contiguous ones.
    pub fn coalesce(&mut self) {
        let mut rs = std::mem::take(&mut self.regions);
        rs.sort_by_key(|r| (Arc::as_ptr(&r.map) as usize, r.offset));
        for r in rs {
            self.push(r);
        }
    }

    /// Mapped bytes of the group.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len as u64).sum()
    }

    /// Resident bytes of the group's pages (pages shared with a neighbour count).
    pub fn resident_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.resident_bytes() as u64).sum()
    }

    /// Resident bytes of the pages that belong to this group alone.
    pub fn resident_bytes_inward(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.resident_bytes_inward() as u64)
            .sum()
    }

    /// Starts reading the group in (`MADV_WILLNEED`).
    pub fn prefetch(&self) {
        for r in &self.regions {
            r.advise(Advice::WillNeed);
        }
    }

    /// Faults every page of the group in.
    pub fn touch(&self) {
        for r in &self.regions {
            r.touch();
        }
    }

    /// Drops the group's pages (`MADV_PAGEOUT`/`MADV_DONTNEED` + `POSIX_FADV_DONTNEED`).
    pub fn release(&self) {
        for r in &self.regions {
            r.advise(Advice::Release);
        }
    }

    /// Turns off kernel readahead on page faults in the group.
    pub fn random_access(&self) {
        for r in &self.regions {
            let (o, l) = r.page_span(true);
            advise(&r.map, o, l, Advice::Random);
        }
    }
}

/// The process's resident set from `/proc/self/status`: (VmRSS, RssAnon, RssFile) in
/// bytes; zeros where unavailable.
pub fn process_rss() -> (u64, u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0, 0);
    };
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

/// The machine's RAM (`MemTotal` of `/proc/meminfo`) in bytes; `None` where unreadable.
pub fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb.saturating_mul(1024))
}

/// Returns the heap's free pages to the OS. Parsing a large `tokenizer.json` and
/// converting weights leave hundreds of MiB freed but still mapped in glibc's heap; after
/// load nothing will reuse most of it.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions and only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_spans() {
        let ps = page_size();
        assert_eq!(page_span(10, 100, 10 * ps, false), (0, 110));
        assert_eq!(page_span(10, 100, 10 * ps, true).1, 0);
        assert_eq!(page_span(1, 3 * ps, 10 * ps, true), (ps, 2 * ps));
        assert_eq!(
            page_span(ps, 3 * ps + 5, 4 * ps + 5, true),
            (ps, 3 * ps + 5)
        );
    }

    #[test]
    fn refaulting_keeps_the_contents_and_huge_bytes_stay_within_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        let data: Vec<u8> = (0..5 * HUGE_PAGE + 12345)
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: a private temp file nobody else writes.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        let _ = map.advise(memmap2::Advice::HugePage);
        assert_eq!(&map[..], &data[..]);
        let before = huge_mapped_bytes(&map).expect("/proc/self/smaps readable");
        assert!(before <= map.len(), "{before}");
        let after = refault_huge(&map, &file).expect("/proc/self/smaps readable");
        assert!(after <= map.len(), "{after}");
        assert_eq!(&map[..], &data[..], "contents after the drop and refault");
    }
}
