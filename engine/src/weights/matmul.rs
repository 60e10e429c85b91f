//! Products: `Matrix::matmul` quantizes the activations once, splits rows over the
//! thread pool and picks the kernel for the storage (packed x16, ggml blocks, bf16).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{dot_f16, dot_f32, Data, Matrix};
use crate::quant::activations::{quantize_q8_0_fast, quantize_q8_k_fast};
use crate::quant::blocks::*;
use crate::quant::kernels;
use crate::quant::kernels_bf16;
use crate::quant::packed::{self, PackedW, PackedX, XMeta, XSumsK};
use crate::quant::{OutView, QuantType};

/// Activations quantized once per product, shared read-only by the worker threads.
enum QuantizedX<'a> {
    None(&'a [f32]),
    /// Blocks and their per-token metadata (`quant::kernels::q8_0_meta`).
    Q8_0(&'a [BlockQ8_0], &'a [f32]),
    Q8K(&'a [BlockQ8K]),
    /// Q8_0 (Q8_K for Q4_K) activations for packed weights.
    Packed(PackedX<'a>),
}

/// Per-thread scratch reused across products so the decode loop does not allocate.
#[derive(Default)]
struct MatScratch {
    q8: Vec<BlockQ8_0>,
    q8_sums: Vec<f32>,
    q8k: Vec<BlockQ8K>,
    xmeta: Vec<XMeta>,
    ksums: Vec<XSumsK>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<MatScratch> = std::cell::RefCell::new(MatScratch::default());
}

/// Frees this thread's product scratch (sized by the largest prefill chunk it ran); the
/// next product allocates what it needs again.
pub fn release_thread_scratch() {
    SCRATCH.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            *s = MatScratch::default();
        }
    });
}

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_THRESHOLD: usize = 1 << 16;

/// Most row ranges of one fused decode product that take part in work stealing.
const MAX_RANGES: usize = 64;

/// Weight bytes a thread claims at a time from the front of its own range: small enough
/// that a range's unclaimed rest can be shared at the end, large enough that the claims
/// cost nothing next to the reads (128 KiB: ~4 µs of one core's stream).
const CLAIM_BYTES: usize = 128 << 10;

/// A range's claim word (`matrix << 58 | start << 29 | end`), alone on its cache line so
/// that the threads eating neighbouring ranges do not bounce one line between them. The
/// matrix travels in the word because a thread that steals a range publishes it again in
/// its own (emptied) word, possibly for another matrix than the one it started with.
#[repr(align(64))]
struct Claim(AtomicU64);

const ROW_BITS: u32 = 29;
const ROW_MASK: u64 = (1 << ROW_BITS) - 1;

fn pack_range(matrix: usize, a: usize, b: usize) -> u64 {
    ((matrix as u64) << (2 * ROW_BITS)) | ((a as u64) << ROW_BITS) | b as u64
}

/// `(matrix, start, end)` of a claim word.
fn unpack_range(w: u64) -> (usize, usize, usize) {
    (
        (w >> (2 * ROW_BITS)) as usize,
        ((w >> ROW_BITS) & ROW_MASK) as usize,
        (w & ROW_MASK) as usize,
    )
}

/// The next `chunk` rows (fewer at the end) from the front of a claim word's range.
fn claim_front(c: &AtomicU64, chunk: usize) -> Option<Range<usize>> {
    let mut w = c.load(Ordering::Relaxed);
    loop {
        let (m, a, b) = unpack_range(w);
        if a >= b {
            return None;
        }
        let e = (a + chunk).min(b);
        match c.compare_exchange_weak(w, pack_range(m, e, b), Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return Some(a..e),
            Err(x) => w = x,
        }
    }
}

