//! Attention's row kernels: query rows against keys, and probabilities times values, with
//! keys and values in f32 or f16 ([`KvElem`]), summed in an order independent of tiling.

use super::{isa, Isa};
use crate::quant::blocks::f16_to_f32;

#[cfg(target_arch = "aarch64")]
use super::neon;
#[cfg(target_arch = "x86_64")]
use super::{attn512, avx2};

/// Reference for `dot_f32_rows`.
pub fn dot_f32_rows_scalar<E: KvElem>(q: &[&[f32]], k: &[&[E]], out: &mut [f32], stride: usize) {
    for (r, qr) in q.iter().enumerate() {
        for (j, kj) in k.iter().enumerate() {
            out[r * stride + j] = qr.iter().zip(kj.iter()).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

/// Keys and values as attention's kernels read them: f32, or f16 bits (`u16`) widened
/// in the registers, exactly, so both give the same bits for the same values.
pub trait KvElem: Copy + Sync {
    /// Whether the bits are IEEE half.
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const F16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    const F16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self)
    }
}

/// Reference for `axpy_f32_rows`.
pub fn axpy_f32_rows_scalar<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
) {
    let n = acc.len() / scale.len();
    for (r, (row, &s)) in acc.chunks_exact_mut(n).zip(scale).enumerate() {
        for (i, a) in row.iter_mut().enumerate() {
            let mut x = *a * s;
            for (j, vj) in v.iter().enumerate() {
                x += p[r * stride + j] * vj[i].to_f32();
            }
            *a = x;
        }
    }
}

