//! Memory read bandwidth: a streaming read over an anonymous buffer far larger than the
//! caches, backed by transparent huge pages where the kernel allows
//! (`madvise(MADV_HUGEPAGE)`), summed with SIMD so that the read and not the arithmetic
//! is the limit, split evenly over `threads` threads that start together. The result is
//! the best of several passes.

use std::sync::Barrier;
use std::time::Instant;

use anyhow::{Context, Result};

#[derive(Clone, Debug)]
pub struct Bandwidth {
    /// Best pass, bytes per second.
    pub best_bytes_per_s: f64,
    /// Every pass, bytes per second.
    pub passes: Vec<f64>,
    pub buffer_bytes: usize,
    pub threads: usize,
    /// Whether madvise(MADV_HUGEPAGE) was accepted.
    pub huge_pages_advised: bool,
}

/// Sum of `v` as wrapping u64 lanes (8 independent accumulators so the loop vectorises).
#[inline(always)]
fn sum_lanes(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    let mut s = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &x| a.wrapping_add(x));
    for a in acc {
        s = s.wrapping_add(a);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(v: &[u64]) -> u64 {
    sum_lanes(v)
}

/// Reads every byte of `v`; the sum keeps the compiler from skipping the reads.
pub fn sum(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { sum_avx2(v) };
        }
    }
    sum_lanes(v)
}

/// Measures read bandwidth over `bytes` with `threads` threads, best of `passes`.
pub fn measure(bytes: usize, threads: usize, passes: usize) -> Result<Bandwidth> {
    let threads = threads.max(1);
    let words = (bytes / 8 / threads / 8) * 8 * threads; // equal, 64-byte multiple parts
    let len = words * 8;
    let mut map = memmap2::MmapMut::map_anon(len).context("allocate the bandwidth buffer")?;
    #[cfg(target_os = "linux")]
    let huge = map.advise(memmap2::Advice::HugePage).is_ok();
    #[cfg(not(target_os = "linux"))]
    let huge = false;
    // Touch every page with distinct values (also commits the memory before timing).
    {
        // SAFETY: the mapping is page-aligned and `len` is a multiple of 8.
        let w: &mut [u64] =
            unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<u64>(), words) };
        for (i, x) in w.iter_mut().enumerate() {
            *x = i as u64;
        }
    }
    // SAFETY: as above, read-only view.
    let w: &[u64] = unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<u64>(), words) };
    let part = words / threads;
    let parts: Vec<Vec<&[u64]>> = (0..threads)
        .map(|t| vec![&w[t * part..(t + 1) * part]])
        .collect();
    let results = run_passes(&parts, passes);
    let best = results.iter().copied().fold(0.0, f64::max);
    Ok(Bandwidth {
        best_bytes_per_s: best,
        passes: results,
        buffer_bytes: len,
        threads,
        huge_pages_advised: huge,
    })
}

/// Bytes/s of each of `passes` passes in which thread `t` sums `parts[t]`, the threads
/// starting together; a pass lasts as long as its slowest thread.
fn run_passes(parts: &[Vec<&[u64]>], passes: usize) -> Vec<f64> {
    let bytes: usize = parts.iter().flatten().map(|w| w.len() * 8).sum();
    let mut results = Vec::with_capacity(passes);
    let mut check = 0u64;
    for _ in 0..passes.max(1) {
        let barrier = Barrier::new(parts.len() + 1);
        let (elapsed, s) = std::thread::scope(|sc| {
            let hs: Vec<_> = parts
                .iter()
                .map(|p| {
                    let b = &barrier;
                    sc.spawn(move || {
                        b.wait();
                        let t0 = Instant::now();
                        let s = p.iter().fold(0u64, |a, w| a.wrapping_add(sum(w)));
                        (t0.elapsed(), s)
                    })
                })
                .collect();
            barrier.wait();
            let mut worst = std::time::Duration::ZERO;
            let mut s = 0u64;
            for h in hs {
                let (d, x) = h.join().expect("bandwidth thread");
                worst = worst.max(d);
                s = s.wrapping_add(x);
            }
            (worst, s)
        });
        check = check.wrapping_add(s);
        results.push(bytes as f64 / elapsed.as_secs_f64().max(1e-9));
    }
    std::hint::black_box(check);
    results
}

/// Read bandwidth over existing memory: `regions` (e.g. the model's decode weights, as
/// mapped) split into `threads` parts of equal bytes, read together as in [`measure`],
/// best of `passes`. Bytes outside 8-byte alignment at region edges are skipped.
pub fn measure_regions(regions: &[&[u8]], threads: usize, passes: usize) -> Bandwidth {
    let threads = threads.max(1);
    let words: Vec<&[u64]> = regions
        .iter()
        // SAFETY: u64 has no invalid bit patterns; align_to yields only aligned words.
        .map(|r| unsafe { r.align_to::<u64>().1 })
        .filter(|w| !w.is_empty())
        .collect();
    let total: usize = words.iter().map(|w| w.len()).sum();
    // Part `t`: words `t·total/threads .. (t+1)·total/threads` of the concatenation.
    let part_of = |t: usize| -> Vec<&[u64]> {
        let (lo, hi) = (t * total / threads, (t + 1) * total / threads);
        let mut out = Vec::new();
        let mut at = 0usize;
        for w in &words {
            let (s, e) = (at.max(lo), (at + w.len()).min(hi));
            if s < e {
                out.push(&w[s - at..e - at]);
            }
            at += w.len();
        }
        out
    };
    let parts: Vec<Vec<&[u64]>> = (0..threads).map(part_of).collect();
    let results = run_passes(&parts, passes);
    Bandwidth {
        best_bytes_per_s: results.iter().copied().fold(0.0, f64::max),
        passes: results,
        buffer_bytes: total * 8,
        threads,
        huge_pages_advised: false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_matches_naive() {
        let v: Vec<u64> = (0..1003u64).map(|i| i * 7 + 1).collect();
        let naive = v.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        assert_eq!(super::sum(&v), naive);
    }

    #[test]
    fn regions_are_read_whole_whatever_the_split() {
        let a: Vec<u64> = (0..1000).collect();
        let b: Vec<u64> = (0..37).collect();
        let bytes =
            |v: &[u64]| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) };
        for threads in [1, 2, 3, 7] {
            let m = super::measure_regions(&[bytes(&a), bytes(&b)], threads, 1);
            assert_eq!(m.buffer_bytes, (1000 + 37) * 8, "{threads} threads");
            assert!(m.best_bytes_per_s > 0.0);
        }
    }

    #[test]
    fn small_measurement_runs() {
        let b = super::measure(8 << 20, 2, 2).unwrap();
        assert_eq!(b.passes.len(), 2);
        assert!(b.best_bytes_per_s > 0.0);
    }
}