/// The back half (at least one group of rows, starting on a group multiple; `group` of
/// the word's matrix) of a claim word's range, the whole rest when that is all there is,
/// with the matrix it belongs to.
fn claim_back(c: &AtomicU64, group: impl Fn(usize) -> usize) -> Option<(usize, Range<usize>)> {
    let mut w = c.load(Ordering::Relaxed);
    loop {
        let (m, a, b) = unpack_range(w);
        if a >= b {
            return None;
        }
        let g = group(m).max(1);
        let mid = (a + (b - a) / 2) / g * g;
        let s = if mid > a { mid } else { a };
        let nw = if s == a {
            pack_range(m, b, b)
        } else {
            pack_range(m, a, s)
        };
        match c.compare_exchange_weak(w, nw, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some((m, s..b)),
            Err(x) => w = x,
        }
    }
}

/// The first `n` elements of `v`, grown (never shrunk) to hold them: the products of one
/// decode step alternate between widths, and shrinking then regrowing zeroed the
/// activation buffers on every product.
fn grown<T: Clone>(v: &mut Vec<T>, n: usize, fill: T) -> &mut [T] {
    if v.len() < n {
        v.resize(n, fill);
    }
    &mut v[..n]
}

impl Matrix {
    /// `y[t, r] = Σ_c W[r, c] · x[t, c]` for `t` tokens: `x` is `[t, cols]`, `y` is
    /// `[t, rows]`, both row-major. Activations are quantized once (for quantized
    /// weights); rows are split across the thread pool; each weight row is read once for
    /// all tokens.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), t * self.cols);
        debug_assert_eq!(y.len(), t * self.rows);
        // A product is a fused job of one matrix: one place prepares and splits it.
        Self::matmul_many(&[self], x, t, &mut [y])
    }

    /// Products of several matrices with the same input (`ys[i] = mats[i] · x`), as one
    /// job for a decode step: the activations are quantized once and the row ranges of
    /// all the matrices go to the threads together, so the small ones (K, V, LAuReL)
    /// cost no fork/join of their own and one product's tail overlaps the next one's
    /// start. Put the largest first (the ranges are handed out in order). A prefill
    /// quantizes once and runs the products in turn; matrices whose storage wants
    /// different activations run one by one.
    pub fn matmul_many(mats: &[&Matrix], x: &[f32], t: usize, ys: &mut [&mut [f32]]) {
        const MAX: usize = 6;
        assert_eq!(mats.len(), ys.len(), "matmul_many: one output per matrix"); // ok: internal contract
        let shared = mats
            .iter()
            .all(|m| m.cols == mats[0].cols && m.activation_kind() == mats[0].activation_kind());
        if !shared || (t == 1 && mats.len() > MAX) {
            for (m, y) in mats.iter().zip(ys.iter_mut()) {
                Self::matmul_many(&[m], x, t, &mut [y]);
            }
            return;
        }
        if t != 1 {
            // A prefill: the activations are quantized once, the products run in turn.
            SCRATCH.with(|cell| {
                let mut guard = cell.borrow_mut();
                let xq = mats[0].prepare_x(x, t, &mut guard);
                for (m, y) in mats.iter().zip(ys.iter_mut()) {
                    debug_assert_eq!(y.len(), t * m.rows);
                    m.matmul_prepared(&xq, t, y);
                }
            });
            return;
        }
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let xq = mats[0].prepare_x(x, 1, &mut guard);
            let threads = crate::par::threads().max(1);
            let (mut rows_per, mut first) = ([0usize; MAX], [0usize; MAX + 1]);
            let (mut group, mut chunk) = ([0usize; MAX], [0usize; MAX]);
            let mut views = [None; MAX];
            let mut work = 0usize;
            // Row bounds must fit a claim word's 29 bits (no real matrix comes close).
            let mut too_tall = false;
            for (i, (m, y)) in mats.iter().zip(ys.iter_mut()).enumerate() {
                too_tall |= m.rows as u64 > ROW_MASK;
                assert!(y.len() >= m.rows, "matmul_many: output too short"); // ok: internal contract
                group[i] = m.tile_group(&xq, 1);
                rows_per[i] = m.decode_rows_per(threads, group[i]);
                chunk[i] = (CLAIM_BYTES / m.row_bytes().max(1))
                    .max(1)
                    .next_multiple_of(group[i]);
                first[i + 1] = first[i] + m.rows.div_ceil(rows_per[i]);
                views[i] = Some(OutView {
                    ptr: y.as_mut_ptr(),
                    row_stride: 1,
                    tok_stride: m.rows,
                });
                work += m.rows * m.cols;
            }
            let n = mats.len();
            let tasks = first[n];
            let mat_of = |k: usize| (0..n).rev().find(|&i| first[i] <= k).unwrap_or(0);
            // Task `k`: matrix `i` and the contiguous rows of its share.
            let task = |k: usize| {
                let i = mat_of(k);
                let r0 = (k - first[i]) * rows_per[i];
                (i, r0..(r0 + rows_per[i]).min(mats[i].rows))
            };
            let run = |i: usize, rows: Range<usize>| {
                if let Some(v) = views[i] {
                    // SAFETY: each row range of output `i` is handed out once (by the
                    // task counter or a range's claim word), and the outputs are distinct
                    // borrows.
                    unsafe { mats[i].tile(&xq, 1, rows.clone(), 0..1, v.at_row(rows.start)) };
                }
            };
            if work < PAR_THRESHOLD || threads <= 1 || tasks > MAX_RANGES || too_tall {
                (0..tasks).for_each(|k| {
                    let (i, rows) = task(k);
                    run(i, rows);
                });
                return;
            }
            // Each task is one thread's contiguous range, eaten from the front in chunks;
            // a thread that finds no task left takes the back half of the largest
            // remainder, so the threads end a product together instead of one waiting for
            // the other's range (a decode step has ~250 of them).
            let claims: [Claim; MAX_RANGES] = std::array::from_fn(|k| {
                let w = if k < tasks {
                    let (i, rows) = task(k);
                    pack_range(i, rows.start, rows.end)
                } else {
                    0
                };
                Claim(AtomicU64::new(w))
            });
            let next = AtomicUsize::new(0);
            crate::par::for_each(threads, |_| {
                // This thread's last range: empty once eaten, then where it publishes
                // what it steals, so that the other threads can steal from that in turn.
                let mut mine = None;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= tasks {
                        break;
                    }
                    mine = Some(k);
                    let i = mat_of(k);
                    while let Some(rows) = claim_front(&claims[k].0, chunk[i]) {
                        run(i, rows);
                    }
                }
                // Steal until every range is done.
                loop {
                    let left = |k: usize| {
                        let (_, a, b) = unpack_range(claims[k].0.load(Ordering::Relaxed));
                        b.saturating_sub(a)
                    };
                    let Some(k) = (0..tasks).max_by_key(|&k| left(k)).filter(|&k| left(k) > 0)
                    else {
                        break;
                    };
                    let Some((i, rows)) = claim_back(&claims[k].0, |i| group[i]) else {
                        continue;
                    };
                    match mine {
                        Some(m) => {
                            // Only this thread writes its emptied word.
                            claims[m]
                                .0
                                .store(pack_range(i, rows.start, rows.end), Ordering::Relaxed);
                            while let Some(rows) = claim_front(&claims[m].0, chunk[i]) {
                                run(i, rows);
                            }
                        }
                        None => run(i, rows),
                    }
                }
            });
        });
    }

    /// Which activation preparation the storage needs (equal for matrices that can share
    /// one in [`Matrix::matmul_many`]).
    fn activation_kind(&self) -> u8 {
        match &self.data {
            Data::Packed(QuantType::Q4K, _) => 4,
            Data::Packed(..) => 1,
            Data::Q8_0(_) | Data::Q4_0(_) => 2,
            Data::Q4K(_) => 3,
            _ => 0,
        }
    }

    /// The activations `x` (`t` tokens) in the form this storage's kernels take,
    /// quantized into `s`.
    fn prepare_x<'a>(&self, x: &'a [f32], t: usize, s: &'a mut MatScratch) -> QuantizedX<'a> {
        let MatScratch {
            q8,
            q8_sums,
            q8k,
            xmeta,
            ksums,
        } = s;
        {
            let xq = match &self.data {
                Data::Q4K(_) | Data::Packed(QuantType::Q4K, _) => {
                    let nb = self.cols / QK_K;
                    let q8k = grown(q8k, t * nb, BlockQ8K::default());
                    per_token(q8k, nb, x, self.cols, t, quantize_q8_k_fast);
                    if let Data::Packed(..) = self.data {
                        let ksums = grown(ksums, t * nb, XSumsK::default());
                        per_token(ksums, nb, q8k, nb, t, packed::prepare_k);
                        QuantizedX::Packed(PackedX {
                            blocks: &[],
                            meta: &[],
                            kblocks: q8k,
                            ksums,
                            nbx: nb,
                        })
                    } else {
                        QuantizedX::Q8K(q8k)
                    }
                }
                Data::Packed(..) | Data::Q8_0(_) | Data::Q4_0(_) => {
                    let nb = self.cols / QK8_0;
                    let q8 = grown(q8, t * nb, BlockQ8_0::default());
                    per_token(q8, nb, x, self.cols, t, quantize_q8_0_fast);
                    if let Data::Packed(..) = self.data {
                        let xmeta = grown(xmeta, t * nb, XMeta::default());
                        per_token(xmeta, nb, q8, nb, t, packed::prepare);
                        QuantizedX::Packed(PackedX {
                            blocks: q8,
                            meta: xmeta,
                            kblocks: &[],
                            ksums: &[],
                            nbx: nb,
                        })
                    } else {
                        kernels::q8_0_meta(q8, nb, q8_sums);
                        QuantizedX::Q8_0(q8, &q8_sums[..])
                    }
                }
                _ => QuantizedX::None(x),
            };
            xq
        }
    }

    /// Row `r` against tokens `t0..t0+4` (one weight pass for four tokens), if the
    /// storage has a four-token kernel.
    #[inline]
    fn row_dot_x4(&self, r: usize, x: &QuantizedX, t0: usize) -> Option<[f32; 4]> {
        let s = r * self.stride;
        let bs = self.data.block();
        let (b0, nb) = (s / bs, self.cols / bs);
        let c = self.cols;
        Some(match (&self.data, x) {
            (Data::Bf16(v), QuantizedX::None(x)) => kernels::dot_bf16_x4(
                &v.as_slice()[s..s + c],
                [0, 1, 2, 3].map(|i| &x[(t0 + i) * c..(t0 + i + 1) * c]),
            ),
            (Data::Q8_0(v), QuantizedX::Q8_0(x, m)) => kernels::dot_q8_0_x4(
                &v.as_slice()[b0..b0 + nb],
                [0, 1, 2, 3].map(|i| &x[(t0 + i) * nb..(t0 + i + 1) * nb]),
                [0, 1, 2, 3].map(|i| &m[2 * (t0 + i) * nb..2 * (t0 + i + 1) * nb]),
            ),
            (Data::Q4_0(v), QuantizedX::Q8_0(x, m)) => kernels::dot_q4_0_x4(
                &v.as_slice()[b0..b0 + nb],
                [0, 1, 2, 3].map(|i| &x[(t0 + i) * nb..(t0 + i + 1) * nb]),
                [0, 1, 2, 3].map(|i| &m[2 * (t0 + i) * nb..2 * (t0 + i + 1) * nb]),
            ),
            (Data::Q4K(v), QuantizedX::Q8K(x)) => kernels::dot_q4_k_x4(
                &v.as_slice()[b0..b0 + nb],
                [0, 1, 2, 3].map(|i| &x[(t0 + i) * nb..(t0 + i + 1) * nb]),
            ),
            _ => return None,
        })
    }

    /// Splits a product over the threads. `tile(rows, toks, out)` writes row `r` · token
    /// `tok` as `out.set(r - rows.start, tok, v)`; `out` views `y` (`[t, rows]`) from
    /// `rows.start` on, and every task owns its `rows` × `toks`, so tasks write disjoint
    /// elements. Row ranges are whole multiples of `group` except at the end.
    ///
    /// Prefills (decode products go through `matmul_many`): a task is a chunk of at most
    /// 128 rows against a tile of 64 tokens, written straight into `y`. Both stay in L2
    /// (Q4_0 2048 wide: 147 KB of weights, 205 KB of activations), where 16-row tasks
    /// over all tokens read every token's activations again for every 16 rows. E2B Q4_0
    /// prefill: +3.5% (median of 8 interleaved pairs in one process); 32 or 128 tokens,
    /// 64 or 256 rows measured the same.
    fn schedule<F>(&self, t: usize, y: &mut [f32], serial: bool, group: usize, tile: F)
    where
        F: Fn(Range<usize>, Range<usize>, OutView) + Sync,
    {
        const TOKEN_TILE: usize = 64;
        const MAX_ROWS: usize = 128;
        assert!(y.len() >= t * self.rows, "matmul: output too short"); // ok: internal contract
        let rows = self.rows;
        let threads = crate::par::threads().max(1);
        let rows_per = (rows / (threads * 4)).clamp(group, MAX_ROWS) / group * group;
        let view = OutView {
            ptr: y.as_mut_ptr(),
            row_stride: 1,
            tok_stride: rows,
        };
        let tiles = t.div_ceil(TOKEN_TILE);
        let task = |k: usize| {
            let (ci, ti) = (k / tiles, k % tiles);
            let r0 = ci * rows_per;
            let r1 = (r0 + rows_per).min(rows);
            let t0 = ti * TOKEN_TILE;
            tile(r0..r1, t0..(t0 + TOKEN_TILE).min(t), view.at_row(r0));
        };
        let tasks = rows.div_ceil(rows_per) * tiles;
        if serial {
            (0..tasks).for_each(task);
        } else {
            crate::par::for_each(tasks, task);
        }
    }

    /// Rows per task of a decode product: one contiguous range per thread. Each extra
    /// split restarts a thread's stream elsewhere: measured on E2B Q4_0 decode, 4 ranges
    /// per thread were 3.4% slower than 1 (median of 12 interleaved pairs in one
    /// process). The pool's workers spin, so the ranges start together.
    fn decode_rows_per(&self, threads: usize, group: usize) -> usize {
        self.rows.div_ceil(threads).max(16).next_multiple_of(group)
    }

    /// The row multiple that [`Matrix::tile`] wants for these activations.
    fn tile_group(&self, xq: &QuantizedX, t: usize) -> usize {
        match (xq, &self.data) {
            (QuantizedX::Packed(_), Data::Packed(..)) => packed::ROWS,
            (QuantizedX::None(_), Data::Bf16(_)) if t > 1 && kernels::avx512_vnni() => 4,
            _ => 1,
        }
    }

    fn matmul_prepared(&self, xq: &QuantizedX, t: usize, y: &mut [f32]) {
        let work = self.rows * self.cols * t;
        let serial = work < PAR_THRESHOLD || crate::par::threads() <= 1;
        let group = self.tile_group(xq, t);
        // SAFETY: `schedule` hands each task rows of `y` that no other task writes, and
        // `tile` writes only its rows × tokens.
        self.schedule(t, y, serial, group, |rows, toks, out| unsafe {
            self.tile(xq, t, rows, toks, out)
        });
    }

    /// Rows `rows` (a multiple of `tile_group` from its start) of the product with
    /// tokens `toks` of a `t`-token `xq`, into `out` (row `rows.start` first).
    ///
    /// # Safety
    /// `out` must address, for every row and token of the tile, memory that the caller
    /// owns exclusively for the duration of the call.
    unsafe fn tile(
        &self,
        xq: &QuantizedX,
        t: usize,
        rows: Range<usize>,
        toks: Range<usize>,
        out: OutView,
    ) {
        if let (QuantizedX::Packed(x), Data::Packed(q, v)) = (xq, &self.data) {
            let bs = self.data.block();
            let w = PackedW {
                kind: *q,
                bytes: v.as_slice(),
                nbs: self.stride / bs,
                nb: self.cols / bs,
            };
            // SAFETY: the caller's contract.
            return unsafe { packed::tile_into(&w, rows, x, toks, out) };
        }
        if let (QuantizedX::None(x), Data::Bf16(v)) = (xq, &self.data) {
            if self.tile_group(xq, t) == 4 {
                let (w, c, st) = (v.as_slice(), self.cols, self.stride);
                let row = |r: usize| &w[r * st..r * st + c];
                let tok = |ti: usize| &x[ti * c..(ti + 1) * c];
                {
                    let mut r = rows.start;
                    while r < rows.end {
                        let nr = (rows.end - r).min(4);
                        let ri = r - rows.start;
                        let mut ti = toks.start;
                        if nr == 4 {
                            let ws = [0, 1, 2, 3].map(|i| row(r + i));
                            while ti + 4 <= toks.end {
                                let res = kernels_bf16::dot_bf16_4x4(
                                    ws,
                                    [0, 1, 2, 3].map(|j| tok(ti + j)),
                                );
                                for (i, res) in res.iter().enumerate() {
                                    for (j, &v) in res.iter().enumerate() {
                                        unsafe { out.set(ri + i, ti + j, v) };
                                    }
                                }
                                ti += 4;
                            }
                        }
                        // Ragged rows and tokens: the one-row kernel (same bits).
                        for i in 0..nr {
                            for tj in ti..toks.end {
                                let v = kernels::dot_bf16(row(r + i), tok(tj));
                                unsafe { out.set(ri + i, tj, v) };
                            }
                        }
                        r += nr;
                    }
                }
                return;
            }
        }
        for r in rows.clone() {
            let ri = r - rows.start;
            let mut ti = toks.start;
            while ti + 4 <= toks.end {
                let Some(v) = self.row_dot_x4(r, xq, ti) else {
                    break;
                };
                for (j, &v) in v.iter().enumerate() {
                    unsafe { out.set(ri, ti + j, v) };
                }
                ti += 4;
            }
            for tj in ti..toks.end {
                unsafe { out.set(ri, tj, self.row_dot_q(r, xq, tj)) };
            }
        }
    }

    /// Row `r` times token `t` of the prepared activations.
    #[inline]
    fn row_dot_q(&self, r: usize, x: &QuantizedX, t: usize) -> f32 {
        let s = r * self.stride;
        let bs = self.data.block();
        let (b0, nb) = (s / bs, self.cols / bs);
        match (&self.data, x) {
            (Data::F32(v), QuantizedX::None(x)) => dot_f32(
                &v.as_slice()[s..s + self.cols],
                &x[t * self.cols..(t + 1) * self.cols],
            ),
            (Data::Bf16(v), QuantizedX::None(x)) => kernels::dot_bf16(
                &v.as_slice()[s..s + self.cols],
                &x[t * self.cols..(t + 1) * self.cols],
            ),
            (Data::F16(v), QuantizedX::None(x)) => dot_f16(
                &v.as_slice()[s..s + self.cols],
                &x[t * self.cols..(t + 1) * self.cols],
            ),
            (Data::Q8_0(v), QuantizedX::Q8_0(x, m)) => kernels::dot_q8_0(
                &v.as_slice()[b0..b0 + nb],
                &x[t * nb..(t + 1) * nb],
                &m[2 * t * nb..2 * (t + 1) * nb],
            ),
            (Data::Q4_0(v), QuantizedX::Q8_0(x, m)) => kernels::dot_q4_0(
                &v.as_slice()[b0..b0 + nb],
                &x[t * nb..(t + 1) * nb],
                &m[2 * t * nb..2 * (t + 1) * nb],
            ),
            (Data::Q4K(v), QuantizedX::Q8K(x)) => {
                kernels::dot_q4_k(&v.as_slice()[b0..b0 + nb], &x[t * nb..(t + 1) * nb])
            }
            _ => 0.0, // unreachable: matmul prepares the activation type the data needs
        }
    }
}

