//! The MatFormer slices an engine offers and the one it runs: the catalogue (the whole
//! checkpoint, the built-in table for E4B-shaped checkpoints, a slicing file), switching
//! between requests or, forced, in the middle of one, and giving back the pages a
//! smaller slice no longer reads.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Engine;
use crate::error::{EngineError, Result};
use crate::matformer::{self, SlicePlan, SliceSpec, FULL};
use crate::model::TextModel;
use crate::weights::Matrix;

/// One slice on offer, checked against the loaded model.
#[derive(Clone, Debug)]
pub(crate) struct Offered {
    pub spec: SliceSpec,
    pub plan: Arc<SlicePlan>,
}

/// A slice as the engine lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    pub name: String,
    pub active: bool,
    /// Layers the slice runs.
    pub layers: usize,
    /// FFN width of each layer it runs, in order.
    pub ffn_widths: Vec<usize>,
    /// Parameters of the text model it runs, embeddings left out (Google's "effective
    /// parameters").
    pub params: u64,
    /// The figure the slicing file states for it, in billions, if any.
    pub stated_params_b: Option<f64>,
}

/// The slices of `model`: `full` first, then the built-in table (E4B-shaped checkpoints),
/// then the slicing file's rows (a row named like a built-in one replaces it). A row that
/// does not fit this checkpoint is an error naming the file, the row and the reason.
pub(crate) fn catalogue(
    model: &TextModel,
    config_path: &Path,
    file: Option<&Path>,
) -> Result<Vec<Offered>> {
    let c = &model.cfg;
    // `builtin_slices` starts with the whole checkpoint.
    let mut specs = matformer::builtin_slices(c);
    if let Some(path) = file {
        let bad = |reason: String| EngineError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read the slicing file: {e}")))?;
        for spec in matformer::parse_configs_csv(&text).map_err(bad)? {
            if spec.name == FULL {
                return Err(bad(format!(
                    "a slice may not be named `{FULL}` (the whole checkpoint)"
                )));
            }
            specs.retain(|s| s.name != spec.name);
            specs.push(spec);
        }
    }
    specs
        .into_iter()
        .map(|spec| {
            let plan = if spec.name == FULL {
                model.full_slice().clone()
            } else {
                model
                    .plan_slice(&spec)
                    .map_err(|reason| EngineError::Config {
                        path: file.unwrap_or(config_path).to_path_buf(),
                        reason: format!(
                            "slice `{}` does not fit this checkpoint: {reason}",
                            spec.name
                        ),
                    })?
            };
            Ok(Offered {
                spec,
                plan: Arc::new(plan),
            })
        })
        .collect()
}

/// The plan of the slice named `name` in `offered`; `None` for `auto` or empty (the
/// caller's default). An unknown name is an error listing the ones on offer.
pub(crate) fn named(offered: &[Offered], name: &str) -> Result<Option<Arc<SlicePlan>>> {
    if name.is_empty() || name == "auto" {
        return Ok(None);
    }
    match offered.iter().find(|o| o.spec.name == name) {
        Some(o) => Ok(Some(o.plan.clone())),
        None => {
            let names: Vec<&str> = offered.iter().map(|o| o.spec.name.as_str()).collect();
            Err(EngineError::InvalidRequest(format!(
                "`{name}` is not a slice of this model; it offers: {}",
                names.join(", ")
            )))
        }
    }
}

impl Engine {
    /// The slices this engine offers, with the active one marked.
    pub fn slices(&self) -> Vec<SliceInfo> {
        let c = &self.model.cfg;
        self.slices
            .iter()
            .map(|o| SliceInfo {
                name: o.spec.name.clone(),
                active: o.spec.name == self.slice.name,
                layers: o.plan.kept.len(),
                ffn_widths: o.plan.ffn.clone(),
                params: o.plan.effective_params(c),
                stated_params_b: o.spec.stated_params_b,
            })
            .collect()
    }

    /// Bytes of weights one decode step of the active slice reads (see
    /// `TextModel::decode_weight_bytes`): what the decode roofline divides by.
    pub fn decode_weight_bytes(&self) -> usize {
        self.model.decode_weight_bytes_slice(&self.slice)
    }

