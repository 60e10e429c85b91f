//! The Gemma 3n text decoder (`Gemma3nTextModel` in modeling_gemma3n.py): loading its
//! weights from a checkpoint and running prefill/decode over a [`KvCache`].
//! Per-layer pieces (AltUp, Laurel, attention, MLP) live in `layer.rs`.

mod layer;
pub mod ops;

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::{LayerType, ModelConfig, TextConfig};
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::ple_cache::{PleCache, PleSource};
use crate::quant::QuantType;
use crate::weights::Matrix;
use std::sync::Arc;

pub use layer::DecoderLayer;

/// Which positions of a forward pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// The loaded text decoder. Immutable after load; all per-sequence state is in the cache.
#[derive(Debug)]
pub struct TextModel {
    pub cfg: TextConfig,
    pub embed_tokens: Matrix,
    /// Per-layer embedding table, or the PLE cache that replaces it while serving.
    pub embed_tokens_per_layer: PleSource,
    pub per_layer_model_projection: Matrix,
    pub per_layer_projection_norm: Vec<f32>,
    pub altup_projections: Vec<Matrix>,
    pub altup_unembed_projections: Vec<Matrix>,
    pub norm: Vec<f32>,
    pub layers: Vec<DecoderLayer>,
    pub(crate) rope_full: Vec<f32>,
    pub(crate) rope_sliding: Vec<f32>,
    pub(crate) eps: f32,
}

/// Reads tensors of the text decoder under one name prefix, checking shapes.
pub(crate) struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub prefix: &'static str,
    /// Storage type for the matrices (`matrix`); `raw_matrix` keeps the checkpoint's.
    pub quant: QuantType,
}

impl Loader<'_> {
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(self.raw_matrix(name, rows, cols)?.to_quant(self.quant))
    }

    /// The matrix as stored in the checkpoint (mapped in place where possible).
    pub fn raw_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let full = format!("{}{}", self.prefix, name);
        let t = self.ckpt.get(&full, &[rows, cols])?;
        Matrix::from_view(&t)
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let full = format!("{}{}", self.prefix, name);
        Ok(self.ckpt.get(&full, &[len])?.to_f32_vec())
    }
}

