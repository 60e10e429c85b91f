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

pub mod activations;
pub mod blocks;
pub mod kernels;
pub mod kernels_bf16;
pub mod packed;
pub mod store;