    /// The active slice's name.
    pub fn active_slice(&self) -> &str {
        &self.slice.name
    }

    /// The plan of the slice named `name` (`auto` or empty: the active one).
    pub(crate) fn find_slice(&self, name: &str) -> Result<Arc<SlicePlan>> {
        Ok(named(&self.slices, name)?.unwrap_or_else(|| self.slice.clone()))
    }

    /// Makes `name` the active slice. The KV cache is dropped (hidden states differ per
    /// slice); with `force` while a generation runs, its next step re-prefills its
    /// tokens so far on the new slice and goes on. Pages the new slice does not read are
    /// given back on a background thread, so the switch itself costs microseconds.
    pub(crate) fn switch_slice(&mut self, name: &str, force: bool) -> Result<()> {
        let plan = self.find_slice(name)?;
        if plan.name == self.slice.name {
            return Ok(());
        }
        if self.active.is_some() {
            if !force {
                return Err(EngineError::InvalidRequest(format!(
                    "cannot switch to slice `{name}` while a generation runs unless forced; \
                     it applies between requests"
                )));
            }
            self.reprefill = true;
        }
        self.cache.clear();
        self.prompt_cache_slice_switched(&plan.name);
        self.slice = plan;
        self.release_unused_async();
        Ok(())
    }

    /// Gives back now the mapped weight pages the active slice does not read (something
    /// else read them: a benchmark's bandwidth probe, a request on a larger slice).
    pub fn release_unused(&self) {
        self.model.release_outside(&self.slice);
    }

    /// Gives back, on the page-release thread, the mapped weight pages the active slice
    /// does not read (see [`TextModel::release_outside`]).
    pub(crate) fn release_unused_async(&mut self) {
        let jobs = self.model.release_jobs(&self.slice);
        let epoch = self.releaser.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        if jobs.is_empty() {
            return;
        }
        if let Err(e) = self.releaser.send(epoch, jobs) {
            tracing::warn!(error = %e, "no page-release thread; releasing inline");
            self.model.release_outside(&self.slice);
        }
    }
}

type ReleaseJobs = Vec<(Matrix, usize, usize)>;

/// The page-release thread: started once, so that a switch only sends it a message.
/// (Starting a thread per switch maps its stack, which waits for the mm lock that a
/// running release holds: measured up to 75 ms for a switch.) A newer switch supersedes
/// a release in progress, which stops at its next matrix.
pub(crate) struct Releaser {
    epoch: Arc<AtomicU64>,
    tx: Option<std::sync::mpsc::Sender<(u64, ReleaseJobs)>>,
}

impl Releaser {
    pub(crate) fn new() -> Self {
        Releaser {
            epoch: Arc::new(AtomicU64::new(0)),
            tx: None,
        }
    }

    fn send(&mut self, epoch: u64, jobs: ReleaseJobs) -> std::io::Result<()> {
        if self.tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<(u64, ReleaseJobs)>();
            let current = self.epoch.clone();
            std::thread::Builder::new()
                .name("gemmad-release".into())
                .spawn(move || {
                    while let Ok((epoch, jobs)) = rx.recv() {
                        let t0 = std::time::Instant::now();
                        let mut done = 0;
                        for (m, rows, cols) in &jobs {
                            if current.load(Ordering::Relaxed) != epoch {
                                break;
                            }
                            m.advise_outside(*rows, *cols, crate::residency::Advice::Unmap);
                            done += 1;
                        }
                        tracing::debug!(
                            matrices = done,
                            of = jobs.len(),
                            secs = t0.elapsed().as_secs_f64(),
                            "released weight pages outside the slice"
                        );
                    }
                })?;
            self.tx = Some(tx);
        }
        match &self.tx {
            Some(tx) => tx
                .send((epoch, jobs))
                .map_err(|_| std::io::Error::other("the page-release thread has ended")),
            None => Err(std::io::Error::other("no page-release thread")),
        }
    }
}
