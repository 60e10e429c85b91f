//! Weights interleaved 16 rows at a time (the "x16" layout) and the products that read
//! them: AVX-512 VNNI (`avx512`), AVX2 with or without AVX-VNNI (`avx2`; laptops) and
//! NEON (`neon`; ARM64 boards, with or without the dot-product extension), all giving the
//! same bits.
//!
//! In ggml's layout a row's quants are contiguous, so a SIMD dot product runs along one
//! row, ends in a horizontal sum, and applies each block's scale to a scalar. Here the 16
//! rows of a group advance together: one 64-byte load holds 4 quant bytes of each of the
//! 16 rows, one `vpdpbusd` against 4 broadcast activation bytes advances all 16 rows, the
//! 16 rows' block scales are one vector, and nothing is reduced horizontally. In a prefill
//! the unpacked weights of a block stay in registers for up to 8 tokens.
//!
//! The bytes are ggml's blocks, permuted (llama.cpp's repacked CPU buffers do the same);
//! only Q4_K's 6-bit scales are stored unpacked, one byte each. A row group (rows
//! 16g..16g+16) is `nbs` blocks in order, each its scales then its quants, so a product
//! reads one sequential stream (with the scales in a separate area, matrices 2048 wide
//! streamed ~20% slower than 8192-wide ones: two streams restarting every 18 KiB):
//! - Q8_0: scales `[row]` f16, then quants `[j<8][row][4]` (bytes `4j..4j+4` of the
//!   row's block): 544 bytes per block.
//! - Q4_0: scales, then quants `[j<4][row][4]`, each byte holding quant `4j+i` in its low
//!   nibble and `16+4j+i` in its high nibble as in ggml: 288 bytes per block.
//! - Q4_K: 320 bytes of metadata: scales `[s<8][row]` u8, mins `[k<4][row][2]` u8 (the
//!   mins of sub-blocks `2k`, `2k+1` side by side), `d[row]` f16, `dmin[row]` f16; then
//!   quants `[c<4][j<8][row][4]` (`c`: ggml's 64-quant chunk, low nibbles are sub-block
//!   `2c`, high `2c+1`): 2368 bytes per block.
//!
//! Activations are Q8_0 (per 32 values) for Q8_0 and Q4_0 weights. Q8_0 weights are fed
//! as unsigned bytes (`w ^ 0x80 = w + 128`) and Q4_0 as raw nibbles (`q + 8`); the integer
//! sum starts at `−offset · Σ activations`, so it stays exact. Q4_K weights meet Q8_K
//! activations (one scale per 256, as ggml's `vec_dot_q4_K_q8_K`): a super-block's
//! sub-block sums are scaled by `d·sc` in floats without the activation scale, and its
//! mins term `Σ m·Σa` is one integer product (`vpdpwssd` over the mins in pairs), so the
//! activation scale is applied once per super-block. Each (row, token) result takes the
//! same operations in the same order whatever the tile, so a prefill and a decode agree
//! bit for bit. The 256-bit path (`avx2`) computes the same integers with `vpdpbusd` where
//! the CPU has AVX-VNNI, else with `vpmaddubsw` (Q8_0 as `|w|·sign(a, w)`, having no room
//! for the offset), and the same float steps.

use std::ops::Range;

use rayon::prelude::*;

use super::blocks::*;
use super::kernels;
use super::{OutView, QuantType};

/// Rows per interleaved group.
pub const ROWS: usize = 16;
/// Tokens whose accumulators a call keeps in registers.
const MAX_TOKENS: usize = 8;

/// The kernels that run the packed products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// A build constructs its own architecture's paths only (the tests name them all).
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
pub enum Path {
    /// One 512-bit register per row group, `vpdpbusd` byte products.
    Avx512Vnni,
    /// Two 256-bit halves per row group, `vpdpbusd` byte products (AVX-VNNI).
    AvxVnni,
    /// Two 256-bit halves per row group, `vpmaddubsw` byte products.
    Avx2,
    /// Four 128-bit quarters per row group, `sdot` byte products (ARMv8.2 dot product).
    NeonDotprod,
    /// Four 128-bit quarters per row group, widening byte multiplies (any ARMv8).
    Neon,
}

