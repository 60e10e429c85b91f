//! Typed control of a loaded engine: the commands an owner (admin requests, the
//! governor) may send, when each may be applied, and the state the engine reports back.

use std::fmt;
use std::sync::atomic::Ordering;

use super::{check_context, new_pool, Engine};
use crate::error::{EngineError, Result};
use crate::quant::QuantType;
use crate::towers::Modality;

/// The name of the slice that is the whole checkpoint.
pub const FULL_SLICE: &str = crate::matformer::FULL;

/// A change to the running engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Map, validate and page in a tower (between requests: it reads hundreds of MB).
    LoadTower(Modality),
    /// Drop a tower and its pages.
    UnloadTower(Modality),
    /// Drop the PLE cache file's pages and its hot rows (they come back on demand).
    ReleasePlePages,
    /// Bytes of the in-RAM hot-row cache in front of the PLE cache file (0 disables it).
    SetPleHotBytes(usize),
    /// Context length in tokens, at most the model's (between requests: the KV cache is
    /// reallocated).
    LimitContext(usize),
    /// Compute threads of the forward pass (between requests).
    LimitThreads(usize),
    /// Run the MatFormer slice of this name from now on. Between requests unless
    /// `force` (memory critical): then a running generation re-prefills on the new slice
    /// at its next step and goes on.
    SetSlice { name: String, force: bool },
    /// Keep the K/V state of the prompt `ids` warm for later requests that start with it
    /// (a system prompt, a document): prefilled now, pinned in the prompt cache (evicted
    /// last), owned by `user` or `shared` with every user, and written to the disk tier
    /// when `persist` (between requests: it prefills).
    CachePrompt {
        ids: Vec<u32>,
        user: Option<u32>,
        shared: bool,
        persist: bool,
    },
    /// Unpin and drop the pinned prompt `key` (every one when empty) of `user`, or of
    /// anyone when `admin`, with its file.
    DropCachedPrompt {
        key: String,
        user: Option<u32>,
        admin: bool,
    },
    /// Drop every K/V state the prompt cache keeps in RAM (memory pressure); files stay.
    DropPromptCache,
}

impl Control {
    /// Whether the command may be applied between two decode steps of a generation;
    /// the others wait until it ends.
    pub fn safe_mid_request(&self) -> bool {
        matches!(
            self,
            Control::UnloadTower(_)
                | Control::ReleasePlePages
                | Control::SetPleHotBytes(_)
                | Control::SetSlice { force: true, .. }
                | Control::DropCachedPrompt { .. }
                | Control::DropPromptCache
        )
    }
}

impl fmt::Display for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Control::LoadTower(m) => write!(f, "load the {m} tower"),
            Control::UnloadTower(m) => write!(f, "unload the {m} tower"),
            Control::ReleasePlePages => f.write_str("release the PLE cache pages"),
            Control::SetPleHotBytes(b) => write!(f, "set the PLE hot-row budget to {b} bytes"),
            Control::LimitContext(n) => write!(f, "limit the context to {n} tokens"),
            Control::LimitThreads(n) => write!(f, "limit compute threads to {n}"),
            Control::SetSlice { name, force } => {
                write!(f, "switch to slice `{name}`")?;
                if *force {
                    f.write_str(" (forced)")?;
                }
                Ok(())
            }
            Control::CachePrompt { ids, shared, .. } => {
                write!(f, "cache a prompt of {} tokens", ids.len())?;
                if *shared {
                    f.write_str(" (shared)")?;
                }
                Ok(())
            }
            Control::DropCachedPrompt { key, .. } if key.is_empty() => {
                f.write_str("drop the cached prompts")
            }
            Control::DropCachedPrompt { key, .. } => write!(f, "drop cached prompt {key}"),
            Control::DropPromptCache => f.write_str("drop the prompt cache"),
        }
    }
}

/// A tower as the engine sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TowerState {
    pub modality: Modality,
    /// The checkpoint has the tower's weights.
    pub available: bool,
    pub loaded: bool,
    /// Bytes of the tower's weights in RAM now (0 while it is not loaded).
    pub bytes: u64,
}

