//! Block formats with ggml's exact layouts (so GGUF tensors can later be mapped as-is),
//! and the reference (scalar) quantizers and dequantizers.

use half::f16;

pub const QK8_0: usize = 32;
pub const QK4_0: usize = 32;
pub const QK_K: usize = 256;

/// ggml `block_q8_0`: 32 int8 values with one f16 scale (34 bytes).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; QK8_0],
}

/// ggml `block_q4_0`: 32 4-bit values (offset 8) with one f16 scale (18 bytes). Byte j
/// holds element j in its low nibble and element j+16 in its high nibble.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: u16,
    pub qs: [u8; QK4_0 / 2],
}

/// ggml `block_q4_K`: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min,
/// f16 super-scales (144 bytes).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// ggml `block_q8_K` (activations for Q4_K dots): f32 scale, 256 int8, sums of 16s.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl Default for BlockQ8_0 {
    fn default() -> Self {
        BlockQ8_0 {
            d: 0,
            qs: [0; QK8_0],
        }
    }
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

#[inline]
pub fn f16_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

#[inline]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// ggml `quantize_row_q8_0_ref`.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
        }
    }
}

pub fn dequantize_q8_0(b: &[BlockQ8_0], out: &mut [f32]) {
    for (blk, o) in b.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = f16_to_f32(blk.d);
        for (v, &q) in o.iter_mut().zip(&blk.qs) {
            *v = q as f32 * d;
        }
    }
}

/// The largest magnitude in `x` and the signed value that has it (first one on ties).
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

/// ggml `quantize_row_q4_0_ref`: the scale maps the value of largest magnitude to -8.
pub fn quantize_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    for (xb, b) in x.chunks_exact(QK4_0).zip(out.iter_mut()) {
        let (_, max) = signed_absmax(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for j in 0..QK4_0 / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[j + QK4_0 / 2] * id;
            let q0 = ((x0 + 8.5) as i32).clamp(0, 15) as u8;
            let q1 = ((x1 + 8.5) as i32).clamp(0, 15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn dequantize_q4_0(b: &[BlockQ4_0], out: &mut [f32]) {
    for (blk, o) in b.iter().zip(out.chunks_exact_mut(QK4_0)) {
        let d = f16_to_f32(blk.d);
        for j in 0..QK4_0 / 2 {
            o[j] = ((blk.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            o[j + QK4_0 / 2] = ((blk.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Unpacks sub-block `j`'s 6-bit scale and min (ggml `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Packs 8 sub-block scales and mins (6 bits each) as ggml does; [`scale_min_k4`]
/// unpacks them.
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
    q
}

/// Q4_K quantization: per sub-block of 32 an affine fit (scale, min ≤ 0) refined by a few
/// least-squares passes, then 6-bit scales/mins under f16 super-scales; ggml's layout.
pub fn quantize_q4_k(x: &[f32], out: &mut [BlockQ4K]) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut scales = [0.0f32; 8];
        let mut mins = [0.0f32; 8];
        for j in 0..8 {
            let (s, m) = fit_affine_4bit(&xb[j * 32..(j + 1) * 32]);
            scales[j] = s;
            mins[j] = m;
        }
        let max_scale = scales.iter().fold(0.0f32, |a, &v| a.max(v));
        let max_min = mins.iter().fold(0.0f32, |a, &v| a.max(v));
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut ls = [0u8; 8];
        let mut lm = [0u8; 8];
        for j in 0..8 {
            ls[j] = ((inv_scale * scales[j]).round() as i32).clamp(0, 63) as u8;
            lm[j] = ((inv_min * mins[j]).round() as i32).clamp(0, 63) as u8;
        }
        b.scales = pack_scale_min_k4(&ls, &lm);
        b.d = f32_to_f16(max_scale / 63.0);
        b.dmin = f32_to_f16(max_min / 63.0);
        let d = f16_to_f32(b.d);
        let dmin = f16_to_f32(b.dmin);
        let mut q = [0u8; QK_K];
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b.scales);
            let dl = d * sc as f32;
            if dl == 0.0 {
                continue;
            }
            let ml = dmin * m as f32;
            for ii in 0..32 {
                let l = ((xb[32 * j + ii] + ml) / dl).round() as i32;
                q[32 * j + ii] = l.clamp(0, 15) as u8;
            }
        }
        for j in 0..QK_K / 64 {
            for l in 0..32 {
                b.qs[32 * j + l] = q[64 * j + l] | (q[64 * j + 32 + l] << 4);
            }
        }
    }
}

/// Fits x ≈ s·q − m with q ∈ 0..15, s ≥ 0, m ≥ 0 (ggml's mins are subtracted).
fn fit_affine_4bit(x: &[f32]) -> (f32, f32) {
    let mut lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        return (0.0, -lo);
    }
    let mut s = (hi - lo) / 15.0;
    let mut m = -lo;
    // A few rounds of: quantize, then least-squares (s, m) for those levels.
    for _ in 0..4 {
        let (mut sl, mut sl2, mut sx, mut slx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for &v in x {
            let l = (((v + m) / s).round()).clamp(0.0, 15.0) as f64;
            sl += l;
            sl2 += l * l;
            sx += v as f64;
            slx += l * v as f64;
        }
        let n = x.len() as f64;
        let det = n * sl2 - sl * sl;
        if det.abs() < 1e-12 {
            break;
        }
        let ns = (n * slx - sl * sx) / det;
        let nm = (sl * slx - sl2 * sx) / det; // v ≈ ns·l − nm
        if ns <= 0.0 || nm < 0.0 {
            break;
        }
        s = ns as f32;
        m = nm as f32;
    }
    (s, m)
}

pub fn dequantize_q4_k(b: &[BlockQ4K], out: &mut [f32]) {
    for (blk, o) in b.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(blk.d);
        let dmin = f16_to_f32(blk.dmin);
        for j in 0..QK_K / 64 {
            let (s1, m1) = scale_min_k4(2 * j, &blk.scales);
            let (s2, m2) = scale_min_k4(2 * j + 1, &blk.scales);
            let (d1, d2) = (d * s1 as f32, d * s2 as f32);
            let (mm1, mm2) = (dmin * m1 as f32, dmin * m2 as f32);
            for l in 0..32 {
                let q = blk.qs[32 * j + l];
                o[64 * j + l] = d1 * (q & 0x0F) as f32 - mm1;
                o[64 * j + 32 + l] = d2 * (q >> 4) as f32 - mm2;
            }
        }
    }
}

/// ggml `quantize_row_q8_K_ref`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (amax, max) = signed_absmax(xb);
        if amax == 0.0 {
            *b = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = ((iscale * v).round() as i32).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            b.bsums[j] = b.qs[16 * j..16 * (j + 1)].iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}