/// The packed kernels for this CPU (following [`kernels::isa`] and the configured
/// [`kernels::IsaChoice`]: `avxvnni` selects the 256-bit AVX-VNNI ones, `avx2` the plain
/// AVX2 ones, `neon` the NEON ones without the dot-product extension), or `None` where
/// there are none.
pub fn path() -> Option<Path> {
    #[cfg(target_arch = "x86_64")]
    {
        static PATH: std::sync::OnceLock<Option<Path>> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| match kernels::isa() {
            kernels::Isa::Avx512Vnni => Some(Path::Avx512Vnni),
            kernels::Isa::Avx2
                if runs_here(Path::AvxVnni) && kernels::choice() != kernels::IsaChoice::Avx2 =>
            {
                Some(Path::AvxVnni)
            }
            kernels::Isa::Avx2 => Some(Path::Avx2),
            _ => None,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        static PATH: std::sync::OnceLock<Option<Path>> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| match kernels::isa() {
            kernels::Isa::Neon
                if runs_here(Path::NeonDotprod)
                    && kernels::choice() != kernels::IsaChoice::Neon =>
            {
                Some(Path::NeonDotprod)
            }
            kernels::Isa::Neon => Some(Path::Neon),
            _ => None,
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

/// Whether this CPU has the instructions of `p` (whatever [`path`] chose).
pub fn runs_here(p: Path) -> bool {
    match p {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => kernels::cpu_has(kernels::Isa::Avx2),
        #[cfg(target_arch = "x86_64")]
        Path::AvxVnni => {
            kernels::cpu_has(kernels::Isa::Avx2) && std::arch::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => kernels::cpu_has(kernels::Isa::Avx512Vnni),
        #[cfg(target_arch = "aarch64")]
        Path::Neon => kernels::cpu_has(kernels::Isa::Neon),
        #[cfg(target_arch = "aarch64")]
        Path::NeonDotprod => {
            kernels::cpu_has(kernels::Isa::Neon)
                && std::arch::is_aarch64_feature_detected!("dotprod")
        }
        _ => false,
    }
}

/// Whether the CPU can run the packed products (AVX-512 VNNI, AVX-VNNI, AVX2 or NEON).
pub fn supported() -> bool {
    path().is_some()
}

/// Whether loaded matrices are packed: where supported, unless configured off (for
/// comparisons with the ggml-layout kernels; [`kernels::configure`]).
pub fn enabled() -> bool {
    supported() && kernels::pack()
}

/// The kernels quantized products run on this machine, for logs and reports: the
/// packed path (`avx512-vnni`, `avx-vnni`, `avx2`, `neon-dotprod`, `neon`) or, where
/// matrices are not packed, the tier of the row-layout kernels (`rows-…`).
pub fn kernels_in_use() -> &'static str {
    if enabled() {
        match path() {
            Some(Path::Avx512Vnni) => return "avx512-vnni",
            Some(Path::AvxVnni) => return "avx-vnni",
            Some(Path::Avx2) => return "avx2",
            Some(Path::NeonDotprod) => return "neon-dotprod",
            Some(Path::Neon) => return "neon",
            None => {}
        }
    }
    match kernels::isa() {
        kernels::Isa::Scalar => "rows-scalar",
        #[cfg(target_arch = "x86_64")]
        kernels::Isa::Avx2 => "rows-avx2",
        #[cfg(target_arch = "x86_64")]
        kernels::Isa::Avx512Vnni => "rows-avx512-vnni",
        #[cfg(target_arch = "aarch64")]
        kernels::Isa::Neon => "rows-neon",
    }
}

/// Layout name for cache keys: a store written packed is only read where packing is on.
pub fn layout_tag() -> &'static str {
    if enabled() {
        "x16"
    } else {
        "ggml"
    }
}

/// Bytes of one row group per block (32 quants; 256 for Q4_K), or `None` for a type that
/// is not packed.
pub fn group_block_bytes(kind: QuantType) -> Option<usize> {
    match kind {
        QuantType::Q8_0 => Some(544),
        QuantType::Q4_0 => Some(288),
        QuantType::Q4K => Some(2368),
        _ => None,
    }
}

/// Quants per block of a packed type (Q4_K's super-block: 256; else 32).
pub fn block_len(kind: QuantType) -> usize {
    if kind == QuantType::Q4K {
        QK_K
    } else {
        QK8_0
    }
}

fn quant_bytes(kind: QuantType) -> usize {
    match kind {
        QuantType::Q8_0 => 512,
        QuantType::Q4_0 => 256,
        _ => 2048,
    }
}

/// A ggml block type that can be packed: its quant bytes and scale(s).
pub trait Source: Sync {
    fn kind() -> QuantType;
    /// The quant bytes (Q8_0: 32, Q4_0: 16, Q4_K: 128).
    fn qs(&self) -> &[u8];
    /// Writes this block's scales for row `r` into the group's scale area `meta`.
    fn put_meta(&self, r: usize, meta: &mut [u8]);
    /// The block of row `r` back from its group's `quants` and `meta` for this block
    /// (the inverse of `qs` and `put_meta`).
    fn unpack(quants: &[u8], meta: &[u8], r: usize) -> Self;
    /// ggml's dequantization of the type.
    fn dequantize(b: &[Self], out: &mut [f32])
    where
        Self: Sized;
}

/// Where sub-block `s`'s min of row `r` lies in a packed Q4_K block's metadata.
fn q4k_min_at(s: usize, r: usize) -> usize {
    128 + (s / 2) * 2 * ROWS + 2 * r + s % 2
}

/// Byte `k` of row `r`'s quants in a block's packed quant area.
fn quant_at(quants: &[u8], r: usize, k: usize) -> u8 {
    quants[k / 4 * 64 + r * 4 + k % 4]
}

fn f16_bits_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Source for BlockQ8_0 {
    fn kind() -> QuantType {
        QuantType::Q8_0
    }
    fn qs(&self) -> &[u8] {
        // SAFETY: i8 and u8 have the same layout.
        unsafe { std::slice::from_raw_parts(self.qs.as_ptr() as *const u8, QK8_0) }
    }
    fn put_meta(&self, r: usize, meta: &mut [u8]) {
        meta[2 * r..2 * r + 2].copy_from_slice(&self.d.to_le_bytes());
    }
    fn unpack(quants: &[u8], meta: &[u8], r: usize) -> Self {
        BlockQ8_0 {
            d: f16_bits_at(meta, 2 * r),
            qs: std::array::from_fn(|k| quant_at(quants, r, k) as i8),
        }
    }
    fn dequantize(b: &[Self], out: &mut [f32]) {
        dequantize_q8_0(b, out)
    }
}

impl Source for BlockQ4_0 {
    fn kind() -> QuantType {
        QuantType::Q4_0
    }
    fn qs(&self) -> &[u8] {
        &self.qs
    }
    fn put_meta(&self, r: usize, meta: &mut [u8]) {
        meta[2 * r..2 * r + 2].copy_from_slice(&self.d.to_le_bytes());
    }
    fn unpack(quants: &[u8], meta: &[u8], r: usize) -> Self {
        BlockQ4_0 {
            d: f16_bits_at(meta, 2 * r),
            qs: std::array::from_fn(|k| quant_at(quants, r, k)),
        }
    }
    fn dequantize(b: &[Self], out: &mut [f32]) {
        dequantize_q4_0(b, out)
    }
}

impl Source for BlockQ4K {
    fn kind() -> QuantType {
        QuantType::Q4K
    }
    fn qs(&self) -> &[u8] {
        &self.qs
    }
    fn put_meta(&self, r: usize, meta: &mut [u8]) {
        for s in 0..8 {
            let (sc, m) = scale_min_k4(s, &self.scales);
            meta[s * ROWS + r] = sc;
            meta[q4k_min_at(s, r)] = m;
        }
        meta[256 + 2 * r..258 + 2 * r].copy_from_slice(&self.d.to_le_bytes());
        meta[288 + 2 * r..290 + 2 * r].copy_from_slice(&self.dmin.to_le_bytes());
    }
    fn unpack(quants: &[u8], meta: &[u8], r: usize) -> Self {
        let ls = std::array::from_fn(|s| meta[s * ROWS + r]);
        let lm = std::array::from_fn(|s| meta[q4k_min_at(s, r)]);
        BlockQ4K {
            d: f16_bits_at(meta, 256 + 2 * r),
            dmin: f16_bits_at(meta, 288 + 2 * r),
            scales: pack_scale_min_k4(&ls, &lm),
            qs: std::array::from_fn(|k| quant_at(quants, r, k)),
        }
    }
    fn dequantize(b: &[Self], out: &mut [f32]) {
        dequantize_q4_k(b, out)
    }
}

/// Packs `rows` rows (a multiple of [`ROWS`]) of `nb` ggml blocks each.
pub fn pack<B: Source>(src: &[B], rows: usize, nb: usize) -> Vec<u8> {
    let kind = B::kind();
    let (gbb, qb) = (group_block_bytes(kind).unwrap_or(0), quant_bytes(kind));
    let mut out = crate::residency::huge_vec(rows / ROWS * nb * gbb, 0u8);
    let mb = gbb - qb;
    out.par_chunks_mut(nb * gbb).enumerate().for_each(|(g, o)| {
        for r in 0..ROWS {
            let row = &src[(g * ROWS + r) * nb..(g * ROWS + r + 1) * nb];
            for (b, blk) in row.iter().enumerate() {
                let (meta, quants) = o[b * gbb..(b + 1) * gbb].split_at_mut(mb);
                // 4-byte groups of the block's quants, one per `j`, each row's in its slot.
                for (j, four) in blk.qs().chunks_exact(4).enumerate() {
                    let at = j * 64 + r * 4;
                    quants[at..at + 4].copy_from_slice(four);
                }
                blk.put_meta(r, meta);
            }
        }
    });
    out
}

/// Row `r` of a packed matrix (`nbs` blocks per row stored, the first `nb` wanted)
/// dequantized into `out` (embedding lookups): each block is rebuilt in ggml's layout
/// and goes through ggml's dequantization.
pub fn row_to_f32(kind: QuantType, w: &[u8], nbs: usize, nb: usize, r: usize, out: &mut [f32]) {
    fn row<B: Source>(w: &[u8], nbs: usize, nb: usize, r: usize, out: &mut [f32]) {
        let (gbb, qb) = (
            group_block_bytes(B::kind()).unwrap_or(0),
            quant_bytes(B::kind()),
        );
        let g = &w[r / ROWS * nbs * gbb..(r / ROWS + 1) * nbs * gbb];
        let (mb, bl) = (gbb - qb, block_len(B::kind()));
        for (b, o) in out.chunks_exact_mut(bl).take(nb).enumerate() {
            let (meta, quants) = g[b * gbb..(b + 1) * gbb].split_at(mb);
            let blk = B::unpack(quants, meta, r % ROWS);
            B::dequantize(std::slice::from_ref(&blk), o);
        }
    }
    match kind {
        QuantType::Q8_0 => row::<BlockQ8_0>(w, nbs, nb, r, out),
        QuantType::Q4_0 => row::<BlockQ4_0>(w, nbs, nb, r, out),
        QuantType::Q4K => row::<BlockQ4K>(w, nbs, nb, r, out),
        _ => {}
    }
}

/// Per activation block: its scale and the integer sums' start for Q4_0 and Q8_0
/// weights (`−8·Σa`, `−128·Σa`).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct XMeta {
    pub d: f32,
    pub init_q4: i32,
    pub init_q8: i32,
}

/// The [`XMeta`] of each block of `x` into `out` (as many as both hold).
pub fn prepare(x: &[BlockQ8_0], out: &mut [XMeta]) {
    for (b, m) in x.iter().zip(out.iter_mut()) {
        let d = f16_to_f32(b.d);
        // |Σ| ≤ 32 · 128 fits an i16, whose narrower lanes vectorize better.
        let isum = b.qs.iter().fold(0i16, |s, &q| s + q as i16) as i32;
        *m = XMeta {
            d,
            init_q4: -8 * isum,
            init_q8: -128 * isum,
        };
    }
}

/// The sums of a Q8_K block's eight 32-value sub-blocks as i16 pairs (`[2k] | [2k+1] << 16`),
/// the operand that meets a Q4_K row group's mins pairs.
pub type XSumsK = [i32; 4];

/// The [`XSumsK`] of each block of `x` into `out` (as many as both hold).
pub fn prepare_k(x: &[BlockQ8K], out: &mut [XSumsK]) {
    for (b, o) in x.iter().zip(out.iter_mut()) {
        // |Σ| ≤ 32 · 128 fits an i16.
        let sub = |s: usize| (b.bsums[2 * s] as i32 + b.bsums[2 * s + 1] as i32) as i16 as u16;
        *o = std::array::from_fn(|k| (sub(2 * k) as u32 | (sub(2 * k + 1) as u32) << 16) as i32);
    }
}

/// Quantized activations of a product, token-major, `nbx` blocks per token: Q8_0 blocks
/// and their [`XMeta`] for Q8_0/Q4_0 weights, Q8_K blocks and their [`XSumsK`] for Q4_K
/// (the other pair empty).
#[derive(Clone, Copy)]
pub struct PackedX<'a> {
    pub blocks: &'a [BlockQ8_0],
    pub meta: &'a [XMeta],
    pub kblocks: &'a [BlockQ8K],
    pub ksums: &'a [XSumsK],
    pub nbx: usize,
}

/// A packed matrix as the kernels see it.
#[derive(Clone, Copy)]
pub struct PackedW<'a> {
    pub kind: QuantType,
    pub bytes: &'a [u8],
    /// Blocks stored per row, and the first `nb` of them that the product reads.
    pub nbs: usize,
    pub nb: usize,
}

