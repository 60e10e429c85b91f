//! The Gemma 3n text decoder (`Gemma3nTextModel` in modeling_gemma3n.py): loading its
//! weights from a checkpoint and running prefill/decode over a [`KvCache`].
//! Per-layer pieces (AltUp, Laurel, attention, MLP) live in `layer.rs`.

mod altup;
mod attention;
mod laurel;
mod layer;
mod mlp;
pub mod ops;
pub mod per_layer;
pub mod ple_build;
pub(crate) mod scratch;
mod state;

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::{LayerType, ModelConfig, TextConfig};
use crate::derived::CacheDir;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::matformer::{SlicePlan, SliceSpec};
use crate::ple_cache::PleCache;
use crate::quant::QuantType;
use crate::weights::Matrix;
use per_layer::PleSource;
use scratch::Scratch;
use std::sync::Arc;

pub use layer::DecoderLayer;
pub use state::ForwardState;

/// Which positions of a forward pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// The loaded text decoder. Immutable after load; all per-sequence state is in a
/// [`ForwardState`].
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
    /// The whole checkpoint as a MatFormer slice (what `forward` runs).
    pub(crate) full_slice: SlicePlan,
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
    /// Previously quantized matrices to map instead of converting.
    pub store: Option<&'a crate::weights::store::QuantStore>,
    /// Matrices converted here (to be written to the store).
    pub built: std::cell::RefCell<Vec<(String, Matrix)>>,
}

