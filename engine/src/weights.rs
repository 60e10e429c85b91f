//! Weight matrices as views: a matrix is a window (rows × cols with a row stride) onto
//! storage that is either the checkpoint's own mapped pages (bf16/f16/f32, zero-copy) or
//! an owned buffer. Narrowing rows or columns (MatFormer slices) makes a new view without
//! copying. Storage is f32, bf16/f16, ggml's Q8_0/Q4_0/Q4_K blocks, or those blocks
//! packed 16 rows at a time (`quant::packed`); products are in `matmul`.

use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::checkpoint::{DType, TensorView};
use crate::error::Result;
use crate::quant::blocks::*;
use crate::quant::kernels;
use crate::quant::packed;
use crate::quant::QuantType;
use crate::residency::huge_vec;

mod matmul;
pub mod store;
pub use matmul::release_thread_scratch;

#[cfg(target_endian = "big")]
compile_error!(
    "gemmad reads little-endian safetensors data in place; big-endian hosts are unsupported"
);

/// Elements of type `T` either borrowed from a mapping or owned.
#[derive(Clone, Debug)]
pub enum Slab<T: 'static> {
    Mapped {
        map: Arc<Mmap>,
        /// Byte offset of element 0; a multiple of `align_of::<T>()`.
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<T>>),
}

impl<T: Copy + 'static> Slab<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            Slab::Mapped { map, offset, len } => {
                // SAFETY: construction checked bounds and alignment; T is a plain number type
                // for which every bit pattern is valid; the mapping outlives `self`.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len) }
            }
            Slab::Owned(v) => v.as_slice(),
        }
    }

    /// The mapped byte range, if any (for residency queries and paging advice).
    pub fn mapped_range(&self) -> Option<(&Arc<Mmap>, usize, usize)> {
        match self {
            Slab::Mapped { map, offset, len } => {
                Some((map, *offset, *len * std::mem::size_of::<T>()))
            }
            Slab::Owned(_) => None,
        }
    }
}

fn slab_u16(t: &TensorView) -> Slab<u16> {
    if t.start.is_multiple_of(2) {
        Slab::Mapped {
            map: t.map.clone(),
            offset: t.start,
            len: t.numel(),
        }
    } else {
        let v: Vec<u16> = t
            .bytes()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Slab::Owned(v.into())
    }
}

fn slab_f32(t: &TensorView) -> Slab<f32> {
    if t.start.is_multiple_of(4) {
        Slab::Mapped {
            map: t.map.clone(),
            offset: t.start,
            len: t.numel(),
        }
    } else {
        Slab::Owned(t.to_f32_vec().into())
    }
}

#[derive(Clone, Debug)]
pub enum Data {
    F32(Slab<f32>),
    Bf16(Slab<u16>),
    F16(Slab<u16>),
    /// Row-major blocks; `stride` and `cols` stay in elements.
    Q8_0(Slab<BlockQ8_0>),
    Q4_0(Slab<BlockQ4_0>),
    Q4K(Slab<BlockQ4K>),
    /// Q8_0 / Q4_0 / Q4_K blocks interleaved 16 rows at a time (`quant::packed`); `stride`
    /// and `cols` stay in elements, `rows` is a multiple of 16 in storage.
    Packed(QuantType, Slab<u8>),
}

impl Data {
    /// Elements per block (1 for plain floats).
    fn block(&self) -> usize {
        match self {
            Data::F32(_) | Data::Bf16(_) | Data::F16(_) => 1,
            Data::Q8_0(_) | Data::Q4_0(_) => QK8_0,
            Data::Q4K(_) => QK_K,
            Data::Packed(q, _) => packed::block_len(*q),
        }
    }

    /// Bytes per block.
    fn block_bytes(&self) -> usize {
        match self {
            Data::F32(_) => 4,
            Data::Bf16(_) | Data::F16(_) => 2,
            Data::Q8_0(_) => std::mem::size_of::<BlockQ8_0>(),
            Data::Q4_0(_) => std::mem::size_of::<BlockQ4_0>(),
            Data::Q4K(_) => std::mem::size_of::<BlockQ4K>(),
            Data::Packed(q, _) => packed::group_block_bytes(*q).unwrap_or(0) / packed::ROWS,
        }
    }
}