/// `out[(r − rows.start)·out_stride + tok] = W[r] · x[tok]` for rows `rows` (the start a
/// multiple of [`ROWS`]) and tokens `toks` (the kernels' example; the engine writes
/// through [`tile_into`]).
#[cfg(feature = "internals")]
pub fn tile(
    w: &PackedW,
    rows: Range<usize>,
    x: &PackedX,
    toks: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    if let Some(p) = path() {
        tile_on(p, w, rows, x, toks, out, out_stride)
    }
}

/// `tile` with the kernels of `p` (tests compare the paths).
#[cfg(any(test, feature = "internals"))]
pub(crate) fn tile_on(
    p: Path,
    w: &PackedW,
    rows: Range<usize>,
    x: &PackedX,
    toks: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    if rows.is_empty() || toks.is_empty() {
        return;
    }
    assert!(
        out.len() > (rows.len() - 1) * out_stride + toks.end - 1,
        "packed::tile: output too short"
    ); // ok: internal contract of Matrix::matmul
    let view = OutView {
        ptr: out.as_mut_ptr(),
        row_stride: out_stride,
        tok_stride: 1,
    };
    // SAFETY: every element written lies in `out` (checked above), borrowed exclusively.
    unsafe { tile_into_on(p, w, rows, x, toks, view) }
}

