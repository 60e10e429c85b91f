//! Loading the model's parts and controlling their memory: PLE source selection at
//! load, the towers (conditional parameter loading), weight-group paging and the memory
//! report.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use super::control::TowerState;
use super::{Engine, LoadOptions};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::derived::CacheDir;
use crate::error::{EngineError, Result};
use crate::memory::{self, MemoryReport, Part, PartMemory, TextGroups};
use crate::model::TextModel;
use crate::ple_cache::PleCache;
use crate::quant::QuantType;
use crate::residency::{self, Advice, WeightGroup};
use crate::towers::{Modality, Tower, TowerPolicy};

/// Default size of the PLE hot-row cache.
pub const DEFAULT_PLE_HOT_BYTES: usize = 8 << 20;

/// Where the per-layer inputs come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PleMode {
    /// The PLE cache file when `cache_dir` is set, else the checkpoint's table.
    #[default]
    Auto,
    /// The checkpoint's `embed_tokens_per_layer`, mapped (the standard path).
    Table,
    /// The PLE cache file (requires `cache_dir`); built first if missing or stale. A
    /// cache directory that cannot be used or written falls back to the table, with a
    /// warning in [`super::EngineState::warnings`].
    Cache,
}

impl std::str::FromStr for PleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PleMode::Auto),
            "table" => Ok(PleMode::Table),
            "cache" => Ok(PleMode::Cache),
            other => Err(format!("`{other}` is not auto, cache or table")),
        }
    }
}

/// What the engine holds besides the model for memory control.
#[derive(Debug)]
pub(crate) struct MemState {
    pub ckpt: Checkpoint,
    pub cfg: ModelConfig,
    pub quant: QuantType,
    pub groups: TextGroups,
    pub towers: Vec<Tower>,
    pub policy: TowerPolicy,
    /// What the load had to do without (an unusable cache directory), for Status.
    pub warnings: Vec<String>,
}

/// Records and logs that loading goes on without a derived file.
fn degraded(warnings: &mut Vec<String>, cache_dir: &Path, e: &EngineError, warning: String) {
    tracing::warn!(cache_dir = %cache_dir.display(), error = %e, "{warning}");
    warnings.push(warning);
}

/// Loads the text model as `opts` says (PLE source, towers) and returns it with the
/// memory state. Pages the default configuration does not need are dropped.
pub(crate) fn load_parts(
    cfg: &ModelConfig,
    ckpt: Checkpoint,
    opts: &LoadOptions,
) -> Result<(TextModel, MemState)> {
    let groups = TextGroups::new(cfg, &ckpt);
    // No implicit readahead anywhere in the checkpoint: what is needed is prefetched
    // explicitly below, and a fault in one tensor must not pull in its neighbours
    // (towers, the per-layer table).
    for f in &ckpt.files {
        residency::advise(&f.map, 0, f.map.len(), Advice::Random);
    }
    if let (PleMode::Cache, None) = (opts.ple, &opts.cache_dir) {
        return Err(EngineError::InvalidRequest(
            "the PLE cache needs a cache directory (cache_dir)".into(),
        ));
    }
    // An unusable cache directory (read-only, full, someone else's) costs RAM and start
    // time, not the service: everything derived is then computed and kept in memory.
    let mut warnings = Vec::new();
    let dir = match &opts.cache_dir {
        None => None,
        Some(p) => match CacheDir::open(p) {
            Ok(d) => Some(d),
            Err(e) => {
                degraded(
                    &mut warnings,
                    p,
                    &e,
                    format!(
                        "cache_dir {} is unusable ({e}): serving without the PLE cache and \
                         the quantized-weights cache; expect more RAM use and slower starts",
                        p.display()
                    ),
                );
                None
            }
        },
    };
    let use_cache = match opts.ple {
        PleMode::Table => None,
        PleMode::Auto | PleMode::Cache => dir.as_ref(),
    };
    let ple = match use_cache {
        None => None,
        Some(dir) => {
            let hot = opts.ple_hot_bytes.unwrap_or(DEFAULT_PLE_HOT_BYTES);
            let mut last = 0u64;
            let mut log = |done: u64, total: u64| {
                let pct = done * 100 / total.max(1);
                if pct >= last + 5 || done == total {
                    last = pct;
                    tracing::info!(done, total, "building PLE cache: {pct}%");
                }
                ControlFlow::Continue(())
            };
            match PleCache::open_or_build(cfg, &ckpt, dir, opts.ple_dtype, hot, &mut log) {
                Ok(c) => Some(Arc::new(c)),
                Err(e @ EngineError::Cancelled(_)) => return Err(e),
                // The build's partial file is gone (the writer removes it); a fault in the
                // checkpoint itself shows again when the table is loaded below.
                Err(e) => {
                    degraded(
                        &mut warnings,
                        dir.path(),
                        &e,
                        format!(
                            "cache_dir {}: cannot build the PLE cache ({e}); per-layer \
                             inputs come from the checkpoint's table: expect more RAM use",
                            dir.path().display()
                        ),
                    );
                    None
                }
            }
        }
    };
    let serving_from_cache = ple.is_some();
    let (model, weights_warning) = TextModel::load_full(cfg, &ckpt, opts.quant, ple, dir.as_ref())?;
    warnings.extend(weights_warning);
    groups.decoder.prefetch();
    groups.embeddings.prefetch();
    if serving_from_cache {
        groups.ple_table.release();
    }
    let mut state = MemState {
        ckpt,
        cfg: cfg.clone(),
        quant: opts.quant,
        groups,
        towers: Vec::new(),
        policy: opts.tower_policy,
        warnings,
    };
    for m in Modality::ALL {
        if !opts.modalities.contains(&m) {
            state.groups.tower(m).release();
        }
    }
    for &m in &opts.modalities {
        state.load(m)?;
    }
    Ok((model, state))
}

