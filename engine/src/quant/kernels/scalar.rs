//! Portable scalar dot products: the references the SIMD kernels are tested against, and
//! what runs where the CPU has none.

use crate::quant::blocks::*;

pub fn dot_bf16_scalar(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let cw = w.chunks_exact(8);
    let cx = x.chunks_exact(8);
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for k in 0..8 {
            acc[k] += f32::from_bits((a[k] as u32) << 16) * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += f32::from_bits((*a as u32) << 16) * b;
    }
    s
}

pub fn dot_q8_0_scalar(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut i = 0i32;
        for k in 0..QK8_0 {
            i += a.qs[k] as i32 * b.qs[k] as i32;
        }
        s += i as f32 * f16_to_f32(a.d) * f16_to_f32(b.d);
    }
    s
}

pub fn dot_q4_0_scalar(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut i = 0i32;
        for j in 0..QK4_0 / 2 {
            let lo = (a.qs[j] & 0x0F) as i32 - 8;
            let hi = (a.qs[j] >> 4) as i32 - 8;
            i += lo * b.qs[j] as i32 + hi * b.qs[j + QK4_0 / 2] as i32;
        }
        s += i as f32 * f16_to_f32(a.d) * f16_to_f32(b.d);
    }
    s
}

pub fn dot_q4_k_scalar(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &a.scales);
            let chunk = j / 2;
            let hi = j % 2 == 1;
            let mut dot = 0i32;
            for l in 0..32 {
                let q = a.qs[32 * chunk + l];
                let q = if hi { q >> 4 } else { q & 0x0F } as i32;
                dot += q * b.qs[32 * j + l] as i32;
            }
            sumi += sc as i32 * dot;
            summ += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
        }
        s += b.d * (f16_to_f32(a.d) * sumi as f32 - f16_to_f32(a.dmin) * summ as f32);
    }
    s
}