/// `out[r·stride + j] = q[r] · k[j]` for 1 to 4 query rows and any number of keys (the
/// score block of tiled attention; keys f32 or f16, see [`KvElem`]). Each pair is summed
/// in an order that depends on neither the number of rows nor the number of keys in the
/// call, so a query's scores do not depend on how queries and keys were tiled (prefill
/// and decode agree bit for bit). With `then` (the slices read next: the same keys'
/// values), the x86 kernels request the keys one group ahead and `then`'s lines as they
/// read the keys; `None` where they are in cache already.
pub fn dot_f32_rows<E: KvElem>(
    q: &[&[f32]],
    k: &[&[E]],
    then: Option<&[&[E]]>,
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    macro_rules! rows {
        ($m:ident, $k:literal) => {
            match q.len() {
                1 => $m::dot_f32_rows::<1, $k, E>([q[0]], k, then, out, stride),
                2 => $m::dot_f32_rows::<2, $k, E>([q[0], q[1]], k, then, out, stride),
                3 => $m::dot_f32_rows::<3, $k, E>([q[0], q[1], q[2]], k, then, out, stride),
                4 => $m::dot_f32_rows::<4, $k, E>([q[0], q[1], q[2], q[3]], k, then, out, stride),
                n => panic!("dot_f32_rows: {n} rows (1 to 4)"),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // 32 vector registers: 4×4 accumulators of 16 lanes fit.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(attn512, 4) },
        // 32 registers: 4×4 accumulators fit.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { rows!(neon, 4) },
        _ => dot_f32_rows_scalar(q, k, out, stride),
    }
}

/// `acc[r] = acc[r]·scale[r] + Σ_j p[r·stride + j]·v[j]` for 1 to 4 rows of `acc` (each
/// `acc.len() / rows` long): tiled attention's rescaled weighted sum of values. Per
/// element the operations are the same (a multiply, then one fused multiply-add per key
/// in key order) whatever the number of rows, for the same reason as `dot_f32_rows`.
pub fn axpy_f32_rows<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
) {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    macro_rules! rows {
        ($m:ident, $w:literal) => {
            match *scale {
                [a] => $m::axpy_f32_rows::<1, $w, E>(p, stride, v, [a], acc),
                [a, b] => $m::axpy_f32_rows::<2, $w, E>(p, stride, v, [a, b], acc),
                [a, b, c] => $m::axpy_f32_rows::<3, $w, E>(p, stride, v, [a, b, c], acc),
                [a, b, c, d] => $m::axpy_f32_rows::<4, $w, E>(p, stride, v, [a, b, c, d], acc),
                _ => panic!("axpy_f32_rows: {} rows (1 to 4)", scale.len()),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // 32 registers: 4 rows × 64 columns of accumulators.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(attn512, 4) },
        // 32 registers: 4 rows × 16 columns of accumulators.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { rows!(neon, 4) },
        _ => axpy_f32_rows_scalar(p, stride, v, scale, acc),
    }
}

/// A score after its lanes' sum `s`: the elements `from..` past a kernel's last whole
/// register, added in order (every tier's `dot_f32_rows`).
#[inline(always)]
pub(super) fn dot_rest<E: KvElem>(mut s: f32, q: &[f32], k: &[E], from: usize) -> f32 {
    for (a, b) in q[from..].iter().zip(&k[from..]) {
        s += a * b.to_f32();
    }
    s
}

/// Columns `from..` of `axpy_f32_rows` (`acc` holds `scale.len()` rows), past a kernel's
/// last whole register: the registers' operations per element, a multiply by the rescale
/// then one fused multiply-add per key in key order, so the same bits.
#[inline(always)]
pub(super) fn axpy_rows_rest<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
    from: usize,
) {
    let n = acc.len() / scale.len();
    if n == 0 {
        return;
    }
    for (r, (row, &s)) in acc.chunks_exact_mut(n).zip(scale).enumerate() {
        for (e, a) in row.iter_mut().enumerate().skip(from) {
            let mut x = *a * s;
            for (j, vj) in v.iter().enumerate() {
                x = p[r * stride + j].mul_add(vj[e].to_f32(), x);
            }
            *a = x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    fn rel(a: f32, b: f32) -> f32 {
        (a - b).abs() / b.abs().max(1.0)
    }

    /// f16 keys and values read in place give the bits of the same values widened first.
    #[test]
    fn attention_row_kernels_read_f16_as_widened() {
        for &n in &[256usize, 37, 3] {
            let q: Vec<Vec<f32>> = (0..4).map(|i| data(n, 50 + i)).collect();
            let qs: Vec<&[f32]> = q.iter().map(|x| &x[..]).collect();
            let h: Vec<Vec<u16>> = (0..7)
                .map(|i| {
                    data(n, 60 + i)
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_bits())
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = h
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|&b| half::f16::from_bits(b).to_f32())
                        .collect()
                })
                .collect();
            let (hs, ws): (Vec<&[u16]>, Vec<&[f32]>) = (
                h.iter().map(|x| &x[..]).collect(),
                w.iter().map(|x| &x[..]).collect(),
            );
            let stride = 9;
            for rows in 1..=4 {
                for nk in [1usize, 3, 7] {
                    let (mut a, mut b) = (vec![0.0; 4 * stride], vec![0.0; 4 * stride]);
                    dot_f32_rows(&qs[..rows], &hs[..nk], None, &mut a, stride);
                    dot_f32_rows(&qs[..rows], &ws[..nk], Some(&ws[..nk]), &mut b, stride);
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                    let p = data(4 * stride, 70 + nk as u64);
                    let scale = [0.5f32, 1.0, 0.25, 2.0];
                    let (mut a, mut b) = (data(rows * n, 80), data(rows * n, 80));
                    axpy_f32_rows(&p, stride, &hs[..nk], &scale[..rows], &mut a);
                    axpy_f32_rows(&p, stride, &ws[..nk], &scale[..rows], &mut b);
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "n {n} rows {rows} nk {nk}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_row_kernels_match_scalar_and_ignore_grouping() {
        for &n in &[256usize, 40, 37, 8, 3] {
            let q: Vec<Vec<f32>> = (0..4).map(|i| data(n, 10 + i)).collect();
            let kv: Vec<Vec<f32>> = (0..7).map(|i| data(n, 20 + i)).collect();
            let qs: Vec<&[f32]> = q.iter().map(|x| &x[..]).collect();
            let ks: Vec<&[f32]> = kv.iter().map(|x| &x[..]).collect();
            let stride = 9;
            for rows in 1..=4 {
                for nk in [1usize, 2, 3, 7] {
                    let mut got = vec![0.0; 4 * stride];
                    let mut want = vec![0.0; 4 * stride];
                    dot_f32_rows(&qs[..rows], &ks[..nk], Some(&ks[..nk]), &mut got, stride);
                    dot_f32_rows_scalar(&qs[..rows], &ks[..nk], &mut want, stride);
                    for r in 0..rows {
                        for j in 0..nk {
                            let (g, w) = (got[r * stride + j], want[r * stride + j]);
                            assert!(rel(g, w) < 1e-5, "n {n} rows {rows} nk {nk}: {g} vs {w}");
                            // One row and one key alone give the same bits.
                            let mut one = [0.0f32];
                            dot_f32_rows(&qs[r..r + 1], &ks[j..j + 1], None, &mut one, 1);
                            assert_eq!(one[0].to_bits(), g.to_bits());
                        }
                    }

                    let p = data(4 * stride, 30 + nk as u64);
                    let scale = [0.5f32, 1.0, 0.25, 2.0];
                    let acc0 = data(rows * n, 40);
                    let mut got = acc0.clone();
                    let mut want = acc0.clone();
                    axpy_f32_rows(&p, stride, &ks[..nk], &scale[..rows], &mut got);
                    axpy_f32_rows_scalar(&p, stride, &ks[..nk], &scale[..rows], &mut want);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(rel(*g, *w) < 1e-5, "n {n} rows {rows} nk {nk}: {g} vs {w}");
                    }
                    // The AVX2 tier explicitly (this CPU may dispatch to AVX-512).
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && rows == 4
                    {
                        let mut a = acc0.clone();
                        let mut d = vec![0.0; 4 * stride];
                        // SAFETY: features checked above.
                        unsafe {
                            avx2::axpy_f32_rows::<4, 2, f32>(&p, stride, &ks[..nk], scale, &mut a);
                            avx2::dot_f32_rows::<4, 2, f32>(
                                [qs[0], qs[1], qs[2], qs[3]],
                                &ks[..nk],
                                Some(&ks[..nk]),
                                &mut d,
                                stride,
                            );
                        }
                        assert!(a.iter().zip(&want).all(|(g, w)| rel(*g, *w) < 1e-5));
                        // The AVX-512 value kernel computes each element as this one does.
                        if isa() != Isa::Scalar {
                            assert!(a.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()));
                        }
                        let mut dw = vec![0.0; 4 * stride];
                        dot_f32_rows_scalar(&qs[..4], &ks[..nk], &mut dw, stride);
                        assert!(d.iter().zip(&dw).all(|(g, w)| rel(*g, *w) < 1e-5));
                    }
                    for r in 0..rows {
                        let mut one = acc0[r * n..(r + 1) * n].to_vec();
                        axpy_f32_rows(
                            &p[r * stride..],
                            stride,
                            &ks[..nk],
                            &scale[r..r + 1],
                            &mut one,
                        );
                        assert!(one
                            .iter()
                            .zip(&got[r * n..(r + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()));
                    }
                }
            }
        }
    }
}