impl MemState {
    pub(crate) fn load(&mut self, m: Modality) -> Result<()> {
        if self.is_loaded(m) {
            return Ok(());
        }
        let t = Tower::load(&self.cfg, &self.ckpt, m)?;
        self.towers.push(t);
        Ok(())
    }

    /// Drops the tower of `m` and its pages; returns whether it was loaded.
    pub(crate) fn unload(&mut self, m: Modality) -> bool {
        match self.towers.iter().position(|t| t.modality == m) {
            Some(i) => {
                self.towers.remove(i).unload();
                true
            }
            None => false,
        }
    }

    fn is_loaded(&self, m: Modality) -> bool {
        self.towers.iter().any(|t| t.modality == m)
    }

    pub(crate) fn tower_state(&self, m: Modality) -> TowerState {
        let g = self.groups.tower(m);
        let loaded = self.is_loaded(m);
        TowerState {
            modality: m,
            available: m.present(&self.cfg) && g.params > 0,
            loaded,
            // mincore counts the page cache, which other readers of the file fill too: an
            // unloaded tower holds nothing of its own.
            bytes: if loaded { g.resident_bytes_inward() } else { 0 },
        }
    }
}

impl Engine {
    /// The PLE cache the engine serves per-layer inputs from, if any.
    pub(crate) fn ple(&self) -> Option<&PleCache> {
        self.model.embed_tokens_per_layer.cache().map(|c| &**c)
    }

    /// Maps, validates and pages in the tower of `m`. Loading a loaded tower is a no-op.
    pub fn load_modality(&mut self, m: Modality) -> Result<()> {
        self.control(&super::Control::LoadTower(m))
    }

    /// Drops the tower of `m` and its pages; returns whether it was loaded.
    pub fn unload_modality(&mut self, m: Modality) -> bool {
        self.mem.unload(m)
    }

    /// The modalities whose tower is loaded.
    pub fn loaded_modalities(&self) -> Vec<Modality> {
        let mut v: Vec<Modality> = self.mem.towers.iter().map(|t| t.modality).collect();
        v.sort();
        v
    }

    pub fn tower_policy(&self) -> TowerPolicy {
        self.mem.policy
    }

    pub fn set_tower_policy(&mut self, p: TowerPolicy) {
        self.mem.policy = p;
    }

    /// A mapped weight group by name: `decoder`, `embeddings`, `ple_table`, `vision`,
    /// `audio`, or `ple_cache` (the cache file's rows).
    pub(crate) fn weight_group(&self, name: &str) -> Option<WeightGroup> {
        let g = &self.mem.groups;
        Some(match name {
            "decoder" => g.decoder.clone(),
            "embeddings" => g.embeddings.clone(),
            "ple_table" => g.ple_table.clone(),
            "vision" => g.vision.clone(),
            "audio" => g.audio.clone(),
            "ple_cache" => {
                let c = self.ple()?;
                let mut w = WeightGroup::new("ple_cache");
                w.params = (c.rows() * c.row_len()) as u64;
                w.push(c.rows_region());
                w
            }
            _ => return None,
        })
    }

