//! Products: `Matrix::matmul` quantizes the activations once, splits rows over the
//! thread pool and picks the kernel for the storage (packed x16, ggml blocks, bf16).

use std::ops::Range;

use super::{dot_f16, dot_f32, Data, Matrix};
use crate::quant::activations::quantize_q8_0_fast;
use crate::quant::blocks::*;
use crate::quant::kernels;
use crate::quant::kernels_bf16;
use crate::quant::packed::{self, PackedW, PackedX, XMeta};
use crate::quant::OutView;

/// Activations quantized once per product, shared read-only by the worker threads.
enum QuantizedX<'a> {
    None(&'a [f32]),
    /// Blocks and their per-token metadata (`quant::kernels::q8_0_meta`).
    Q8_0(&'a [BlockQ8_0], &'a [f32]),
    Q8K(&'a [BlockQ8K]),
    /// Q8_0 activations for packed weights.
    Packed(PackedX<'a>),
}

/// Per-thread scratch reused across products so the decode loop does not allocate.
#[derive(Default)]
struct MatScratch {
    q8: Vec<BlockQ8_0>,
    q8_sums: Vec<f32>,
    q8k: Vec<BlockQ8K>,
    xmeta: Vec<XMeta>,
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

impl Matrix {
    /// `y[t, r] = Σ_c W[r, c] · x[t, c]` for `t` tokens: `x` is `[t, cols]`, `y` is
    /// `[t, rows]`, both row-major. Activations are quantized once (for quantized
    /// weights); rows are split across the thread pool; each weight row is read once for
    /// all tokens.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), t * self.cols);
        debug_assert_eq!(y.len(), t * self.rows);
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let MatScratch {
                q8,
                q8_sums,
                q8k,
                xmeta,
            } = &mut *guard;
            let xq = match &self.data {
                Data::Packed(..) | Data::Q8_0(_) | Data::Q4_0(_) => {
                    let nb = self.cols / QK8_0;
                    q8.resize(t * nb, BlockQ8_0::default());
                    per_token(&mut q8[..], nb, x, self.cols, t, quantize_q8_0_fast);
                    if let Data::Packed(..) = self.data {
                        packed::prepare(q8, xmeta);
                        QuantizedX::Packed(PackedX {
                            blocks: &q8[..],
                            meta: &xmeta[..],
                            nbx: nb,
                        })
                    } else {
                        kernels::q8_0_meta(q8, nb, q8_sums);
                        QuantizedX::Q8_0(&q8[..], &q8_sums[..])
                    }
                }
                Data::Q4K(_) => {
                    let nb = self.cols / QK_K;
                    q8k.resize(t * nb, BlockQ8K::default());
                    per_token(&mut q8k[..], nb, x, self.cols, t, quantize_q8_k);
                    QuantizedX::Q8K(&q8k[..])
                }
                _ => QuantizedX::None(x),
            };
            self.matmul_prepared(&xq, t, y);
        });
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
    /// `rows.start` on, and every task owns its `rows` for all tokens, so tasks write
    /// disjoint elements. Row ranges are whole multiples of `group` except at the end.
    ///
    /// Decode: contiguous row ranges, a little finer than one per thread so a
    /// descheduled thread does not hold everyone up. Prefill: chunks of at most 16 rows
    /// (their weights stay in L1/L2) against tiles of 32 tokens (their activations stay
    /// in L2), written straight into `y`.
    fn schedule<F>(&self, t: usize, y: &mut [f32], serial: bool, group: usize, tile: F)
    where
        F: Fn(Range<usize>, Range<usize>, OutView) + Sync,
    {
        const TOKEN_TILE: usize = 32;
        assert!(y.len() >= t * self.rows, "matmul: output too short"); // ok: internal contract
        let rows = self.rows;
        let threads = crate::par::threads().max(1);
        let rows_per = if t == 1 {
            rows.div_ceil(threads * 4).max(16).next_multiple_of(group)
        } else {
            (rows / (threads * 8)).clamp(group, 16) / group * group
        };
        let view = OutView {
            ptr: y.as_mut_ptr(),
            row_stride: 1,
            tok_stride: rows,
        };
        let task = |ci: usize| {
            let r0 = ci * rows_per;
            let r1 = (r0 + rows_per).min(rows);
            for t0 in (0..t).step_by(TOKEN_TILE) {
                tile(r0..r1, t0..(t0 + TOKEN_TILE).min(t), view.from_row(r0));
            }
        };
        let tasks = rows.div_ceil(rows_per);
        if serial {
            (0..tasks).for_each(task);
        } else {
            crate::par::for_each(tasks, task);
        }
    }

    fn matmul_prepared(&self, xq: &QuantizedX, t: usize, y: &mut [f32]) {
        let work = self.rows * self.cols * t;
        let serial = work < PAR_THRESHOLD || crate::par::threads() <= 1;
        // SAFETY (every `out.set` / `tile_into` below): `schedule` hands each task rows
        // of `y` that no other task writes, and the tiles write only their rows × tokens.
        if let (QuantizedX::Packed(x), Data::Packed(q, v)) = (xq, &self.data) {
            let bs = self.data.block();
            let w = PackedW {
                kind: *q,
                bytes: v.as_slice(),
                nbs: self.stride / bs,
                nb: self.cols / bs,
            };
            return self.schedule(t, y, serial, packed::ROWS, |rows, toks, out| unsafe {
                packed::tile_into(&w, rows, x, toks, out)
            });
        }
        if let (QuantizedX::None(x), Data::Bf16(v)) = (xq, &self.data) {
            if t > 1 && kernels::avx512_vnni() {
                let (w, c, st) = (v.as_slice(), self.cols, self.stride);
                let row = |r: usize| &w[r * st..r * st + c];
                let tok = |ti: usize| &x[ti * c..(ti + 1) * c];
                return self.schedule(t, y, serial, 4, |rows, toks, out| {
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
                });
            }
        }
        self.schedule(t, y, serial, 1, |rows, toks, out| {
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
        });
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

/// Quantizes each of the `t` activation rows of `x` (`cols` wide) into `nb` blocks of
/// `out`; in parallel over tokens for prefill.
fn per_token<B: Send>(
    out: &mut [B],
    nb: usize,
    x: &[f32],
    cols: usize,
    t: usize,
    f: impl Fn(&[f32], &mut [B]) + Sync,
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
            // Q4_K's ggml kernel quantizes activations per 256 (Q8_K), packed per 32;
            // the others see the same activations and differ by summation order only.
            let top = yq.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let tol = if q == QuantType::Q4K { 1e-2 } else { 1e-5 } * top;
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