/// Quantized-weights cache storage codes of packed matrices (codes 1-5: `store`).
const PACKED_CODES: [(u8, QuantType); 3] = [
    (6, QuantType::Q8_0),
    (7, QuantType::Q4_0),
    (8, QuantType::Q4K),
];

/// A 2-D weight `[rows, cols]` (PyTorch `nn.Linear` layout: one output per row).
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Elements between the starts of consecutive rows (>= cols once narrowed).
    pub stride: usize,
    data: Data,
}

impl Matrix {
    /// Wraps a 2-D tensor view without copying when its alignment allows.
    pub fn from_view(t: &TensorView) -> Result<Self> {
        if t.shape.len() != 2 {
            return Err(t.err(format!("expected a 2-D tensor, got shape {:?}", t.shape)));
        }
        let data = match t.dtype {
            DType::F32 => Data::F32(slab_f32(t)),
            DType::BF16 => Data::Bf16(slab_u16(t)),
            DType::F16 => Data::F16(slab_u16(t)),
        };
        Ok(Matrix {
            rows: t.shape[0],
            cols: t.shape[1],
            stride: t.shape[1],
            data,
        })
    }

    /// An owned f32 matrix (tests, small derived weights).
    pub fn from_f32(rows: usize, cols: usize, v: Vec<f32>) -> Self {
        assert_eq!(v.len(), rows * cols, "Matrix::from_f32 size"); // ok: internal caller contract
        Matrix {
            rows,
            cols,
            stride: cols,
            data: Data::F32(Slab::Owned(v.into())),
        }
    }

    /// The first `rows` rows (MatFormer: FFN prefix of gate/up).
    pub fn narrow_rows(&self, rows: usize) -> Matrix {
        Matrix {
            rows: rows.min(self.rows),
            ..self.clone()
        }
    }

    /// The first `cols` columns of every row (MatFormer: FFN prefix of down).
    pub fn narrow_cols(&self, cols: usize) -> Matrix {
        Matrix {
            cols: cols.min(self.cols),
            ..self.clone()
        }
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Bytes of the stored elements this view covers.
    pub fn storage_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Bytes of one row of this view.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.data.block() * self.data.block_bytes()
    }

    /// Storage type of this matrix.
    pub fn quant_type(&self) -> QuantType {
        match &self.data {
            Data::F32(_) => QuantType::F32,
            Data::Bf16(_) | Data::F16(_) => QuantType::Bf16,
            Data::Q8_0(_) => QuantType::Q8_0,
            Data::Q4_0(_) => QuantType::Q4_0,
            Data::Q4K(_) => QuantType::Q4K,
            Data::Packed(q, _) => *q,
        }
    }

    /// A view onto a stored matrix (quantized-weights cache) of storage `code`
    /// (see `store`), or `None` if the code or the extent is inconsistent.
    pub fn from_mapped(
        code: u8,
        rows: usize,
        cols: usize,
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    ) -> Option<Matrix> {
        fn slab<T: Copy>(map: Arc<Mmap>, offset: usize, len: usize, n: usize) -> Option<Slab<T>> {
            // The dimensions come from the file: checked arithmetic throughout.
            let ok = n.checked_mul(std::mem::size_of::<T>()) == Some(len)
                && offset.is_multiple_of(std::mem::align_of::<T>())
                && offset.checked_add(len).is_some_and(|e| e <= map.len());
            // Mapped, not copied: file-backed pages the kernel (and the governor) can
            // drop and re-read, and no second copy at load. (Copying into huge-page
            // memory measured no better decode here and raised peak RSS.)
            ok.then_some(Slab::Mapped {
                map,
                offset,
                len: n,
            })
        }
        let el = rows.checked_mul(cols)?;
        let data = match code {
            1 if cols.is_multiple_of(QK8_0) => Data::Q8_0(slab(map, offset, len, el / QK8_0)?),
            2 if cols.is_multiple_of(QK4_0) => Data::Q4_0(slab(map, offset, len, el / QK4_0)?),
            3 if cols.is_multiple_of(QK_K) => Data::Q4K(slab(map, offset, len, el / QK_K)?),
            4 => Data::F32(slab(map, offset, len, el)?),
            5 => Data::Bf16(slab(map, offset, len, el)?),
            6..=8 if packed::enabled() && rows.is_multiple_of(packed::ROWS) => {
                let &(_, q) = PACKED_CODES.iter().find(|(c, _)| *c == code)?;
                let bs = packed::block_len(q);
                let gbb = packed::group_block_bytes(q)?;
                if !cols.is_multiple_of(bs) {
                    return None;
                }
                let n = ((rows / packed::ROWS).checked_mul(cols)? / bs).checked_mul(gbb)?;
                Data::Packed(q, slab(map, offset, len, n)?)
            }
            _ => return None,
        };
        Some(Matrix {
            rows,
            cols,
            stride: cols,
            data,
        })
    }

