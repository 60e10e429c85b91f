//! Software prefetches of the x86 kernels: a line now, or the span a kernel reads next a
//! fixed distance ahead.

/// Requests into L1 the cache line holding `p` (the x86 kernels' prefetches).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch never faults, whatever the address; SSE is x86-64's baseline.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

/// How far ahead of a decode step's reads the kernels request weight bytes. A core of
/// this project's 2-core Xeon (Emerald Rapids) streams only ~15 GB/s, bounded by the
/// lines it keeps in flight, and its hardware prefetchers alone kept too few in flight
/// for a one-token product. With requests 2 KiB ahead (alternated runs): streaming
/// E2B-sized Q4_0 layers (the `decode_stream` example, 1.1 GB) 17-20 → 23 GB/s; the
/// bench's E2B Q4_0 decode 11.2/11.4 → 13.2/12.6 tok/s (products 79 → 65-69 ms of a
/// token). 4 KiB did no better then; Q8_0, with half the work per byte, streamed at the
/// memory's speed either way. Later, on the same VM with faster memory (~29 GB/s for
/// two threads), 3 KiB beat 2 KiB in each of 4 alternated pairs (E2B decode after a
/// 64-token prompt: Q4_K 17.95/18.74 → 18.59/19.05, Q4_0 19.17/19.99 → 19.78/20.17
/// tok/s); 4 KiB was no better than 3.
const PREFETCH_AHEAD: usize = 3072;

/// Requests into L1 the `bytes` bytes [`PREFETCH_AHEAD`] past `p` (the span a kernel is
/// about to read), one request per cache line; past a row group's (or a bf16 row's) end
/// that is the next one (contiguous), past the matrix harmless. Packed Q4_K asks per
/// 512-byte chunk rather than per 2368-byte block, so the requests come spread out as
/// the reads do.
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, bytes: usize) {
    let p = p.wrapping_add(PREFETCH_AHEAD);
    for k in 0..bytes.div_ceil(64) {
        prefetch(p.wrapping_add(64 * k));
    }
}
