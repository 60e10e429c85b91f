//! The aarch64 NEON products over packed row groups (ARM64 boards): a row group is four
//! 128-bit quarters of 4 row lanes, and one 16-byte load holds 4 quant bytes of each of
//! a quarter's rows, which is the operand of `sdot` (the dot-product extension,
//! Cortex-A55/A76 and later). CPUs without it (Cortex-A53/A72) take the same sums from
//! widening multiplies and pairwise adds. The integer sums are the x86 paths' integers
//! (Q8_0 weights meet the activations signed, with no offset to remove) and the float
//! steps the same fused operations in the same order, so every path gives the same bits.

use std::arch::aarch64::*;
use std::arch::asm;

use super::*;
use crate::quant::kernels::neon::f16x4;

/// Tokens one pass keeps in registers (32 vector registers: four accumulators per token,
/// a quarter's unpacked weights, the activations and temporaries).
const TOKENS: usize = 4;

/// `acc[r] += Σ_i w[4r + i] · a[4L + i]` for the 4 row lanes of `w` (signed bytes).
#[inline(always)]
unsafe fn dot_lane<const DOT: bool, const L: i32>(
    acc: int32x4_t,
    w: int8x16_t,
    a: int8x16_t,
) -> int32x4_t {
    if DOT {
        let mut acc = acc;
        // SAFETY: only reached from `group::<true>`, which runs where the CPU has the
        // dot-product extension (`runs_here`); the directive lets the assembler accept
        // the instruction whatever the function's target features.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                a = in(vreg) a,
                l = const L,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    } else {
        let ab = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(ab)));
        let hi = vpaddlq_s16(vmull_high_s8(w, ab));
        vaddq_s32(acc, vpaddq_s32(lo, hi))
    }
}

/// `acc` plus the products of `w[j]` with activation bytes `4j..4j+4` of `a`.
#[inline(always)]
unsafe fn dot4<const DOT: bool>(acc: int32x4_t, w: &[int8x16_t; 4], a: int8x16_t) -> int32x4_t {
    let acc = dot_lane::<DOT, 0>(acc, w[0], a);
    let acc = dot_lane::<DOT, 1>(acc, w[1], a);
    let acc = dot_lane::<DOT, 2>(acc, w[2], a);
    dot_lane::<DOT, 3>(acc, w[3], a)
}

#[inline(always)]
unsafe fn load(p: *const u8) -> int8x16_t {
    vld1q_s8(p as *const i8)
}

/// Four 6-bit Q4_K scales (bytes) as floats.
#[inline(always)]
unsafe fn u8x4_to_f32(p: *const u8) -> float32x4_t {
    let b = vld1_lane_u32::<0>(p as *const u32, vdup_n_u32(0));
    vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(b)))))
}

/// One row group × tokens `t..t+n` into `direct`, or else into `res[i][row]`: `sdot`
/// byte products if `DOT` (the CPU must have the dot-product extension), else widening
/// ones.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
pub(super) unsafe fn group<const DOT: bool>(
    kind: QuantType,
    g: &[u8],
    nb: usize,
    x: &PackedX,
    t: usize,
    n: usize,
    direct: Option<Direct>,
    res: &mut [[f32; ROWS]; MAX_TOKENS],
) {
    let mut store = |i: usize, acc: &[float32x4_t; 4]| match direct {
        Some(d) => {
            let p = d.ptr.add(i * d.tok_stride);
            if d.mask == u16::MAX {
                for (q, a) in acc.iter().enumerate() {
                    vst1q_f32(p.add(4 * q), *a);
                }
            } else {
                // A ragged last group: only its rows (no masked stores on NEON).
                let mut tmp = [0.0f32; ROWS];
                for (q, a) in acc.iter().enumerate() {
                    vst1q_f32(tmp.as_mut_ptr().add(4 * q), *a);
                }
                for (r, v) in tmp.iter().enumerate() {
                    if d.mask & (1 << r) != 0 {
                        *p.add(r) = *v;
                    }
                }
            }
        }
        None => {
            for (q, a) in acc.iter().enumerate() {
                vst1q_f32(res[i].as_mut_ptr().add(4 * q), *a);
            }
        }
    };
    let mut t0 = 0;
    while t0 < n {
        let m = (n - t0).min(TOKENS);
        let mut put = |acc: &[[float32x4_t; 4]]| {
            for (i, a) in acc.iter().enumerate() {
                store(t0 + i, a);
            }
        };
        macro_rules! run {
            ($f:ident; $($n:literal)*) => {
                match m { $($n => put(&$f::<$n, DOT>(g.as_ptr(), nb, x, t + t0)),)* _ => {} }
            };
            ($f:ident, $q4:tt; $($n:literal)*) => {
                match m { $($n => put(&$f::<$n, DOT, $q4>(g.as_ptr(), nb, x, t + t0)),)* _ => {} }
            };
        }
        match kind {
            QuantType::Q8_0 => run!(q32, false; 1 2 3 4),
            QuantType::Q4_0 => run!(q32, true; 1 2 3 4),
            QuantType::Q4K => run!(q4_k; 1 2 3 4),
            _ => {}
        }
        t0 += m;
    }
}