    /// Prefetches the PLE cache rows of a prompt before prefill.
    pub(crate) fn prefetch_prompt(&self, ids: &[u32]) {
        if let Some(c) = self.ple() {
            c.prefetch(ids);
        }
    }

    /// Bytes per part, measured from the mappings (`mincore`) and the engine's buffers,
    /// and the process RSS.
    pub fn memory_report(&self) -> MemoryReport {
        let g = &self.mem.groups;
        let m = &self.model;
        let ple = self.ple();
        let mut parts = Vec::new();
        let emb_heap = memory::matrix_heap_bytes(&m.embed_tokens);
        let dec_heap = if self.mem.quant == QuantType::Bf16 {
            // The only derived decoder weights in bf16 mode: the transposed down
            // projections of the activation-sparse layers (heap or weights-cache file).
            m.layers
                .iter()
                .filter_map(|l| l.mlp.down_proj_t.as_ref())
                .map(|d| d.storage_bytes() as u64)
                .sum()
        } else {
            (m.decode_weight_bytes() as u64).saturating_sub(
                (m.embed_tokens.storage_bytes()
                    + m.embed_tokens.row_bytes()
                    + m.embed_tokens_per_layer.row_bytes()) as u64,
            )
        };
        parts.push(memory::group_part(
            Part::Decoder,
            &g.decoder,
            dec_heap,
            true,
        ));
        parts.push(memory::group_part(
            Part::Embeddings,
            &g.embeddings,
            emb_heap,
            true,
        ));
        parts.push(memory::group_part(
            Part::PleTable,
            &g.ple_table,
            0,
            ple.is_none(),
        ));
        let (cache_part, hot_part) = match ple {
            Some(c) => {
                let rows = c.rows_region();
                let st = c.stats();
                (
                    PartMemory {
                        part: Part::PleCache,
                        params: (c.rows() * c.row_len()) as u64,
                        mapped_bytes: rows.len as u64,
                        resident_bytes: c.resident_bytes(),
                        heap_bytes: c.index_bytes(),
                        active: true,
                    },
                    PartMemory {
                        params: st.hot_rows * c.row_len() as u64,
                        heap_bytes: st.hot_bytes,
                        active: st.hot_capacity > 0,
                        ..PartMemory::empty(Part::PleHot)
                    },
                )
            }
            None => (
                PartMemory::empty(Part::PleCache),
                PartMemory::empty(Part::PleHot),
            ),
        };
        parts.push(cache_part);
        parts.push(hot_part);
        for md in Modality::ALL {
            let loaded = self.mem.is_loaded(md);
            parts.push(memory::group_part(Part::Tower(md), g.tower(md), 0, loaded));
        }
        let kv_reserved: usize = self
            .cache
            .layers
            .iter()
            .flatten()
            .map(|l| l.k.bytes() + l.v.bytes())
            .sum();
        parts.push(PartMemory {
            mapped_bytes: kv_reserved as u64,
            heap_bytes: self.cache.bytes_used() as u64,
            active: true,
            ..PartMemory::empty(Part::KvCache)
        });
        parts.push(PartMemory {
            heap_bytes: self.prompt_cache_bytes() as u64,
            active: self.prompts.opts.enabled,
            ..PartMemory::empty(Part::PromptCache)
        });
        // The logits buffer and the activation pool kept between forward passes (the
        // per-thread product scratch is not counted: it is freed after a prefill).
        parts.push(PartMemory {
            heap_bytes: (self.logits.capacity() * 4 + self.cache.scratch_bytes()) as u64,
            active: true,
            ..PartMemory::empty(Part::Scratch)
        });
        let mut resident_params = 0u64;
        for p in &parts {
            if !p.part.holds_params() {
                continue;
            }
            if p.mapped_bytes > 0 {
                let frac = (p.resident_bytes as f64 / p.mapped_bytes as f64).min(1.0);
                resident_params += (p.params as f64 * frac).round() as u64;
            } else if p.heap_bytes > 0 {
                resident_params += p.params;
            }
        }
        let (rss, anon, file) = residency::process_rss();
        MemoryReport {
            parts,
            rss_bytes: rss,
            rss_anon_bytes: anon,
            rss_file_bytes: file,
            resident_params,
            checkpoint_params: self.mem.ckpt.total_params(),
        }
    }
}
