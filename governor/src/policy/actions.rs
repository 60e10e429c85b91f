//! A tier's settings → concrete actions, with the slice resolved against the engine's
//! slice table.

use std::fmt;

use super::config::{SliceChoice, TierSettings};
use super::Tier;

/// The slice every checkpoint has: the whole model.
pub const FULL_SLICE: &str = "full";

/// A change for the daemon to apply. [`super::Policy::actions`] returns a tier's complete
/// set, so applying it from any state reaches the tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Serve this MatFormer slice; `force` (only in `critical`) switches even mid-request.
    SetSlice { name: String, force: bool },
    /// Unload the vision and audio towers.
    UnloadTowers,
    /// The towers may be loaded (again) on demand.
    AllowTowers,
    /// The PLE hot-row cache budget, bytes (0: off).
    SetPleHotBytes(usize),
    /// Cap the context at this many tokens (`None`: the configured context).
    LimitContext(Option<usize>),
    /// Cap the compute threads (`None`: the configured threads).
    LimitThreads(Option<usize>),
    /// Admit background-priority requests or refuse them.
    AdmitBackground(bool),
    /// Drop the K/V states the prompt cache keeps in RAM.
    DropPromptCache,
}

/// Bytes for people: `8 MiB`, `512 KiB`, `100 B`.
fn bytes(b: usize) -> String {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if b >= size {
            return if (b / size) * size == b {
                format!("{} {unit}", b / size)
            } else {
                format!("{:.1} {unit}", b as f64 / size as f64)
            };
        }
    }
    format!("{b} B")
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::SetSlice { name, force } => {
                write!(f, "slice {name}")?;
                if *force {
                    f.write_str(" (forced)")?;
                }
                Ok(())
            }
            Action::UnloadTowers => f.write_str("unload towers"),
            Action::AllowTowers => f.write_str("allow towers"),
            Action::SetPleHotBytes(0) => f.write_str("PLE hot rows off"),
            Action::SetPleHotBytes(b) => write!(f, "PLE hot rows {}", bytes(*b)),
            Action::LimitContext(Some(n)) => write!(f, "context ≤ {n} tokens"),
            Action::LimitContext(None) => f.write_str("context uncapped"),
            Action::LimitThreads(Some(n)) => write!(f, "threads ≤ {n}"),
            Action::LimitThreads(None) => f.write_str("threads uncapped"),
            Action::AdmitBackground(true) => f.write_str("admit background"),
            Action::AdmitBackground(false) => f.write_str("refuse background"),
            Action::DropPromptCache => f.write_str("drop prompt cache"),
        }
    }
}

/// The slice `s` asks for among `slices` (name, parameters). `full` is always the slice
/// named `full`; `smallest` the one with the fewest parameters; `auto` the largest one
/// with at most `auto_fraction` of full's parameters (full's: the slice named `full`, else
/// the largest), the smallest one when none is that small. An empty table gives `full`;
/// a named slice is passed as it is (the engine refuses one it does not have). Ties go to
/// the name that sorts first.
pub(crate) fn resolve_slice(s: &TierSettings, slices: &[(String, u64)]) -> String {
    let smallest = || {
        slices
            .iter()
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            .map(|(n, _)| n.clone())
    };
    match &s.slice {
        SliceChoice::Full => FULL_SLICE.into(),
        SliceChoice::Named(n) => n.clone(),
        SliceChoice::Smallest => smallest().unwrap_or_else(|| FULL_SLICE.into()),
        SliceChoice::Auto => {
            let full = slices
                .iter()
                .find(|(n, _)| n == FULL_SLICE)
                .or_else(|| slices.iter().max_by_key(|(_, p)| *p))
                .map(|(_, p)| *p);
            let Some(full) = full else {
                return FULL_SLICE.into();
            };
            let budget = full as f64 * s.auto_fraction.clamp(0.0, 1.0);
            slices
                .iter()
                .filter(|(_, p)| *p as f64 <= budget)
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
                .map(|(n, _)| n.clone())
                .or_else(smallest)
                .unwrap_or_else(|| FULL_SLICE.into())
        }
    }
}

/// `s` as actions for `tier`: admission first, then what frees memory, the slice last
/// (a switch drops the KV cache).
pub(crate) fn actions(tier: Tier, s: &TierSettings, slices: &[(String, u64)]) -> Vec<Action> {
    let mut v = vec![
        Action::AdmitBackground(s.admit_background),
        if s.towers {
            Action::AllowTowers
        } else {
            Action::UnloadTowers
        },
    ];
    if !s.prompt_cache {
        v.push(Action::DropPromptCache);
    }
    if let Some(b) = s.ple_hot_bytes {
        v.push(Action::SetPleHotBytes(b));
    }
    v.push(Action::LimitContext(s.max_context));
    v.push(Action::LimitThreads(s.max_threads));
    v.push(Action::SetSlice {
        name: resolve_slice(s, slices),
        force: tier == Tier::Critical,
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(bytes(8 << 20), "8 MiB");
        assert_eq!(bytes(1536 << 10), "1.5 MiB");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3 GiB");
    }
}