impl TextModel {
    /// Loads the text decoder of the checkpoint in `dir` (config already parsed).
    pub fn load(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Self> {
        Self::load_quant(cfg, ckpt, QuantType::Bf16)
    }

    /// Loads with the large matrices stored as `quant` (quantized once, here).
    pub fn load_quant(cfg: &ModelConfig, ckpt: &Checkpoint, quant: QuantType) -> Result<Self> {
        Self::load_with_ple(cfg, ckpt, quant, None)
    }

    /// As [`TextModel::load_quant`]; with `ple` set, per-layer inputs of text tokens come
    /// from the PLE cache and no page of the checkpoint's per-layer table is read.
    pub fn load_with_ple(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        quant: QuantType,
        ple: Option<Arc<PleCache>>,
    ) -> Result<Self> {
        let c = &cfg.text;
        let ld = Loader {
            ckpt,
            prefix: cfg.layout.text_prefix(),
            quant,
        };
        if ckpt.contains(&format!("{}embed_tokens.weight", ld.prefix)) {
            // fine
        } else if cfg.layout == crate::config::Layout::TextOnly
            && ckpt.contains("model.language_model.embed_tokens.weight")
        {
            return Err(EngineError::Config {
                path: cfg.path.clone(),
                reason: "config is text-only (gemma3n_text) but tensors use the multimodal \
                         `model.language_model.*` layout"
                    .into(),
            });
        }
        let h = c.hidden_size;
        let l = c.num_hidden_layers;
        let p = c.hidden_size_per_layer_input;
        let embed_tokens = ld.matrix("embed_tokens.weight", c.vocab_size, h)?;
        let embed_tokens_per_layer = match ple {
            None => PleSource::Table(ld.raw_matrix(
                "embed_tokens_per_layer.weight",
                c.vocab_size_per_layer_input,
                l * p,
            )?),
            Some(cache) => {
                let name = format!("{}embed_tokens_per_layer.weight", ld.prefix);
                let table = ckpt.get(&name, &[c.vocab_size_per_layer_input, l * p])?;
                if cache.rows() != c.vocab_size_per_layer_input || cache.row_len() != l * p {
                    return Err(EngineError::PleCache {
                        path: cache.path().to_path_buf(),
                        reason: format!(
                            "{} rows of {} values do not fit this model ({} × {})",
                            cache.rows(),
                            cache.row_len(),
                            c.vocab_size_per_layer_input,
                            l * p
                        ),
                    });
                }
                PleSource::Cache { cache, table }
            }
        };
        let per_layer_model_projection =
            ld.matrix("per_layer_model_projection.weight", l * p, h)?;
        let per_layer_projection_norm = ld.vector("per_layer_projection_norm.weight", p)?;
        let n_extra = c.altup_num_inputs - 1;
        let altup_projections = (0..n_extra)
            .map(|i| ld.matrix(&format!("altup_projections.{i}.weight"), h, h))
            .collect::<Result<Vec<_>>>()?;
        let altup_unembed_projections = (0..n_extra)
            .map(|i| ld.matrix(&format!("altup_unembed_projections.{i}.weight"), h, h))
            .collect::<Result<Vec<_>>>()?;
        let norm = ld.vector("norm.weight", h)?;
        let layers = (0..l)
            .map(|i| DecoderLayer::load(&ld, c, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            cfg: c.clone(),
            embed_tokens,
            embed_tokens_per_layer,
            per_layer_model_projection,
            per_layer_projection_norm,
            altup_projections,
            altup_unembed_projections,
            norm,
            layers,
            rope_full: ops::rope_inv_freq(c.rope_theta_full, c.head_dim),
            rope_sliding: ops::rope_inv_freq(c.rope_theta_sliding, c.head_dim),
            eps: c.rms_norm_eps as f32,
        })
    }

    /// Convenience: config + checkpoint + model from a folder.
    pub fn load_dir(dir: &Path) -> Result<(ModelConfig, Self)> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let m = Self::load(&cfg, &ckpt)?;
        Ok((cfg, m))
    }

    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(&self.cfg, max_len)
    }

    /// Scaled input embeddings `[t, H]` (`embed_tokens[id] · √H`).
    pub fn embed(&self, ids: &[u32], out: &mut [f32]) {
        let h = self.cfg.hidden_size;
        let scale = (h as f64).sqrt() as f32;
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut out[i * h..(i + 1) * h];
            self.embed_tokens.row_to_f32(id as usize, row);
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }

    /// Per-layer inputs `[t, L, P]` from the ids (token part) and the input embeddings
    /// (projection part), as `Gemma3nTextModel.project_per_layer_inputs`.
    pub fn per_layer_inputs(&self, ids: &[u32], embeds: &[f32], out: &mut [f32]) {
        let c = &self.cfg;
        let t = ids.len();
        let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
        let p = c.hidden_size_per_layer_input;
        self.per_layer_model_projection.matmul(embeds, t, out);
        let proj_scale = (c.hidden_size as f64).powf(-0.5) as f32;
        for v in out.iter_mut() {
            *v *= proj_scale;
        }
        ops::rms_norm(out, p, Some(&self.per_layer_projection_norm), self.eps);
        let tok_scale = (p as f64).sqrt() as f32;
        let input_scale = std::f64::consts::FRAC_1_SQRT_2 as f32;
        let mut row = vec![0.0f32; lp];
        for (i, &id) in ids.iter().enumerate() {
            // Ids outside the per-layer vocabulary (multimodal hard tokens) use the pad row.
            let id = if (id as usize) < c.vocab_size_per_layer_input {
                id as usize
            } else {
                c.pad_token_id as usize
            };
            self.embed_tokens_per_layer.row_to_f32(id, &mut row);
            for (o, &tok) in out[i * lp..(i + 1) * lp].iter_mut().zip(&row) {
                *o = (*o + tok * tok_scale) * input_scale;
            }
        }
    }

    /// Runs `ids` at positions `cache.len()..` and returns logits (`[n, vocab]` for the
    /// requested positions; softcapped).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, want: LogitsFor) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let t = ids.len();
        if t == 0 {
            return Err(EngineError::InvalidRequest("empty token sequence".into()));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        let needed = cache.len() + t;
        if needed > cache.max_len() {
            return Err(EngineError::ContextFull {
                needed,
                max: cache.max_len(),
            });
        }
        let h = c.hidden_size;
        let mut embeds = vec![0.0f32; t * h];
        self.embed(ids, &mut embeds);
        let mut pli = vec![0.0f32; t * c.num_hidden_layers * c.hidden_size_per_layer_input];
        self.per_layer_inputs(ids, &embeds, &mut pli);
        self.forward_embeds(embeds, &pli, cache, want)
    }

    /// The decoder from input embeddings and per-layer inputs on (the entry point that
    /// multimodal prompts and the PLE cache will use).
    pub fn forward_embeds(
        &self,
        embeds: Vec<f32>,
        pli: &[f32],
        cache: &mut KvCache,
        want: LogitsFor,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let t = embeds.len() / h;
        let pos0 = cache.len();

        // AltUp stream initialisation (Gemma3nTextModel.forward).
        let mut streams: Vec<Vec<f32>> = Vec::with_capacity(c.altup_num_inputs);
        let mut tmp = vec![0.0f32; t * h];
        let target: Vec<f32> = embeds
            .chunks_exact(h)
            .map(|r| ops::mean_sq(r).sqrt())
            .collect();
        for proj in &self.altup_projections {
            proj.matmul(&embeds, t, &mut tmp);
            let mut s = tmp.clone();
            for (i, row) in s.chunks_exact_mut(h).enumerate() {
                let m = ops::mean_sq(row).max(1e-5).sqrt();
                for v in row.iter_mut() {
                    *v = *v * target[i] / m;
                }
            }
            streams.push(s);
        }
        streams.insert(0, embeds);

        let mut chunk_kv: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; c.num_hidden_layers];
        for (li, layer) in self.layers.iter().enumerate() {
            let inv_freq = match c.layer_types[li] {
                LayerType::Full => &self.rope_full,
                LayerType::Sliding => &self.rope_sliding,
            };
            layer.forward(
                self,
                li,
                &mut streams,
                pli,
                t,
                pos0,
                inv_freq,
                cache,
                &mut chunk_kv,
            )?;
        }
        for (li, kv) in chunk_kv.iter().enumerate() {
            if let Some((k, v)) = kv {
                cache.write(li, k, v, t);
            }
        }
        cache.advance(t);

        let rows: Vec<usize> = match want {
            LogitsFor::None => return Ok(Vec::new()),
            LogitsFor::Last => vec![t - 1],
            LogitsFor::All => (0..t).collect(),
        };
        let hidden = self.final_hidden(&streams, &rows);
        let n = rows.len();
        let mut logits = vec![0.0f32; n * c.vocab_size];
        self.embed_tokens.matmul(&hidden, n, &mut logits);
        if let Some(cap) = c.final_logit_softcapping {
            let cap = cap as f32;
            for v in logits.iter_mut() {
                *v = (*v / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }

    /// AltUp unembed, stream average and final norm for the given token rows.
    fn final_hidden(&self, streams: &[Vec<f32>], rows: &[usize]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let n = rows.len();
        let mut s0 = vec![0.0f32; n * h];
        for (j, &r) in rows.iter().enumerate() {
            s0[j * h..(j + 1) * h].copy_from_slice(&streams[0][r * h..(r + 1) * h]);
        }
        let mut acc = s0.clone();
        let target: Vec<f32> = s0.chunks_exact(h).map(|r| ops::mean_sq(r).sqrt()).collect();
        let mut x = vec![0.0f32; n * h];
        let mut u = vec![0.0f32; n * h];
        for (i, proj) in self.altup_unembed_projections.iter().enumerate() {
            for (j, &r) in rows.iter().enumerate() {
                x[j * h..(j + 1) * h].copy_from_slice(&streams[i + 1][r * h..(r + 1) * h]);
            }
            proj.matmul(&x, n, &mut u);
            for (j, row) in u.chunks_exact(h).enumerate() {
                let m = ops::mean_sq(row).max(1e-5).sqrt();
                for (a, &v) in acc[j * h..(j + 1) * h].iter_mut().zip(row) {
                    *a += v * target[j] / m;
                }
            }
        }
        let k = self.cfg.altup_num_inputs as f32;
        for v in acc.iter_mut() {
            *v /= k;
        }
        ops::rms_norm(&mut acc, h, Some(&self.norm), self.eps);
        acc
    }
}

impl Loader<'_> {
    /// A small 2-D parameter widened to f32, row-major.
    pub fn vector_2d(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let full = format!("{}{}", self.prefix, name);
        Ok(self.ckpt.get(&full, &[rows, cols])?.to_f32_vec())
    }
}

impl TextModel {
    /// Bytes of weights one decode step reads: every layer's matrices (KV-shared layers
    /// skip k/v), the AltUp/unembed projections, one embedding row, one PLE row and the
    /// tied LM head. The benchmark's roofline figure divides by this.
    pub fn decode_weight_bytes(&self) -> usize {
        let mut b = 0usize;
        for l in &self.layers {
            b += l.weight_bytes_per_token();
        }
        for m in self
            .altup_projections
            .iter()
            .chain(&self.altup_unembed_projections)
        {
            b += m.storage_bytes();
        }
        b += self.per_layer_model_projection.storage_bytes();
        b += self.embed_tokens.row_bytes() + self.embed_tokens_per_layer.row_bytes();
        b += self.embed_tokens.storage_bytes(); // tied LM head
        b
    }
}