impl Loader<'_> {
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.converted(name, rows, cols, |m| m.to_quant(self.quant).packed())
    }

    /// The transpose (`[cols, rows]`) of the stored `[rows, cols]` matrix, converted.
    pub fn matrix_t(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let key = format!("{name}#t");
        if let Some(m) = self
            .store
            .and_then(|s| s.get(&format!("{}{key}", self.prefix), cols, rows))
        {
            return Ok(m);
        }
        let raw = self.raw_matrix(name, rows, cols)?;
        let m = raw.transposed(self.quant);
        // The source stays mapped (the dense `down_proj` handle) but is never read again.
        crate::memory::unmap_source(&raw, &m);
        if m.stored_bytes().is_some() {
            self.built
                .borrow_mut()
                .push((format!("{}{key}", self.prefix), m.clone()));
        }
        Ok(m)
    }

    fn converted(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        f: impl FnOnce(&Matrix) -> Matrix,
    ) -> Result<Matrix> {
        let full = format!("{}{}", self.prefix, name);
        if let Some(m) = self.store.and_then(|s| s.get(&full, rows, cols)) {
            return Ok(m);
        }
        let raw = self.raw_matrix(name, rows, cols)?;
        let m = f(&raw);
        crate::memory::unmap_source(&raw, &m);
        if m.stored_bytes().is_some() {
            self.built.borrow_mut().push((full, m.clone()));
        }
        Ok(m)
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
        Ok(Self::load_full(cfg, ckpt, quant, ple, None)?.0)
    }

    /// As [`TextModel::load_with_ple`]; with `quant_cache` set and a quantized `quant`,
    /// the quantized weights are mapped from the cache directory when a valid store
    /// exists there, and written there (atomically) when it does not. A store that cannot
    /// be written (read-only or full directory) leaves the weights in memory; the second
    /// value then says so (a warning for the operator, also logged).
    pub fn load_full(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        quant: QuantType,
        ple: Option<Arc<PleCache>>,
        quant_cache: Option<&CacheDir>,
    ) -> Result<(Self, Option<String>)> {
        use crate::weights::store;
        // bf16 stores only what is derived (the transposed sparse down projections), so
        // that it is file-backed rather than anonymous memory.
        let quantized = !matches!(quant, QuantType::F32);
        let target = match quant_cache {
            Some(dir) if quantized => Some((dir, store::store_name(ckpt, quant)?)),
            _ => None,
        };
        let opened = match &target {
            Some((dir, (name, key))) => store::QuantStore::open(dir, name, key, quant),
            None => None,
        };
        if let Some(s) = &opened {
            tracing::info!(path = %s.path.display(), matrices = s.len(), "mapping quantized weights from the cache");
        }
        let model = Self::load_inner(cfg, ckpt, quant, ple, opened.as_ref())?;
        let mut warning = None;
        if let (Some((dir, (name, key))), None) = (&target, &opened) {
            let t0 = std::time::Instant::now();
            match store::write(dir, name, key, quant, &model.0) {
                Ok(()) => {
                    tracing::info!(path = %dir.path_of(name).display(), secs = t0.elapsed().as_secs_f64(), "wrote quantized weights cache")
                }
                Err(e) => {
                    let w = format!(
                        "cache_dir {}: cannot write the quantized-weights cache ({e}); \
                         the {quant} weights are kept in memory instead: expect more RAM \
                         use and slower starts",
                        dir.path().display()
                    );
                    tracing::warn!(cache_dir = %dir.path().display(), error = %e, "{w}");
                    warning = Some(w);
                }
            }
        }
        Ok((model.1, warning))
    }

    fn load_inner(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        quant: QuantType,
        ple: Option<Arc<PleCache>>,
        store: Option<&crate::weights::store::QuantStore>,
    ) -> Result<(Vec<(String, Matrix)>, Self)> {
        let c = &cfg.text;
        let ld = Loader {
            ckpt,
            prefix: cfg.layout.text_prefix(),
            quant,
            store,
            built: Default::default(),
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
        let ple_name = format!("{}embed_tokens_per_layer.weight", ld.prefix);
        let table = ckpt.get(&ple_name, &[c.vocab_size_per_layer_input, l * p])?;
        let embed_tokens_per_layer = match ple {
            None => PleSource::Table(table),
            Some(cache) => {
                if cache.rows() != c.vocab_size_per_layer_input
                    || cache.row_len() != l * p
                    || cache.table_dtype() != table.dtype
                {
                    return Err(EngineError::PleCache {
                        path: cache.path().to_path_buf(),
                        reason: format!(
                            "{} rows of {} values (table {:?}) do not fit this model \
                             ({} × {}, table {:?})",
                            cache.rows(),
                            cache.row_len(),
                            cache.table_dtype(),
                            c.vocab_size_per_layer_input,
                            l * p,
                            table.dtype
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
        let full_slice = SliceSpec::full(c)
            .plan(c, 0)
            .map_err(|reason| EngineError::Config {
                path: cfg.path.clone(),
                reason: format!("the checkpoint's own layer layout is inconsistent: {reason}"),
            })?;
        Ok((
            ld.built.take(),
            TextModel {
                cfg: c.clone(),
                embed_tokens,
                embed_tokens_per_layer,
                per_layer_model_projection,
                per_layer_projection_norm,
                altup_projections,
                altup_unembed_projections,
                norm,
                layers,
                full_slice,
                rope_full: ops::rope_inv_freq(c.rope_theta_full, c.head_dim),
                rope_sliding: ops::rope_inv_freq(c.rope_theta_sliding, c.head_dim),
                eps: c.rms_norm_eps as f32,
            },
        ))
    }

    /// Convenience: config + checkpoint + model from a folder.
    pub fn load_dir(dir: &Path) -> Result<(ModelConfig, Self)> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let m = Self::load(&cfg, &ckpt)?;
        Ok((cfg, m))
    }

    /// A sequence's state with a KV cache for up to `max_len` positions: f16 when the
    /// weights are quantized (its rounding is far below theirs), f32 otherwise (so
    /// f32/bf16 runs keep the reference's precision).
    pub fn new_cache(&self, max_len: usize) -> ForwardState {
        ForwardState::new(KvCache::new(&self.cfg, max_len, self.kv_dtype()))
    }

    /// The element type of this model's KV cache (see [`TextModel::new_cache`]).
    pub fn kv_dtype(&self) -> crate::kv_cache::KvDType {
        use crate::quant::QuantType;
        match self.layers.first().map(|l| l.self_attn.q_proj.quant_type()) {
            Some(QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4K) => {
                crate::kv_cache::KvDType::F16
            }
            _ => crate::kv_cache::KvDType::F32,
        }
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
    ///
    /// The table and raw PLE cache rows go through the same code (the cache only changes
    /// where a row's bytes come from), so both give the same bits. From a precomputed
    /// cache, a text id (`< vocab_size_per_layer_input`) reads its whole vector and its
    /// `embeds` row is not used (for text tokens it is a function of the id); other
    /// positions (multimodal hard and soft tokens) compute the projection part from
    /// `embeds` and take the pad row's token part from the cache.
    pub fn per_layer_inputs(&self, ids: &[u32], embeds: &[f32], out: &mut [f32]) {
        match &self.embed_tokens_per_layer {
            PleSource::Table(table) => {
                self.per_layer_inputs_from_rows(ids, embeds, out, |id, row| {
                    per_layer::table_part(table, &self.cfg, id, row)
                })
            }
            PleSource::Cache { cache, table } if !cache.dtype().precomputed() => {
                let dtype = cache.table_dtype();
                self.per_layer_inputs_from_rows(ids, embeds, out, |id, row| {
                    let read =
                        cache.with_row(id, |b| per_layer::token_part(b, dtype, &self.cfg, row));
                    if read.is_err() {
                        // A corrupt row: the checkpoint's own is the same bytes.
                        per_layer::table_part(table, &self.cfg, id, row);
                    }
                })
            }
            PleSource::Cache { cache, table } => {
                self.per_layer_inputs_precomputed(cache, table, ids, embeds, out)
            }
        }
    }

    /// Projection part for every position, plus the token part that `token(id, row)`
    /// writes (ids outside the per-layer vocabulary, multimodal hard tokens, use the pad
    /// row).
    fn per_layer_inputs_from_rows(
        &self,
        ids: &[u32],
        embeds: &[f32],
        out: &mut [f32],
        mut token: impl FnMut(usize, &mut [f32]),
    ) {
        let c = &self.cfg;
        let t = ids.len();
        let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
        let vocab = c.vocab_size_per_layer_input;
        let pad = c.pad_token_id as usize;
        per_layer::projection_part(
            &self.per_layer_model_projection,
            &self.per_layer_projection_norm,
            self.eps,
            c,
            embeds,
            t,
            out,
        );
        thread_local! {
            // Reused row buffer: the decode loop must not allocate per token.
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        ROW.with(|r| {
            let mut row = r.borrow_mut();
            row.resize(lp, 0.0);
            for (i, &id) in ids.iter().enumerate() {
                let id = if (id as usize) < vocab {
                    id as usize
                } else {
                    pad
                };
                token(id, &mut row);
                per_layer::combine(&mut out[i * lp..(i + 1) * lp], &row);
            }
        });
    }

    /// [`TextModel::per_layer_inputs`] from a cache of precomputed rows.
    fn per_layer_inputs_precomputed(
        &self,
        cache: &PleCache,
        table: &crate::checkpoint::TensorView,
        ids: &[u32],
        embeds: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.cfg;
        let lp = c.num_hidden_layers * c.hidden_size_per_layer_input;
        let h = c.hidden_size;
        let vocab = c.vocab_size_per_layer_input;
        // Positions computed at runtime: (position, Some(id) = table row of a corrupt
        // cache row, None = pad row).
        let mut runtime: Vec<(usize, Option<usize>)> = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id < vocab {
                if cache.read_row(id, &mut out[i * lp..(i + 1) * lp]).is_err() {
                    runtime.push((i, Some(id)));
                }
            } else {
                runtime.push((i, None));
            }
        }
        if runtime.is_empty() {
            return;
        }
        let n = runtime.len();
        let mut x = vec![0.0f32; n * h];
        for (j, &(i, _)) in runtime.iter().enumerate() {
            x[j * h..(j + 1) * h].copy_from_slice(&embeds[i * h..(i + 1) * h]);
        }
        let mut y = vec![0.0f32; n * lp];
        per_layer::projection_part(
            &self.per_layer_model_projection,
            &self.per_layer_projection_norm,
            self.eps,
            c,
            &x,
            n,
            &mut y,
        );
        let mut tok = vec![0.0f32; lp];
        for (j, &(i, row)) in runtime.iter().enumerate() {
            let part: &[f32] = match row {
                Some(id) => {
                    per_layer::table_part(table, c, id, &mut tok);
                    &tok
                }
                None => cache.pad_part(),
            };
            let o = &mut y[j * lp..(j + 1) * lp];
            per_layer::combine(o, part);
            out[i * lp..(i + 1) * lp].copy_from_slice(o);
        }
    }

    /// Runs `ids` at positions `state.len()..` and returns logits (`[n, vocab]` for the
    /// requested positions; softcapped).
    pub fn forward(
        &self,
        ids: &[u32],
        state: &mut ForwardState,
        want: LogitsFor,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_into(ids, state, want, &mut out)?;
        Ok(out)
    }

    /// As [`forward`](Self::forward), writing the logits into `logits` (reused; the
    /// decode loop allocates nothing once buffers are warm).
    pub fn forward_into(
        &self,
        ids: &[u32],
        state: &mut ForwardState,
        want: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_slice_into(ids, state, want, logits, &self.full_slice)
    }

    /// As [`forward_into`](Self::forward_into), running the MatFormer slice `slice` (a
    /// plan made for this model's config): its layers, with its FFN widths. A cache must
    /// see one slice only, from its first position on.
    pub fn forward_slice_into(
        &self,
        ids: &[u32],
        state: &mut ForwardState,
        want: LogitsFor,
        logits: &mut Vec<f32>,
        slice: &SlicePlan,
    ) -> Result<()> {
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
        let needed = state.len() + t;
        if needed > state.max_len() {
            return Err(EngineError::ContextFull {
                needed,
                max: state.max_len(),
            });
        }
        let h = c.hidden_size;
        let mut embeds = state.scratch.take(t * h);
        self.embed(ids, &mut embeds);
        let mut pli = state
            .scratch
            .take(t * c.num_hidden_layers * c.hidden_size_per_layer_input);
        self.per_layer_inputs(ids, &embeds, &mut pli);
        let r = self.forward_embeds_into(&embeds, &pli, state, want, logits, slice);
        state.scratch.give(embeds);
        state.scratch.give(pli);
        r
    }

    /// The decoder from input embeddings `[t, H]` and per-layer inputs `[t, L, P]` on
    /// (the entry point multimodal prompts use).
    pub fn forward_embeds(
        &self,
        embeds: Vec<f32>,
        pli: &[f32],
        state: &mut ForwardState,
        want: LogitsFor,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_embeds_into(&embeds, pli, state, want, &mut out, &self.full_slice)?;
        Ok(out)
    }

    pub fn forward_embeds_into(
        &self,
        embeds: &[f32],
        pli: &[f32],
        state: &mut ForwardState,
        want: LogitsFor,
        logits: &mut Vec<f32>,
        slice: &SlicePlan,
    ) -> Result<()> {
        let ForwardState { cache, scratch: sc } = state;
        let c = &self.cfg;
        let h = c.hidden_size;
        let t = embeds.len() / h;
        let pos0 = cache.len();
        let a = c.altup_num_inputs;

        // AltUp stream initialisation (Gemma3nTextModel.forward).
        let mut streams: [Vec<f32>; 8] = Default::default();
        streams[0] = sc.copy_of(embeds);
        for (i, proj) in self.altup_projections.iter().enumerate() {
            let mut s = sc.take(t * h);
            proj.matmul(embeds, t, &mut s);
            for (row, e) in s.chunks_exact_mut(h).zip(embeds.chunks_exact(h)) {
                let target = ops::mean_sq(e).sqrt();
                let m = ops::mean_sq(row).max(1e-5).sqrt();
                for v in row.iter_mut() {
                    *v = *v * target / m;
                }
            }
            streams[i + 1] = s;
        }

        let ropes = [&self.rope_full, &self.rope_sliding].map(|inv_freq| {
            let mut table = sc.take_for_write(t * c.head_dim);
            ops::rope_table(pos0, t, inv_freq, &mut table);
            table
        });
        let mut result = Ok(());
        for (&li, &ffn) in slice.kept.iter().zip(&slice.ffn) {
            let Some(layer) = self.layers.get(li) else {
                result = Err(EngineError::InvalidRequest(format!(
                    "slice `{}` runs layer {li}, but the model has {} layers",
                    slice.name,
                    self.layers.len()
                )));
                break;
            };
            let rope = match layer.attention_type {
                LayerType::Full => &ropes[0],
                LayerType::Sliding => &ropes[1],
            };
            result = layer.forward(self, ffn, &mut streams[..a], pli, t, pos0, rope, cache, sc);
            if result.is_err() {
                break;
            }
        }
        for table in ropes {
            sc.give(table);
        }
        if result.is_ok() {
            cache.commit(t);
            let (r0, n) = match want {
                LogitsFor::None => (t, 0),
                LogitsFor::Last => (t - 1, 1),
                LogitsFor::All => (0, t),
            };
            // The LM head writes every element: a buffer already this long (each decode
            // step's) is not zeroed first (1 MiB per token).
            logits.truncate(n * c.vocab_size);
            if n > 0 {
                let hidden = self.final_hidden(&streams[..a], r0, n, sc);
                logits.resize(n * c.vocab_size, 0.0);
                self.embed_tokens.matmul(&hidden, n, logits);
                sc.give(hidden);
                if let Some(cap) = c.final_logit_softcapping {
                    // 262k logits per token: vectorized and split over the threads
                    // (scalar `tanhf` on one thread was ~1% of a decode step).
                    let cap = cap as f32;
                    crate::par::chunks_mut(logits, 16384, |_, ch| {
                        ops::wide(
                            #[inline(always)]
                            || ch.iter_mut().for_each(|v| *v = ops::tanh(*v / cap) * cap),
                        )
                    });
                }
            }
        }
        for s in streams.iter_mut().take(a) {
            sc.give(std::mem::take(s));
        }
        result
    }

    /// AltUp unembed, stream average and final norm for token rows `r0..r0+n`.
    fn final_hidden(
        &self,
        streams: &[Vec<f32>],
        r0: usize,
        n: usize,
        sc: &mut Scratch,
    ) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut acc = sc.copy_of(&streams[0][r0 * h..(r0 + n) * h]);
        let mut u = sc.take(n * h);
        for (i, proj) in self.altup_unembed_projections.iter().enumerate() {
            proj.matmul(&streams[i + 1][r0 * h..(r0 + n) * h], n, &mut u);
            for (j, row) in u.chunks_exact(h).enumerate() {
                let target = ops::mean_sq(&streams[0][(r0 + j) * h..(r0 + j + 1) * h]).sqrt();
                let m = ops::mean_sq(row).max(1e-5).sqrt();
                for (a, &v) in acc[j * h..(j + 1) * h].iter_mut().zip(row) {
                    *a += v * target / m;
                }
            }
        }
        sc.give(u);
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
    /// The matrices outside the layers that a decode step reads whole: the AltUp and
    /// unembed projections, the PLE projection unless the PLE cache holds its results
    /// for text tokens, and the tied LM head.
    fn decode_matrices_outside_layers(&self) -> Vec<&Matrix> {
        let mut mats: Vec<&Matrix> = self.altup_projections.iter().collect();
        mats.extend(self.altup_unembed_projections.iter());
        if !self.embed_tokens_per_layer.precomputed() {
            mats.push(&self.per_layer_model_projection);
        }
        mats.push(&self.embed_tokens);
        mats
    }

    /// The weight bytes, as they lie in memory, of every matrix a decode step reads whole
    /// (each storage once): what the bench streams to measure the bandwidth that decode
    /// could reach on these very pages.
    pub fn decode_weight_regions(&self) -> Vec<&[u8]> {
        let mut seen = std::collections::HashSet::new();
        self.layers
            .iter()
            .flat_map(|l| l.dense_decode_matrices())
            .chain(self.decode_matrices_outside_layers())
            .map(|m| m.storage_view())
            .filter(|s| seen.insert(s.as_ptr() as usize))
            .collect()
    }

    /// Bytes of weights one decode step reads: every layer's matrices (KV-shared layers
    /// skip k/v), the matrices outside the layers, one embedding row and one PLE row.
    /// The benchmark's roofline figure divides by this.
    pub fn decode_weight_bytes(&self) -> usize {
        self.decode_weight_bytes_slice(&self.full_slice)
    }

    /// As [`decode_weight_bytes`](Self::decode_weight_bytes) for a MatFormer slice: its
    /// layers at its FFN widths.
    pub fn decode_weight_bytes_slice(&self, slice: &SlicePlan) -> usize {
        let layers: usize = slice
            .kept
            .iter()
            .zip(&slice.ffn)
            .filter_map(|(&l, &w)| self.layers.get(l).map(|x| x.weight_bytes_per_token_at(w)))
            .sum();
        let outside: usize = self
            .decode_matrices_outside_layers()
            .iter()
            .map(|m| m.storage_bytes())
            .sum();
        layers + outside + self.embed_tokens.row_bytes() + self.embed_tokens_per_layer.row_bytes()
    }
}

impl TextModel {
    /// The whole checkpoint as a slice.
    pub fn full_slice(&self) -> &SlicePlan {
        &self.full_slice
    }

    /// The FFN width granularity of a slice of these weights: 32 (a block of Q8_0/Q4_0
    /// and a multiple of the packed layout's 16-row groups), 256 where a dense
    /// `down_proj` is stored as Q4_K (its column prefix must be whole super-blocks).
    pub fn slice_block(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.mlp.down_proj_t.is_none())
            .map(|l| l.mlp.down_proj.block_size())
            .fold(32, usize::max)
    }

    /// Checks `spec` against this model and derives its plan.
    pub fn plan_slice(&self, spec: &SliceSpec) -> std::result::Result<SlicePlan, String> {
        spec.plan(&self.cfg, self.slice_block())
    }

    /// Drops from this process the mapped weight pages that `slice` does not read:
    /// skipped layers whole, and the FFN neurons past each kept layer's width. The page
    /// cache keeps them (a clean, reclaimable copy), so a larger slice faults them back
    /// in on first use. Weights held in owned memory (no cache directory for quantized
    /// weights) stay.
    pub fn release_outside(&self, slice: &SlicePlan) {
        for (m, rows, cols) in self.release_jobs(slice) {
            m.advise_outside(rows, cols, crate::residency::Advice::Unmap);
        }
    }

    /// The matrices `slice` reads less of than they hold, each with the prefix
    /// (`rows`, `cols`) it reads (views share the storage; cloning is cheap).
    pub(crate) fn release_jobs(&self, slice: &SlicePlan) -> Vec<(Matrix, usize, usize)> {
        let mut jobs = Vec::new();
        for layer in &self.layers {
            let width = slice
                .kept
                .iter()
                .position(|&l| l == layer.layer_idx)
                .map(|i| slice.ffn[i]);
            let Some(w) = width else {
                for m in layer.dense_decode_matrices() {
                    jobs.push((m.clone(), 0, 0));
                }
                if let Some(dt) = &layer.mlp.down_proj_t {
                    jobs.push((dt.clone(), 0, 0));
                }
                continue;
            };
            let mlp = &layer.mlp;
            if w >= mlp.gate_proj.rows {
                continue;
            }
            jobs.push((mlp.gate_proj.clone(), w, mlp.gate_proj.cols));
            jobs.push((mlp.up_proj.clone(), w, mlp.up_proj.cols));
            match &mlp.down_proj_t {
                Some(dt) => jobs.push((dt.clone(), w, dt.cols)),
                None => jobs.push((mlp.down_proj.clone(), mlp.down_proj.rows, w)),
            }
        }
        jobs
    }
}
