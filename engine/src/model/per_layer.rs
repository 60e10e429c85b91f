//! Per-layer inputs (`Gemma3nTextModel.project_per_layer_inputs`): the math shared by the
//! forward pass and the PLE cache build, and where a loaded model takes them from.

use std::sync::Arc;

use super::ops;
use crate::checkpoint::{DType, TensorView};
use crate::config::TextConfig;
use crate::ple_cache::PleCache;
use crate::weights::{bf16_to_f32, Matrix};

/// The projection part of the per-layer inputs for `t` input embeddings
/// (`RMSNorm_P(W · E · H^-0.5)`, `[t, L·P]`).
pub(crate) fn projection_part(
    proj: &Matrix,
    norm: &[f32],
    eps: f32,
    c: &TextConfig,
    embeds: &[f32],
    t: usize,
    out: &mut [f32],
) {
    proj.matmul(embeds, t, out);
    let proj_scale = (c.hidden_size as f64).powf(-0.5) as f32;
    for v in out.iter_mut() {
        *v *= proj_scale;
    }
    ops::rms_norm(out, c.hidden_size_per_layer_input, Some(norm), eps);
}

/// `out = (out + tok_scaled) · 2^-0.5` for one position (`tok_scaled` = 16·PLE row).
#[inline]
pub(crate) fn combine(out: &mut [f32], tok_scaled: &[f32]) {
    let input_scale = std::f64::consts::FRAC_1_SQRT_2 as f32;
    for (o, &t) in out.iter_mut().zip(tok_scaled) {
        *o = (*o + t) * input_scale;
    }
}

/// The token part `√P · row` of one raw `embed_tokens_per_layer` row (`L·P` values of
/// `dtype`, little-endian, as the checkpoint stores them) widened to f32. The one place
/// this is computed: the table path and the PLE cache's raw rows both come here, so their
/// per-layer inputs are the same bits.
pub(crate) fn token_part(raw: &[u8], dtype: DType, c: &TextConfig, out: &mut [f32]) {
    let tok_scale = (c.hidden_size_per_layer_input as f64).sqrt() as f32;
    match dtype {
        DType::F32 => {
            for (o, ch) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) * tok_scale;
            }
        }
        DType::BF16 => {
            for (o, ch) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([ch[0], ch[1]])) * tok_scale;
            }
        }
        DType::F16 => {
            for (o, ch) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([ch[0], ch[1]])).to_f32() * tok_scale;
            }
        }
    }
}

/// The raw bytes of row `id` (`< vocab_size_per_layer_input`) of the checkpoint table.
pub(crate) fn table_row(table: &TensorView, id: usize, lp: usize) -> &[u8] {
    let rb = lp * table.dtype.size();
    &table.bytes()[id * rb..(id + 1) * rb]
}

/// [`token_part`] of row `id` of the checkpoint table (`out`: `L·P` values).
pub(crate) fn table_part(table: &TensorView, c: &TextConfig, id: usize, out: &mut [f32]) {
    token_part(table_row(table, id, out.len()), table.dtype, c, out);
}

/// Where the decoder's per-layer inputs come from.
#[derive(Clone, Debug)]
pub enum PleSource {
    /// The checkpoint's `embed_tokens_per_layer` table, mapped (the standard path).
    Table(TensorView),
    /// The PLE cache file. `table` is the checkpoint tensor, kept only as a view (no page
    /// of it is read) for rows that fail their checksum. With raw rows (the default)
    /// the per-layer inputs are the table path's bits; with precomputed rows they are
    /// read whole and the projection is skipped for text tokens.
    Cache {
        cache: Arc<PleCache>,
        table: TensorView,
    },
}

impl PleSource {
    /// Bytes read per token from this source (one row).
    pub fn row_bytes(&self) -> usize {
        match self {
            PleSource::Table(t) => t.shape.get(1).map_or(0, |&n| n * t.dtype.size()),
            PleSource::Cache { cache, .. } => cache.header().row_bytes as usize,
        }
    }

    pub fn cache(&self) -> Option<&Arc<PleCache>> {
        match self {
            PleSource::Table(_) => None,
            PleSource::Cache { cache, .. } => Some(cache),
        }
    }

    /// The mapped checkpoint table, when serving from it.
    pub fn table(&self) -> Option<&TensorView> {
        match self {
            PleSource::Table(t) => Some(t),
            PleSource::Cache { .. } => None,
        }
    }

    /// Whether text tokens read whole precomputed per-layer inputs (no projection).
    pub fn precomputed(&self) -> bool {
        self.cache().is_some_and(|c| c.dtype().precomputed())
    }
}