/// `tile` into any layout; prefill writes token-major straight into the product's
/// output (16 consecutive floats per token), with no transposition afterwards.
///
/// # Safety
/// Every element `(r, k)` for `r` in `rows`, `k` in `toks` must address memory that the
/// caller owns exclusively for the duration of the call.
pub unsafe fn tile_into(
    w: &PackedW,
    rows: Range<usize>,
    x: &PackedX,
    toks: Range<usize>,
    out: OutView,
) {
    let Some(p) = path() else {
        return;
    };
    // SAFETY: the caller's contract; `path()` runs here.
    unsafe { tile_into_on(p, w, rows, x, toks, out) }
}

/// [`tile_into`] with the kernels of `p` (tests compare the paths).
///
/// # Safety
/// As [`tile_into`].
pub(crate) unsafe fn tile_into_on(
    p: Path,
    w: &PackedW,
    rows: Range<usize>,
    x: &PackedX,
    toks: Range<usize>,
    out: OutView,
) {
    let Some(gbb) = group_block_bytes(w.kind) else {
        return;
    };
    let acts = if w.kind == QuantType::Q4K {
        x.kblocks.len().min(x.ksums.len())
    } else {
        x.blocks.len().min(x.meta.len())
    };
    assert!(
        runs_here(p)
            && rows.start.is_multiple_of(ROWS)
            && w.nb <= w.nbs
            && x.nbx == w.nb
            && w.bytes.len() >= rows.end.div_ceil(ROWS) * w.nbs * gbb
            && acts >= toks.end * x.nbx,
        "packed::tile: inconsistent operands"
    ); // ok: internal contract of Matrix::matmul

    // Zeroed once per call, not per group: a decode step's groups (all stored directly)
    // spent 1% of the step in memset.
    let mut res = [[0.0f32; ROWS]; MAX_TOKENS];
    for g0 in rows.clone().step_by(ROWS) {
        let nr = (rows.end - g0).min(ROWS);
        let group = &w.bytes[g0 / ROWS * w.nbs * gbb..(g0 / ROWS + 1) * w.nbs * gbb];
        let mut t = toks.start;
        while t < toks.end {
            let n = (toks.end - t).min(MAX_TOKENS);
            // Token-major output (16 consecutive rows per token): stored straight from the
            // registers, the rows past `nr` masked off.
            let direct = (out.row_stride == 1).then(|| Direct {
                // SAFETY: the caller owns these elements (function contract).
                ptr: unsafe { out.ptr.add((g0 - rows.start) + t * out.tok_stride) },
                tok_stride: out.tok_stride,
                mask: ((1u32 << nr) - 1) as u16,
            });
            // SAFETY: the instructions checked by `runs_here`; bounds checked above; a
            // direct store writes rows g0..g0+nr of tokens t..t+n only.
            unsafe {
                match p {
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx512Vnni => {
                        avx512::group(w.kind, group, w.nb, x, t, n, direct, &mut res)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Path::AvxVnni => {
                        avx2::group_vnni(w.kind, group, w.nb, x, t, n, direct, &mut res)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx2 => avx2::group(w.kind, group, w.nb, x, t, n, direct, &mut res),
                    #[cfg(target_arch = "aarch64")]
                    Path::NeonDotprod => {
                        neon::group::<true>(w.kind, group, w.nb, x, t, n, direct, &mut res)
                    }
                    #[cfg(target_arch = "aarch64")]
                    Path::Neon => {
                        neon::group::<false>(w.kind, group, w.nb, x, t, n, direct, &mut res)
                    }
                    _ => {}
                }
            };
            if direct.is_some() {
                t += n;
                continue;
            }
            for (i, r) in res.iter().enumerate().take(n) {
                let base = (g0 - rows.start) * out.row_stride + (t + i) * out.tok_stride;
                // SAFETY: the caller owns these elements (function contract).
                unsafe {
                    if out.row_stride == 1 {
                        std::ptr::copy_nonoverlapping(r.as_ptr(), out.ptr.add(base), nr);
                    } else {
                        for (rr, &v) in r.iter().enumerate().take(nr) {
                            *out.ptr.add(base + rr * out.row_stride) = v;
                        }
                    }
                }
            }
            t += n;
        }
    }
}

/// Where a row group's results go when the output is token-major: token `i`'s 16 rows
/// at `ptr + i·tok_stride`, lanes outside `mask` not written.
#[derive(Clone, Copy)]
struct Direct {
    ptr: *mut f32,
    tok_stride: usize,
    mask: u16,
}

/// `$body` for each token index below `N`, written out (a loop over eight tokens
/// was left rolled with the accumulators in memory).
macro_rules! for_tokens {
    ($n:ident => $body:block) => {
        for_tokens!(@ $n $body; 0 1 2 3 4 5 6 7)
    };
    (@ $n:ident $body:block; $($k:literal)*) => {
        $( if $k < N { let $n: usize = $k; $body } )*
    };
}

/// Token `t`'s activation block `blk`: its quants and its [`XMeta`].
///
/// # Safety
/// Block `t·nbx + blk` must exist in both `x.blocks` and `x.meta`.
#[inline(always)]
unsafe fn xat(x: &PackedX, t: usize, blk: usize) -> (*const i8, *const XMeta) {
    let i = t * x.nbx + blk;
    // SAFETY: the caller's contract.
    unsafe {
        (
            x.blocks.get_unchecked(i).qs.as_ptr(),
            x.meta.as_ptr().add(i),
        )
    }
}

// The decode kernels' weight requests (the same for bf16 rows).
#[cfg(target_arch = "x86_64")]
use super::kernels::prefetch_ahead;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    /// Every packed path this CPU runs.
    fn paths_here() -> Vec<Path> {
        [
            Path::Avx512Vnni,
            Path::AvxVnni,
            Path::Avx2,
            Path::NeonDotprod,
            Path::Neon,
        ]
        .into_iter()
        .filter(|&p| runs_here(p))
        .collect()
    }

    /// Quantized activations as a product takes them (Q8_K for Q4_K weights, else Q8_0),
    /// owned, and their dequantization.
    #[derive(Default)]
    struct Acts {
        xq: Vec<BlockQ8_0>,
        meta: Vec<XMeta>,
        xk: Vec<BlockQ8K>,
        sums: Vec<XSumsK>,
        xd: Vec<f32>,
    }

    impl Acts {
        fn new(kind: QuantType, xf: &[f32]) -> Acts {
            let mut a = Acts {
                xd: vec![0.0; xf.len()],
                ..Acts::default()
            };
            if kind == QuantType::Q4K {
                a.xk = vec![BlockQ8K::default(); xf.len() / QK_K];
                quantize_q8_k(xf, &mut a.xk);
                for (b, o) in a.xk.iter().zip(a.xd.chunks_mut(QK_K)) {
                    for (q, v) in b.qs.iter().zip(o) {
                        *v = b.d * *q as f32;
                    }
                }
                a.sums = vec![XSumsK::default(); a.xk.len()];
                prepare_k(&a.xk, &mut a.sums);
            } else {
                a.xq = vec![BlockQ8_0::default(); xf.len() / QK8_0];
                quantize_q8_0(xf, &mut a.xq);
                dequantize_q8_0(&a.xq, &mut a.xd);
                a.meta = vec![XMeta::default(); a.xq.len()];
                prepare(&a.xq, &mut a.meta);
            }
            a
        }

        fn x(&self, nbx: usize) -> PackedX<'_> {
            PackedX {
                blocks: &self.xq,
                meta: &self.meta,
                kblocks: &self.xk,
                ksums: &self.sums,
                nbx,
            }
        }
    }

    /// Packed products against the dequantized weights times the dequantized activations
    /// (what the integer arithmetic computes exactly, up to float rounding), and packed
    /// rows against ggml's dequantization, on shapes with partial row groups and token
    /// counts that are not multiples of the register tile.
    fn check<B: Source + Copy>(
        quantize: fn(&[f32], &mut [B]),
        dequantize: fn(&[B], &mut [f32]),
        zero: B,
        bs: usize,
    ) {
        let paths = paths_here();
        if paths.is_empty() {
            eprintln!("packed kernels need AVX2, AVX-512 VNNI or NEON; skipped");
            return;
        }
        for &(rows, cols) in &[(16usize, 256usize), (48, 512), (32, 768)] {
            let nb = cols / bs;
            let wf = data(rows * cols, 7 + rows as u64);
            let mut wq = vec![zero; rows * nb];
            for (r, o) in wq.chunks_mut(nb).enumerate() {
                quantize(&wf[r * cols..(r + 1) * cols], o);
            }
            let mut wd = vec![0.0f32; rows * cols];
            for (r, o) in wd.chunks_mut(cols).enumerate() {
                dequantize(&wq[r * nb..(r + 1) * nb], o);
            }
            let packed = pack(&wq, rows, nb);
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                row_to_f32(B::kind(), &packed, nb, nb, r, &mut row);
                assert_eq!(
                    row,
                    wd[r * cols..(r + 1) * cols],
                    "row {r} of {rows}x{cols}"
                );
            }
            for &t in &[1usize, 3, 8, 13] {
                let acts = Acts::new(B::kind(), &data(t * cols, 99 + t as u64));
                let (x, xd) = (acts.x(nb), &acts.xd);
                let w = PackedW {
                    kind: B::kind(),
                    bytes: &packed,
                    nbs: nb,
                    nb,
                };
                // Rows 16.. only, and a ragged end, through a strided output.
                let (r0, r1) = (ROWS.min(rows - ROWS), rows - 3);
                let mut first: Option<Vec<f32>> = None;
                for &p in &paths {
                    let mut out = vec![f32::NAN; (r1 - r0) * (t + 2)];
                    tile_on(p, &w, r0..r1, &x, 0..t, &mut out, t + 2);
                    // Every path gives the same bits.
                    if let Some(f) = &first {
                        for (i, (a, b)) in f.iter().zip(&out).enumerate() {
                            assert_eq!(a.to_bits(), b.to_bits(), "{p:?} element {i}: {b} vs {a}");
                        }
                    }
                    for r in r0..r1 {
                        for i in 0..t {
                            let want: f64 = (0..cols)
                                .map(|c| wd[r * cols + c] as f64 * xd[i * cols + c] as f64)
                                .sum();
                            let got = out[(r - r0) * (t + 2) + i] as f64;
                            let scale: f64 = (0..cols)
                                .map(|c| (wd[r * cols + c] as f64 * xd[i * cols + c] as f64).abs())
                                .sum();
                            assert!(
                                (got - want).abs() <= 1e-5 * scale + 1e-6,
                                "{:?} {rows}x{cols} t={t} row {r} tok {i}: {got} vs {want}",
                                B::kind()
                            );
                        }
                    }
                    // One token at a time gives the same bits as the tile, and so does a
                    // token-major output (the direct stores).
                    for i in 0..t {
                        let mut one = vec![0.0f32; (r1 - r0) * (t + 2)];
                        tile_on(p, &w, r0..r1, &x, i..i + 1, &mut one, t + 2);
                        for r in r0..r1 {
                            let at = (r - r0) * (t + 2) + i;
                            assert_eq!(one[at].to_bits(), out[at].to_bits(), "row {r} tok {i}");
                        }
                    }
                    let mut tm = vec![f32::NAN; t * (r1 - r0)];
                    let view = OutView {
                        ptr: tm.as_mut_ptr(),
                        row_stride: 1,
                        tok_stride: r1 - r0,
                    };
                    // SAFETY: rows r0..r1 × tokens 0..t address `tm` exactly.
                    unsafe { tile_into_on(p, &w, r0..r1, &x, 0..t, view) };
                    for r in r0..r1 {
                        for i in 0..t {
                            let (a, b) = (tm[i * (r1 - r0) + r - r0], out[(r - r0) * (t + 2) + i]);
                            assert_eq!(a.to_bits(), b.to_bits(), "token-major row {r} tok {i}");
                        }
                    }
                    first = Some(out);
                }
            }
        }
    }

    /// Bits of a set of packed products (each type, a ragged row group, 5 tokens) on
    /// path `p`: inputs from the portable generator and reference quantizers, so they are
    /// the same on every machine.
    fn product_bits(p: Path) -> Vec<u32> {
        fn one<B: Source + Copy>(quantize: fn(&[f32], &mut [B]), zero: B, p: Path) -> Vec<u32> {
            // 48 rows stored, 40 computed: the last row group is ragged.
            let (stored, rows, cols, t) = (48usize, 40usize, 512usize, 5usize);
            let bs = block_len(B::kind());
            let nb = cols / bs;
            let wf = data(stored * cols, 11);
            let mut wq = vec![zero; stored * nb];
            for (r, o) in wq.chunks_mut(nb).enumerate() {
                quantize(&wf[r * cols..(r + 1) * cols], o);
            }
            let packed = pack(&wq, stored, nb);
            let acts = Acts::new(B::kind(), &data(t * cols, 12));
            let x = acts.x(nb);
            let w = PackedW {
                kind: B::kind(),
                bytes: &packed,
                nbs: nb,
                nb,
            };
            let mut out = vec![f32::NAN; rows * t];
            tile_on(p, &w, 0..rows, &x, 0..t, &mut out, t);
            out.iter().map(|v| v.to_bits()).collect()
        }
        let mut bits = one(quantize_q8_0, BlockQ8_0::default(), p);
        bits.extend(one(quantize_q4_0, BlockQ4_0 { d: 0, qs: [0; 16] }, p));
        let q4k = BlockQ4K {
            d: 0,
            dmin: 0,
            scales: [0; 12],
            qs: [0; 128],
        };
        bits.extend(one(quantize_q4_k, q4k, p));
        bits
    }

    /// Every packed path gives the same bits, across machines too: CI writes this
    /// machine's bits to `GEMMAD_PACKED_BITS_OUT` (x86-64) and the aarch64 run under qemu
    /// compares its own with them (`GEMMAD_PACKED_BITS_IN`).
    #[test]
    fn packed_bits_are_the_same_on_every_machine() {
        let paths = paths_here();
        let Some(&first) = paths.first() else {
            eprintln!("no packed path on this CPU; skipped");
            return;
        };
        let bits = product_bits(first);
        assert!(bits.iter().all(|&b| f32::from_bits(b).is_finite()));
        for &p in &paths[1..] {
            assert_eq!(product_bits(p), bits, "{p:?} against {first:?}");
        }
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(inp) = var("GEMMAD_PACKED_BITS_IN") {
            let theirs = std::fs::read(&inp).unwrap_or_else(|e| panic!("{inp:?}: {e}"));
            assert_eq!(
                theirs.len(),
                bytes.len(),
                "{inp:?}: another set of products"
            );
            for (i, (a, b)) in theirs
                .chunks_exact(4)
                .zip(bytes.chunks_exact(4))
                .enumerate()
            {
                assert_eq!(
                    a, b,
                    "product element {i} differs from {inp:?} ({paths:?} here)"
                );
            }
        }
        if let Some(out) = var("GEMMAD_PACKED_BITS_OUT") {
            std::fs::write(&out, &bytes).unwrap_or_else(|e| panic!("{out:?}: {e}"));
        }
    }

    #[test]
    fn q8_0_packed_matches_reference() {
        check(quantize_q8_0, dequantize_q8_0, BlockQ8_0::default(), QK8_0);
    }

    #[test]
    fn q4_0_packed_matches_reference() {
        check(
            quantize_q4_0,
            dequantize_q4_0,
            BlockQ4_0 { d: 0, qs: [0; 16] },
            QK4_0,
        );
    }

    #[test]
    fn q4_k_packed_matches_reference() {
        check(
            quantize_q4_k,
            dequantize_q4_k,
            BlockQ4K {
                d: 0,
                dmin: 0,
                scales: [0; 12],
                qs: [0; 128],
            },
            QK_K,
        );
    }
}
