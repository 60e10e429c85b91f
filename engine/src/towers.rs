//! Conditional parameter loading: the vision and audio towers are mapped with the rest of
//! the checkpoint but none of their pages is read until a tower is *loaded*: its tensors
//! are collected and validated and its pages brought in. *Unloading* drops the views and
//! the pages. The towers' compute (MobileNet-V5, the conformer) lands separately; until
//! then a loaded tower is resident but cannot encode.

use std::fmt;
use std::str::FromStr;

use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::residency::{MappedRegion, WeightGroup};

/// A non-text input modality with its own tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    Vision,
    Audio,
}

impl Modality {
    pub const ALL: [Modality; 2] = [Modality::Vision, Modality::Audio];

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Vision => "vision",
            Modality::Audio => "audio",
        }
    }

    /// Checkpoint name prefixes of the tower and its embedder.
    pub fn prefixes(self) -> [&'static str; 2] {
        match self {
            Modality::Vision => ["model.vision_tower.", "model.embed_vision."],
            Modality::Audio => ["model.audio_tower.", "model.embed_audio."],
        }
    }

    pub(crate) fn present(self, cfg: &ModelConfig) -> bool {
        match self {
            Modality::Vision => cfg.has_vision,
            Modality::Audio => cfg.has_audio,
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Modality {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "vision" | "image" => Ok(Modality::Vision),
            "audio" => Ok(Modality::Audio),
            other => Err(format!("unknown modality `{other}` (vision, audio)")),
        }
    }
}

/// What a request needing an unloaded tower gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TowerPolicy {
    /// Load it on demand (the default).
    #[default]
    OnDemand,
    /// Refuse the request with an error saying to load the modality first.
    Refuse,
}

/// The mapped regions and parameter count of every tensor whose name starts with one of
/// `prefixes` (and none of `exclude`), sorted and merged by file position.
pub fn group_of(
    ckpt: &Checkpoint,
    name: &str,
    prefixes: &[&str],
    exclude: &[&str],
) -> (WeightGroup, Vec<String>) {
    let mut names: Vec<String> = ckpt
        .tensor_names()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
        .filter(|n| !exclude.iter().any(|p| n.starts_with(p)))
        .map(str::to_string)
        .collect();
    names.sort();
    let mut g = WeightGroup::new(name);
    for n in &names {
        if let Some(r) = ckpt.region(n) {
            g.params += r.1;
            g.push(r.0);
        }
    }
    g.coalesce();
    (g, names)
}

/// A loaded tower: validated views on all its tensors.
#[derive(Debug)]
pub struct Tower {
    pub modality: Modality,
    pub group: WeightGroup,
    #[expect(dead_code, reason = "for the tower encoders, which have not landed")]
    pub tensors: Vec<TensorView>,
}

impl Tower {
    /// Collects and validates the tower's tensors and faults their pages in.
    pub fn load(cfg: &ModelConfig, ckpt: &Checkpoint, m: Modality) -> Result<Tower> {
        if !m.present(cfg) {
            return Err(EngineError::ModalityUnavailable(format!(
                "the checkpoint at {} has no {m} tower (its config declares none)",
                ckpt.dir.display()
            )));
        }
        let (group, names) = group_of(ckpt, m.as_str(), &m.prefixes(), &[]);
        if names.is_empty() {
            return Err(EngineError::ModalityUnavailable(format!(
                "the checkpoint at {} declares a {m} tower but holds no `{}*` tensors",
                ckpt.dir.display(),
                m.prefixes()[0]
            )));
        }
        let mut tensors = Vec::with_capacity(names.len());
        for n in &names {
            let shape = ckpt.shape(n).map(<[usize]>::to_vec).unwrap_or_default();
            tensors.push(ckpt.get(n, &shape)?);
        }
        group.prefetch();
        group.touch();
        tracing::info!(modality = %m, tensors = tensors.len(), params = group.params,
            bytes = group.bytes(), "tower loaded");
        Ok(Tower {
            modality: m,
            group,
            tensors,
        })
    }

    /// Drops the tower's pages and views.
    pub fn unload(self) {
        self.group.release();
        tracing::info!(modality = %self.modality, "tower unloaded");
    }
}

impl Checkpoint {
    /// The mapped region and element count of tensor `name`.
    pub fn region(&self, name: &str) -> Option<(MappedRegion, u64)> {
        let shape = self.shape(name)?.to_vec();
        let v = self.get(name, &shape).ok()?;
        let numel = v.numel() as u64;
        Some((
            MappedRegion {
                map: v.map.clone(),
                path: v.path.clone(),
                offset: v.start,
                len: v.end - v.start,
            },
            numel,
        ))
    }

    /// Elements of every tensor in the checkpoint.
    pub fn total_params(&self) -> u64 {
        self.tensor_names()
            .filter_map(|n| self.shape(n))
            .map(|s| s.iter().product::<usize>() as u64)
            .sum()
    }
}
