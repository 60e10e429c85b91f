//! Quantized weight formats with ggml's block layouts (Q8_0, Q4_0, Q4_K), activation
//! quantization (Q8_0, Q8_K) and the dot-product kernels that use them.

use std::fmt;
use std::str::FromStr;

/// Storage type for the large weight matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// f32 (converted at load).
    F32,
    /// The checkpoint's own 16-bit storage, read in place (bf16 or f16).
    #[default]
    Bf16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl QuantType {
    /// Every storage type, in declaration order.
    pub const ALL: [QuantType; 5] = [
        QuantType::F32,
        QuantType::Bf16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4K,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::Bf16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4K => "q4_k",
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => QuantType::F32,
            "bf16" | "f16" => QuantType::Bf16,
            "q8_0" | "q8" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_k" | "q4k" => QuantType::Q4K,
            other => {
                return Err(format!(
                    "unknown quant type `{other}` (f32, bf16, q8_0, q4_0, q4_k)"
                ))
            }
        })
    }
}

/// Where a product tile's results go: row `r` (counted from the tile's first row), token
/// `k` at `ptr[r·row_stride + k·tok_stride]`. Tasks of one product write disjoint
/// elements of one exclusively borrowed output through copies of a view.
#[derive(Clone, Copy, Debug)]
pub struct OutView {
    pub ptr: *mut f32,
    pub row_stride: usize,
    pub tok_stride: usize,
}

impl OutView {
    /// The view whose first row is this one's row `r`.
    pub fn at_row(self, r: usize) -> OutView {
        OutView {
            ptr: self.ptr.wrapping_add(r * self.row_stride),
            ..self
        }
    }

    /// Writes element (`r`, `k`).
    ///
    /// # Safety
    /// The element must lie in the output and belong to the calling task alone.
    #[inline(always)]
    pub unsafe fn set(self, r: usize, k: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(r * self.row_stride + k * self.tok_stride) = v };
    }
}

// SAFETY: views are only written through `set` / `packed::tile_into`, whose callers give
// each task a disjoint set of elements.
unsafe impl Send for OutView {}
unsafe impl Sync for OutView {}

pub mod activations;
pub mod blocks;
pub mod kernels;
pub mod kernels_bf16;
pub mod packed;

// The engine logs it and the crate root exports it.
pub use packed::kernels_in_use;