    /// The bytes of the storage behind this view, whole (a narrowed view shares its
    /// parent's): for streaming the weights as they lie in memory (the bench's
    /// bandwidth probe over the decode weights).
    pub fn storage_view(&self) -> &[u8] {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain-old-data blocks/floats viewed as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match &self.data {
            Data::F32(s) => bytes(s.as_slice()),
            Data::Bf16(s) | Data::F16(s) => bytes(s.as_slice()),
            Data::Q8_0(s) => bytes(s.as_slice()),
            Data::Q4_0(s) => bytes(s.as_slice()),
            Data::Q4K(s) => bytes(s.as_slice()),
            Data::Packed(_, s) => s.as_slice(),
        }
    }

    /// Storage code and bytes of an owned, contiguous matrix (what the quantized-weights
    /// cache stores); `None` for views of the checkpoint's own pages.
    pub fn stored_bytes(&self) -> Option<(u8, &[u8])> {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain-old-data blocks/floats viewed as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        if self.stride != self.cols {
            return None;
        }
        match &self.data {
            Data::Q8_0(Slab::Owned(v)) => Some((1, bytes(v))),
            Data::Q4_0(Slab::Owned(v)) => Some((2, bytes(v))),
            Data::Q4K(Slab::Owned(v)) => Some((3, bytes(v))),
            Data::F32(Slab::Owned(v)) => Some((4, bytes(v))),
            Data::Bf16(Slab::Owned(v)) => Some((5, bytes(v))),
            Data::Packed(q, Slab::Owned(v)) => {
                let &(code, _) = PACKED_CODES.iter().find(|(_, k)| k == q)?;
                Some((code, bytes(v)))
            }
            _ => None,
        }
    }

    /// Converts to `q` (owned), or returns a cheap clone when `q` does not apply: a
    /// width that is not a multiple of the block (Q4_K falls back to Q4_0 then), or a
    /// matrix with fewer than 8 rows (routers).
    pub fn to_quant(&self, q: QuantType) -> Matrix {
        let q = match q {
            QuantType::Q4K if !self.cols.is_multiple_of(QK_K) => QuantType::Q4_0,
            other => other,
        };
        // Tiny-row matrices (the AltUp router, 4 rows) feed a tanh: keep them exact.
        let small = self.rows < 8;
        let fits = match q {
            QuantType::F32 | QuantType::Bf16 => true,
            QuantType::Q8_0 | QuantType::Q4_0 => self.cols.is_multiple_of(QK8_0),
            QuantType::Q4K => self.cols.is_multiple_of(QK_K),
        };
        if q == self.quant_type() || !fits || (small && q != QuantType::F32) {
            return self.clone();
        }
        let (rows, cols) = (self.rows, self.cols);
        let per_row = |r: usize, buf: &mut Vec<f32>| {
            buf.resize(cols, 0.0);
            self.row_to_f32(r, buf);
        };
        macro_rules! quantize_rows {
            ($blk:ty, $bs:expr, $f:path, $default:expr) => {{
                let nb = cols / $bs;
                let mut out: Vec<$blk> = huge_vec(rows * nb, $default);
                out.par_chunks_mut(nb)
                    .enumerate()
                    .for_each_init(Vec::new, |buf, (r, o)| {
                        per_row(r, buf);
                        $f(buf, o);
                    });
                out
            }};
        }
        let data = match q {
            QuantType::F32 => {
                let mut out = huge_vec(rows * cols, 0.0f32);
                out.par_chunks_mut(cols)
                    .enumerate()
                    .for_each(|(r, o)| self.row_to_f32(r, o));
                Data::F32(Slab::Owned(out.into()))
            }
            QuantType::Bf16 => {
                let mut out = huge_vec(rows * cols, 0u16);
                out.par_chunks_mut(cols)
                    .enumerate()
                    .for_each_init(Vec::new, |buf, (r, o)| {
                        per_row(r, buf);
                        for (d, &v) in o.iter_mut().zip(buf.iter()) {
                            *d = half::bf16::from_f32(v).to_bits();
                        }
                    });
                Data::Bf16(Slab::Owned(out.into()))
            }
            QuantType::Q8_0 => Data::Q8_0(Slab::Owned(
                quantize_rows!(BlockQ8_0, QK8_0, quantize_q8_0, BlockQ8_0::default()).into(),
            )),
            QuantType::Q4_0 => Data::Q4_0(Slab::Owned(
                quantize_rows!(
                    BlockQ4_0,
                    QK4_0,
                    quantize_q4_0,
                    BlockQ4_0 { d: 0, qs: [0; 16] }
                )
                .into(),
            )),
            QuantType::Q4K => Data::Q4K(Slab::Owned(
                quantize_rows!(
                    BlockQ4K,
                    QK_K,
                    quantize_q4_k,
                    BlockQ4K {
                        d: 0,
                        dmin: 0,
                        scales: [0; 12],
                        qs: [0; 128]
                    }
                )
                .into(),
            )),
        };
        Matrix {
            rows,
            cols,
            stride: cols,
            data,
        }
    }