/// What can change while the engine serves, as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineState {
    pub towers: Vec<TowerState>,
    pub max_context: usize,
    pub threads: usize,
    pub quant: QuantType,
    /// The product kernels in use (`avx512-vnni`, `avx2`, `neon-dotprod`, ...).
    pub kernels: &'static str,
    /// The configured instruction-set cap and packing (load options).
    pub isa: crate::quant::kernels::IsaChoice,
    pub pack: bool,
    /// The PLE hot-row budget in bytes, when per-layer inputs come from the cache file.
    pub ple_hot_bytes: Option<usize>,
    /// A generation is in flight (between its start and its last step).
    pub generating: bool,
    /// The active MatFormer slice (`full`: the checkpoint as loaded).
    pub slice: String,
    /// Parameters the active slice runs, embeddings left out (see
    /// [`crate::SliceInfo::params`]).
    pub slice_params: u64,
    /// Every slice on offer, the active one marked.
    pub slices: Vec<crate::SliceInfo>,
    /// What the engine serves without and why (e.g. an unwritable cache directory: no
    /// PLE cache, weights in memory), for the operator. Empty when all is as configured.
    pub warnings: Vec<String>,
    /// The prompt cache: bytes against its budgets, hits, pinned prompts.
    pub prompt_cache: crate::PromptCacheState,
}

impl Engine {
    /// Applies `c`. Commands that are not [`Control::safe_mid_request`] are refused while
    /// a generation is in flight.
    pub fn control(&mut self, c: &Control) -> Result<()> {
        if self.active.is_some() && !c.safe_mid_request() {
            return Err(EngineError::InvalidRequest(format!(
                "cannot {c} while a generation runs; it applies between requests"
            )));
        }
        match c {
            Control::LoadTower(m) => self.mem.load(*m)?,
            Control::UnloadTower(m) => {
                self.mem.unload(*m);
            }
            Control::ReleasePlePages => {
                if let Some(p) = self.ple() {
                    p.release();
                }
            }
            Control::SetPleHotBytes(b) => match self.ple() {
                Some(p) => p.set_hot_capacity(*b),
                None => {
                    return Err(EngineError::InvalidRequest(
                        "there is no PLE hot-row cache: per-layer inputs come from the \
                         checkpoint's table (set a cache directory to use the PLE cache)"
                            .into(),
                    ))
                }
            },
            Control::LimitContext(n) => {
                let n = check_context(&self.cfg, Some(*n), self.model.kv_dtype())?;
                if n != self.cache.max_len() {
                    self.forget_live();
                    self.cache = self.model.new_cache(n);
                    self.max_context.store(n, Ordering::Relaxed);
                }
            }
            Control::LimitThreads(n) => {
                let n = *n;
                if n == 0 {
                    return Err(EngineError::InvalidRequest(
                        "threads must be at least 1".into(),
                    ));
                }
                if n != self.threads {
                    self.pool = new_pool(n)?;
                    self.threads = n;
                }
            }
            Control::SetSlice { name, force } => self.switch_slice(name, *force)?,
            Control::CachePrompt {
                ids,
                user,
                shared,
                persist,
            } => self.pin_prompt(ids, *user, *shared, *persist)?,
            Control::DropCachedPrompt { key, user, admin } => {
                let n = self.drop_pinned(key, *user, *admin);
                if n == 0 && !key.is_empty() {
                    return Err(EngineError::InvalidRequest(format!(
                        "no cached prompt `{key}` that this caller may drop"
                    )));
                }
            }
            Control::DropPromptCache => self.drop_prompt_cache(),
        }
        tracing::info!(command = %c, "engine control applied");
        Ok(())
    }

    /// The engine's state now (tower bytes are counted from page residency).
    pub fn state(&self) -> EngineState {
        EngineState {
            towers: Modality::ALL
                .iter()
                .map(|&m| self.mem.tower_state(m))
                .collect(),
            max_context: self.cache.max_len(),
            threads: self.threads,
            quant: self.mem.quant,
            kernels: crate::quant::kernels_in_use(),
            isa: crate::quant::kernels::choice(),
            pack: crate::quant::kernels::pack(),
            ple_hot_bytes: self.ple().map(|p| p.stats().hot_capacity as usize),
            generating: self.active.is_some(),
            slice: self.active_slice().into(),
            slice_params: self.slice.effective_params(&self.cfg.text),
            slices: self.slices(),
            warnings: self.mem.warnings.clone(),
            prompt_cache: self.prompt_cache_state(),
        }
    }
}