/// `f(row, out row)` for each of the `t` rows of `x` (`cols` wide) and of `out` (`nb`
/// wide): activation quantization and its per-block sums; in parallel over tokens for
/// prefill.
fn per_token<A: Sync, B: Send>(
    out: &mut [B],
    nb: usize,
    x: &[A],
    cols: usize,
    t: usize,
    f: impl Fn(&[A], &mut [B]) + Sync,
) {
    if t >= 8 && crate::par::threads() > 1 {
        crate::par::chunks_mut(&mut out[..t * nb], nb, |i, o| {
            f(&x[i * cols..(i + 1) * cols], o)
        });
    } else {
        for (o, xr) in out.chunks_mut(nb).zip(x.chunks(cols)).take(t) {
            f(xr, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;
    use crate::weights::{bf16_to_f32, Slab};

    /// Front claims, back-half steals and two racing threads hand out each row once.
    #[test]
    fn claims_hand_out_every_row_once_and_steals_start_on_a_group() {
        // One thread alternating front and back claims, then two threads racing.
        let (r0, r1, group) = (32usize, 32 + 16 * 37 + 5, 16usize);
        let c = Claim(AtomicU64::new(pack_range(0, r0, r1)));
        let mut seen = vec![0u8; r1];
        let mut turn = 0;
        loop {
            let got = if turn % 3 == 2 {
                claim_back(&c.0, |_| group).map(|(m, r)| {
                    assert_eq!(m, 0);
                    r
                })
            } else {
                claim_front(&c.0, 3 * group)
            };
            let Some(rows) = got else { break };
            assert!(
                rows.start.is_multiple_of(group) && !rows.is_empty(),
                "{rows:?}"
            );
            rows.for_each(|r| seen[r] += 1);
            turn += 1;
        }
        assert!(claim_front(&c.0, group).is_none() && claim_back(&c.0, |_| group).is_none());
        assert!(seen[..r0].iter().all(|&n| n == 0) && seen[r0..].iter().all(|&n| n == 1));

        let c = Claim(AtomicU64::new(pack_range(5, 0, 16 * 4000)));
        let counts: Vec<AtomicUsize> = (0..16 * 4000).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for back in [false, true] {
                let (c, counts) = (&c, &counts);
                s.spawn(move || loop {
                    let got = if back {
                        claim_back(&c.0, |m| if m == 5 { 16 } else { 1 }).map(|(_, r)| r)
                    } else {
                        claim_front(&c.0, 16)
                    };
                    let Some(rows) = got else { break };
                    rows.for_each(|r| {
                        counts[r].fetch_add(1, Ordering::Relaxed);
                    });
                });
            }
        });
        assert!(counts.iter().all(|n| n.load(Ordering::Relaxed) == 1));
    }

    /// A fused product gives each matrix exactly what its own product gives, on the
    /// spinning pool and on rayon's, for every storage (mixed storages fall back).
    #[test]
    fn matmul_many_matches_one_product_per_matrix() {
        let spin = crate::par::SpinPool::new(2).unwrap();
        let cols = 512;
        let shapes = [300usize, 64, 64, 16, 7];
        let x = crate::test_util::data(3 * cols, 5);
        for q in QuantType::ALL {
            for pack in [false, true] {
                let mats: Vec<Matrix> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        let m =
                            Matrix::from_f32(r, cols, crate::test_util::data(r * cols, i as u64))
                                .to_quant(q);
                        // The 7-row matrix cannot be packed: a mixed set falls back.
                        if pack && r % packed::ROWS == 0 {
                            m.packed()
                        } else {
                            m
                        }
                    })
                    .collect();
                let refs: Vec<&Matrix> = mats.iter().collect();
                for t in [1usize, 3] {
                    let xs = &x[..t * cols];
                    let want: Vec<Vec<f32>> = mats
                        .iter()
                        .map(|m| {
                            let mut y = vec![0.0; t * m.rows];
                            m.matmul(xs, t, &mut y);
                            y
                        })
                        .collect();
                    for on_spin in [false, true] {
                        for n in [1, 2, mats.len()] {
                            let mut ys: Vec<Vec<f32>> = mats[..n]
                                .iter()
                                .map(|m| vec![f32::NAN; t * m.rows])
                                .collect();
                            let mut outs: Vec<&mut [f32]> =
                                ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                            let mut run = || Matrix::matmul_many(&refs[..n], xs, t, &mut outs);
                            if on_spin {
                                crate::par::install(&spin, run);
                            } else {
                                run();
                            }
                            assert_eq!(ys, want[..n], "{q} packed={pack} t={t} n={n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn schedule_writes_every_row_and_token_token_major_serial_and_parallel() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let value = |r: usize, ti: usize| (r * 1000 + ti) as f32 * 0.5 - 3.0;
        for (rows, t) in [(1, 1), (5, 3), (37, 16), (33, 41), (7, 100)] {
            let m = Matrix::from_f32(rows, 1, vec![0.0; rows]);
            for serial in [true, false] {
                for group in [1, 4, 16] {
                    let mut y = vec![f32::NAN; rows * t];
                    pool.install(|| {
                        m.schedule(t, &mut y, serial, group, |rs, toks, out| {
                            for r in rs.clone() {
                                for ti in toks.clone() {
                                    // SAFETY: the tile's own rows and tokens.
                                    unsafe { out.set(r - rs.start, ti, value(r, ti)) };
                                }
                            }
                        })
                    });
                    for r in 0..rows {
                        for ti in 0..t {
                            assert_eq!(
                                y[ti * rows + r],
                                value(r, ti),
                                "{rows}x{t} {serial} group {group}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0.0; t * rows];
        for ti in 0..t {
            for r in 0..rows {
                let mut s = 0.0f64;
                for c in 0..cols {
                    s += w[r * cols + c] as f64 * x[ti * cols + c] as f64;
                }
                y[ti * rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matmul_matches_scalar_reference_on_odd_shapes() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(rows, cols, t) in &[
            (1, 1, 1),
            (3, 17, 1),
            (67, 33, 5),
            (300, 257, 3),
            (129, 1000, 1),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let x: Vec<f32> = (0..t * cols).map(|_| rnd()).collect();
            let want = reference(&w, rows, cols, &x, t);
            let m = Matrix::from_f32(rows, cols, w.clone());
            let mut y = vec![0.0; t * rows];
            m.matmul(&x, t, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{rows}x{cols} t={t}: {a} vs {b}");
            }
            // bf16 storage of the same values rounded to bf16
            let wb: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let wr: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            let want = reference(&wr, rows, cols, &x, t);
            let m = Matrix {
                rows,
                cols,
                stride: cols,
                data: Data::Bf16(Slab::Owned(wb.into())),
            };
            m.matmul(&x, t, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "bf16 {rows}x{cols} t={t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn packed_products_match_ggml_layout_and_decode_matches_prefill() {
        if !packed::enabled() {
            eprintln!("packing is off on this CPU; skipped");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (rows, cols, t) = (80, 512, 13);
        let w = crate::test_util::data(rows * cols, 11);
        let x = crate::test_util::data(t * cols, 12);
        for q in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4K] {
            let plain = Matrix::from_f32(rows, cols, w.clone()).to_quant(q);
            let packed = plain.packed();
            assert!(matches!(packed.data(), Data::Packed(..)), "{q} not packed");
            let (mut yp, mut yq) = (vec![0.0; t * rows], vec![0.0; t * rows]);
            pool.install(|| {
                packed.matmul(&x, t, &mut yp);
                plain.matmul(&x, t, &mut yq);
            });
            // Both see the same activations and differ by summation order only.
            let top = yq.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let tol = 1e-5 * top;
            for (i, (a, b)) in yp.iter().zip(&yq).enumerate() {
                assert!((a - b).abs() <= tol, "{q} [{i}]: {a} vs {b} (max {top})");
            }
            for k in 0..t {
                let mut y1 = vec![0.0; rows];
                pool.install(|| packed.matmul(&x[k * cols..(k + 1) * cols], 1, &mut y1));
                assert_eq!(y1, yp[k * rows..(k + 1) * rows], "{q} token {k}");
            }
        }
    }
}