    /// This matrix in the 16-row interleaved layout of `quant::packed` when packing is on
    /// and it applies (Q8_0/Q4_0/Q4_K, whole row groups, not a view); else a cheap clone.
    pub fn packed(&self) -> Matrix {
        if !packed::enabled() || !self.rows.is_multiple_of(packed::ROWS) || self.stride != self.cols
        {
            return self.clone();
        }
        let (rows, nb) = (self.rows, self.cols / self.data.block());
        let (q, bytes) = match &self.data {
            Data::Q8_0(v) => (QuantType::Q8_0, packed::pack(v.as_slice(), rows, nb)),
            Data::Q4_0(v) => (QuantType::Q4_0, packed::pack(v.as_slice(), rows, nb)),
            Data::Q4K(v) => (QuantType::Q4K, packed::pack(v.as_slice(), rows, nb)),
            _ => return self.clone(),
        };
        Matrix {
            data: Data::Packed(q, Slab::Owned(bytes.into())),
            ..self.clone()
        }
    }

    /// The transpose `[cols, rows]` in storage type `q` (owned). Used to store
    /// `down_proj` column-contiguous for activation-sparse layers.
    pub fn transposed(&self, q: QuantType) -> Matrix {
        let (rows, cols) = (self.rows, self.cols);
        let mut t = vec![0.0f32; rows * cols];
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            self.row_to_f32(r, &mut row);
            for (c, &v) in row.iter().enumerate() {
                t[c * rows + r] = v;
            }
        }
        Matrix::from_f32(cols, rows, t).to_quant(q)
    }

    /// `y += alpha · row r` restricted to columns `c0..c0 + y.len()` (sparse down
    /// projection; `c0` and the length are multiples of the block size).
    pub fn axpy_row_part(&self, r: usize, c0: usize, alpha: f32, y: &mut [f32]) {
        let bs = self.data.block();
        let s = r * self.stride + c0;
        let (b0, nb) = (s / bs, y.len() / bs);
        match &self.data {
            Data::Bf16(v) => kernels::axpy_bf16(&v.as_slice()[s..s + y.len()], alpha, y),
            Data::Q8_0(v) => kernels::axpy_q8_0(&v.as_slice()[b0..b0 + nb], alpha, y),
            Data::Q4_0(v) => kernels::axpy_q4_0(&v.as_slice()[b0..b0 + nb], alpha, y),
            Data::F32(v) => kernels::axpy_f32(alpha, &v.as_slice()[s..s + y.len()], y),
            Data::F16(v) => {
                let n = y.len();
                for (o, &w) in y.iter_mut().zip(&v.as_slice()[s..s + n]) {
                    *o += alpha * half::f16::from_bits(w).to_f32();
                }
            }
            Data::Packed(..) => {
                // Not on a hot path (sparse rows are stored in ggml's layout).
                let mut row = vec![0.0f32; self.cols];
                self.row_to_f32(r, &mut row);
                kernels::axpy_f32(alpha, &row[c0..c0 + y.len()], y);
            }
            Data::Q4K(v) => kernels::axpy_q4_k(&v.as_slice()[b0..b0 + nb], alpha, y),
        }
    }

    /// `y += Σ_i a_i · self[i][c0..c0 + y.len()]` over the non-zero `a_i` (the sparse down
    /// projection, on its transposed matrix): Q8_0/Q4_0/Q4_K rows four per pass over `y`; per
    /// element the same operations, in the same order, as [`Matrix::axpy_row_part`] row
    /// after row. E2B Q4_0: prefill +3.7%, decode +2.2% over one row per pass (medians of
    /// 8 and 12 interleaved pairs in one process).
    pub fn sparse_axpy(&self, a: &[f32], c0: usize, y: &mut [f32]) {
        thread_local! {
            static PICKS: std::cell::RefCell<Vec<(u32, f32)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let bs = self.data.block();
        // The gathers take whole blocks; the model's parts always are (else: row by row).
        let aligned = c0.is_multiple_of(bs) && y.len().is_multiple_of(bs);
        PICKS.with(|cell| {
            let mut picks = cell.borrow_mut();
            picks.clear();
            picks.extend(
                a.iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0.0)
                    .map(|(i, &v)| (i as u32, v)),
            );
            let (stride, b0) = (self.stride / bs, c0 / bs);
            match &self.data {
                Data::Q4_0(v) if aligned => {
                    kernels::axpy_gather_q4_0(v.as_slice(), stride, b0, &picks, y)
                }
                Data::Q8_0(v) if aligned => {
                    kernels::axpy_gather_q8_0(v.as_slice(), stride, b0, &picks, y)
                }
                Data::Q4K(v) if aligned => {
                    kernels::axpy_gather_q4_k(v.as_slice(), stride, b0, &picks, y)
                }
                _ => {
                    for &(i, v) in picks.iter() {
                        self.axpy_row_part(i as usize, c0, v, y);
                    }
                }
            }
        });
    }

    /// The file mapping the storage lies in and the byte offset of element 0, when the
    /// storage is mapped (checkpoint pages or the quantized-weights cache).
    fn mapped_base(&self) -> Option<(&Arc<Mmap>, usize)> {
        let r = match &self.data {
            Data::F32(s) => s.mapped_range(),
            Data::Bf16(s) | Data::F16(s) => s.mapped_range(),
            Data::Q8_0(s) => s.mapped_range(),
            Data::Q4_0(s) => s.mapped_range(),
            Data::Q4K(s) => s.mapped_range(),
            Data::Packed(_, s) => s.mapped_range(),
        };
        r.map(|(m, o, _)| (m, o))
    }

    /// Applies `advice` to the whole pages of the storage outside the `[..rows, ..cols]`
    /// prefix (a MatFormer slice's view), when the storage is a file mapping: what a
    /// smaller slice no longer reads. Owned storage is left alone (dropping anonymous
    /// pages would lose them). Row tails are one range; column tails are one range per
    /// row, or per 16-row group in the packed layout, where a group's blocks for the
    /// dropped columns are contiguous (E4B Q4_0 `down_proj` at half width: 72 KiB per
    /// group, against 4.5 KiB per row in ggml's row layout).
    pub(crate) fn advise_outside(
        &self,
        rows: usize,
        cols: usize,
        advice: crate::residency::Advice,
    ) {
        let Some((map, base)) = self.mapped_base() else {
            return;
        };
        let (rows, cols) = (rows.min(self.rows), cols.min(self.cols));
        let bs = self.data.block();
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        match &self.data {
            Data::Packed(q, _) => {
                let Some(gbb) = packed::group_block_bytes(*q) else {
                    return;
                };
                let nbs = self.stride / bs;
                let group = nbs * gbb;
                let (all, kept) = (
                    self.rows.div_ceil(packed::ROWS),
                    rows.div_ceil(packed::ROWS),
                );
                let b0 = cols.div_ceil(bs);
                if b0 < nbs {
                    ranges
                        .extend((0..kept).map(|g| (base + g * group + b0 * gbb, (nbs - b0) * gbb)));
                }
                if kept < all {
                    ranges.push((base + kept * group, (all - kept) * group));
                }
            }
            _ => {
                let bb = self.data.block_bytes();
                let rb = self.stride / bs * bb;
                let keep = cols.div_ceil(bs) * bb;
                if keep < rb {
                    ranges.extend((0..rows).map(|r| (base + r * rb + keep, rb - keep)));
                }
                if rows < self.rows {
                    ranges.push((base + rows * rb, (self.rows - rows) * rb));
                }
            }
        }
        // At most 16 MiB per call: a call holds the mm lock, which an allocation that
        // maps memory (the engine's next prefill) waits for.
        const STEP: usize = 16 << 20;
        for (off, len) in ranges {
            let (s, l) = crate::residency::page_span(off, len, map.len(), true);
            let mut at = s;
            while at < s + l {
                let n = STEP.min(s + l - at);
                crate::residency::advise(map, at, n, advice);
                at += n;
            }
        }
    }

    /// Elements per storage block (1 for plain floats).
    pub fn block_size(&self) -> usize {
        self.data.block()
    }

    /// Row `r` widened to f32 into `out` (embedding lookups).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let s = r * self.stride;
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v.as_slice()[s..s + self.cols]),
            Data::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v.as_slice()[s..s + self.cols]) {
                    *o = bf16_to_f32(b);
                }
            }
            Data::F16(v) => {
                for (o, &b) in out.iter_mut().zip(&v.as_slice()[s..s + self.cols]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            Data::Q8_0(v) => {
                let nb = self.cols / QK8_0;
                dequantize_q8_0(&v.as_slice()[s / QK8_0..s / QK8_0 + nb], out);
            }
            Data::Q4_0(v) => {
                let nb = self.cols / QK4_0;
                dequantize_q4_0(&v.as_slice()[s / QK4_0..s / QK4_0 + nb], out);
            }
            Data::Q4K(v) => {
                let nb = self.cols / QK_K;
                dequantize_q4_k(&v.as_slice()[s / QK_K..s / QK_K + nb], out);
            }
            Data::Packed(q, v) => {
                let bs = self.data.block();
                packed::row_to_f32(
                    *q,
                    v.as_slice(),
                    self.stride / bs,
                    self.cols / bs,
                    r,
                    &mut out[..self.cols],
                );
            }
        }
    }
}