/// Q4_0 (`Q4`: `init + Σ w·a` over raw nibbles) or Q8_0 (`Σ w·a`) row group, the x86
/// paths' sums and float steps (`acc += float(Σ) · (d_w · d_a)`, fused).
// `q` indexes every token's accumulators inside `for_tokens!`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q32<const N: usize, const DOT: bool, const Q4: bool>(
    g: *const u8,
    nb: usize,
    x: &PackedX,
    t: usize,
) -> [[float32x4_t; 4]; N] {
    let gbb = if Q4 { 288 } else { 544 };
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    let m4 = vdupq_n_s8(0x0F);
    for b in 0..nb {
        let blk = g.add(b * gbb);
        for q in 0..4 {
            let dw = f16x4(blk.add(8 * q).cast());
            let quants = blk.add(32 + 16 * q);
            // Quant bytes 4j..4j+4 of the quarter's rows: for Q4_0 the low nibbles meet
            // activations 0..16 and the high ones 16..32, for Q8_0 j < 4 meets 0..16.
            let (w0, w1): ([int8x16_t; 4], [int8x16_t; 4]) = if Q4 {
                let v: [int8x16_t; 4] = std::array::from_fn(|j| load(quants.add(64 * j)));
                (
                    v.map(|vj| vandq_s8(vj, m4)),
                    v.map(|vj| vreinterpretq_s8_u8(vshrq_n_u8::<4>(vreinterpretq_u8_s8(vj)))),
                )
            } else {
                (
                    std::array::from_fn(|j| load(quants.add(64 * j))),
                    std::array::from_fn(|j| load(quants.add(64 * (j + 4)))),
                )
            };
            for_tokens!(n => {
                let (a, m) = xat(x, t + n, b);
                let (a0, a1) = (vld1q_s8(a), vld1q_s8(a.add(16)));
                let init = if Q4 { (*m).init_q4 } else { 0 };
                let i = dot4::<DOT>(dot4::<DOT>(vdupq_n_s32(init), &w0, a0), &w1, a1);
                let s = vcvtq_f32_s32(i);
                acc[n][q] = vfmaq_f32(acc[n][q], s, vmulq_f32(dw, vdupq_n_f32((*m).d)));
            });
        }
    }
    acc
}

/// Q4_K row group against Q8_K activations, as the x86 paths: per sub-block the integer
/// sum scaled by `d·sc`, per super-block `acc += d_a · (Σ − dmin · Σ_s m_s·Σa_s)`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q4_k<const N: usize, const DOT: bool>(
    g: *const u8,
    nb: usize,
    x: &PackedX,
    t: usize,
) -> [[float32x4_t; 4]; N] {
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    let m4 = vdupq_n_s8(0x0F);
    for b in 0..nb {
        let meta = g.add(b * 2368);
        for q in 0..4 {
            let d = f16x4(meta.add(256 + 8 * q).cast());
            let mut sub = [vdupq_n_f32(0.0); N];
            for c in 0..4 {
                let quants = meta.add(320 + c * 512 + 16 * q);
                let v: [int8x16_t; 8] = std::array::from_fn(|j| load(quants.add(64 * j)));
                for hi in 0..2 {
                    let s = 2 * c + hi;
                    let w: [int8x16_t; 8] = v.map(|vj| {
                        if hi == 0 {
                            vandq_s8(vj, m4)
                        } else {
                            vreinterpretq_s8_u8(vshrq_n_u8::<4>(vreinterpretq_u8_s8(vj)))
                        }
                    });
                    let (w0, w1) = ([w[0], w[1], w[2], w[3]], [w[4], w[5], w[6], w[7]]);
                    let dsc = vmulq_f32(d, u8x4_to_f32(meta.add(s * ROWS + 4 * q)));
                    for_tokens!(n => {
                        let kb = x.kblocks.get_unchecked((t + n) * x.nbx + b);
                        let a = kb.qs.as_ptr().add(32 * s);
                        let (a0, a1) = (vld1q_s8(a), vld1q_s8(a.add(16)));
                        let i = dot4::<DOT>(dot4::<DOT>(vdupq_n_s32(0), &w0, a0), &w1, a1);
                        sub[n] = vfmaq_f32(sub[n], vcvtq_f32_s32(i), dsc);
                    });
                }
            }
            // Mins: per row lane Σ_k m[2k]·Σa[2k] + m[2k+1]·Σa[2k+1], from the pairs.
            let mins: [int16x8_t; 4] = std::array::from_fn(|k| {
                vreinterpretq_s16_u16(vmovl_u8(vld1_u8(meta.add(128 + 32 * k + 8 * q))))
            });
            let dmin = f16x4(meta.add(288 + 8 * q).cast());
            for_tokens!(n => {
                let i = (t + n) * x.nbx + b;
                let sums = x.ksums.get_unchecked(i);
                let mut im = vdupq_n_s32(0);
                for (k, mk) in mins.iter().enumerate() {
                    let s = vreinterpret_s16_s32(vdup_n_s32(sums[k]));
                    let lo = vmull_s16(vget_low_s16(*mk), s);
                    let hi = vmull_s16(vget_high_s16(*mk), s);
                    im = vaddq_s32(im, vpaddq_s32(lo, hi));
                }
                let total = vfmsq_f32(sub[n], dmin, vcvtq_f32_s32(im));
                let da = vdupq_n_f32(x.kblocks.get_unchecked(i).d);
                acc[n][q] = vfmaq_f32(acc[n][q], total, da);
            });
        }
    }
    acc
}