#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let cw = w.chunks_exact(8);
    let cx = x.chunks_exact(8);
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for k in 0..8 {
            acc[k] += half::f16::from_bits(a[k]).to_f32() * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += half::f16::from_bits(*a).to_f32() * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_is_a_view() {
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let m = Matrix::from_f32(3, 4, w);
        let n = m.narrow_rows(2).narrow_cols(3);
        let mut y = vec![0.0; 2];
        n.matmul(&[1.0, 1.0, 1.0], 1, &mut y);
        assert_eq!(y, vec![0.0 + 1.0 + 2.0, 4.0 + 5.0 + 6.0]);
    }

    /// The sparse down projection's one-pass gather gives, bit for bit, what adding the
    /// surviving rows one at a time gives, on whole rows and on column parts of 1 to 5
    /// blocks (the kernels' 4-block register tiles and their tails), for every storage.
    #[test]
    fn sparse_axpy_matches_row_by_row() {
        let rows = 40;
        let mut a = crate::test_util::data(rows, 4);
        for (i, v) in a.iter_mut().enumerate() {
            if i % 3 != 0 {
                *v = 0.0; // a sparse activation, as after Gaussian top-k
            }
        }
        for q in QuantType::ALL {
            // Q4_K: whole rows of 3 blocks, one block, and two blocks after the first.
            let cols = if q == QuantType::Q4K { 256 * 3 } else { 32 * 9 };
            let w = crate::test_util::data(rows * cols, 3);
            let m = Matrix::from_f32(rows, cols, w).to_quant(q);
            let block = match q {
                QuantType::Q4K => 256,
                QuantType::Q8_0 | QuantType::Q4_0 => 32,
                _ => 1,
            };
            assert_eq!(m.block_size(), block, "{q} stored as asked");
            let parts: &[(usize, usize)] = if q == QuantType::Q4K {
                &[(0, 768), (256, 256), (256, 512)]
            } else {
                &[
                    (0, 288),
                    (32, 32),
                    (64, 64),
                    (96, 96),
                    (128, 128),
                    (128, 160),
                ]
            };
            for &(c0, n) in parts {
                let y0 = crate::test_util::data(n, 5);
                let mut want = y0.clone();
                for (i, &v) in a.iter().enumerate() {
                    if v != 0.0 {
                        m.axpy_row_part(i, c0, v, &mut want);
                    }
                }
                let mut got = y0.clone();
                m.sparse_axpy(&a, c0, &mut got);
                assert_eq!(got, want, "{q} part {c0}+{n}");
            }
        }
    }
}
