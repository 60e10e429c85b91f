//! The policy: ordered tiers with enter/leave thresholds (hysteresis) and a minimum dwell
//! time, and what each tier does (slice, towers, PLE hot rows, context and thread caps,
//! background admission).
//!
//! # How the tier moves
//!
//! Each sample ([`Policy::observe`]) every signal with a reading demands a tier through
//! its *enter* thresholds; the desired tier is the highest demand.
//!
//! - **Up** (more constrained) is immediate, straight to the desired tier: safety first.
//! - **Down** (relaxing) needs both: no signal *holds* the current tier any more (its
//!   leave threshold is the enter threshold moved by the margin toward the safe side),
//!   and the minimum dwell has passed. The dwell counts from entering the tier or from the
//!   last sample whose readings demanded the tier again, whichever is later, so a reading
//!   that keeps re-crossing the enter threshold keeps the tier. The policy then relaxes
//!   one tier and starts the dwell again.
//! - A missing reading (`None`, NaN, a zero `MemTotal`, an unset trip) never raises a
//!   tier, and holds none either.
//! - A pin ([`Policy::pin`]) overrides the readings until unpinned. Pinning and unpinning
//!   take effect at the next `observe`, which reports the change; on unpin the readings'
//!   enter thresholds decide afresh (no dwell).
//!
//! # Signals and defaults (`[governor.policy.*]`, see `governor/policy.defaults.toml`)
//!
//! | Signal | balanced | saver | critical | leave margin |
//! |---|---|---|---|---|
//! | `MemAvailable` % of `MemTotal` (`memory.available_*_pct`) | < 20 | < 10 | < 5 | +5 points |
//! | PSI memory `some avg10` (`memory.psi_some_*`) | > 10 | > 20 | > 40 | −5 |
//! | PSI memory `full avg10` (`memory.psi_full_*`) | > 5 | > 10 | > 20 | −3 |
//! | a PSI trigger fired and the `some` total grew since the last sample (`memory.psi_event`) | yes | | | (dwell) |
//! | cgroup `memory.current` / tighter of `memory.high`, `memory.max` (`cgroup.*_ratio`) | ≥ 0.8 | ≥ 0.9 | ≥ 0.97 | −0.05 |
//! | new `high`/`max` / `oom`/`oom_kill` event in `memory.events` (`cgroup.high_event`, `cgroup.oom_event`) | | | that sample | (dwell) |
//! | trip headroom = trip − temp, °C (`heat.*_headroom_c`) | ≤ 10 | ≤ 3 | ≤ −5 (5 °C over) | +3 °C |
//! | `cpufreq_ratio` (`heat.cpufreq_*_ratio`) | off (idle cores read low) | off | | +0.1 |
//! | on battery (`power.on_battery`) | yes | | | (dwell) |
//! | battery %, on battery only (`power.battery_*_pct`) | | ≤ 20 | ≤ 5 | +5 points |
//! | battery `capacity_level`, on battery only (`power.level_low`, `power.level_critical`); UPower's `WarningLevel` instead when it runs | | `Low` / low | `Critical` / critical, action | (dwell) |
//!
//! `min_dwell_ms` = 30000 (per tier: `tiers.<tier>.min_dwell_ms`).
//!
//! Sources: systemd-oomd kills at `full avg10`-like 60 % for 30 s, earlyoom warns at 10 %
//! and kills at 5 % available memory, UPower's `PercentageLow=20`/`PercentageCritical=5`;
//! the passive trip is where the kernel starts capping frequencies.
//!
//! # Tier defaults (`[governor.policy.tiers.<tier>]`)
//!
//! | | full | balanced | saver | critical |
//! |---|---|---|---|---|
//! | `slice` | `full` | `auto` (≤ 75 % of full's params) | `auto` (≤ 50 %) | `smallest`, forced |
//! | `towers` | true | true | false (unload) | false (unload) |
//! | `ple_hot_bytes` | 8 MiB | 8 MiB | 2 MiB | 0 (off) |
//! | `max_context` | none | none | 8192 | 2048 |
//! | `max_threads` | none | none | 2 | 1 |
//! | `admit_background` | true | true | false | false |
//! | `prompt_cache` (keep K/V states in RAM) | true | true | false (drop) | false (drop) |
//!
//! `auto` picks the largest slice with at most `auto_fraction` of `full`'s parameters;
//! with the official E4B table (3.98 B) that is E2.98B for `balanced` (≤ 2.985 B) and
//! E1.96B for `saver` (≤ 1.99 B); with only `full` it is `full`.

mod actions;
mod config;
mod signals;

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::sensors::Readings;

pub use actions::{Action, FULL_SLICE};
pub use config::{
    CgroupThresholds, ConfigError, HeatThresholds, MemoryThresholds, PolicyConfig, PowerThresholds,
    SliceChoice, TierSettings, Tiers, ENGINE_PLE_HOT_BYTES,
};

use signals::{num, EventCounters, Verdict};

/// The tiers, from no constraint to the most constrained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Full,
    Balanced,
    Saver,
    Critical,
}

impl Tier {
    /// Every tier, least constrained first.
    pub const ALL: [Tier; 4] = [Tier::Full, Tier::Balanced, Tier::Saver, Tier::Critical];

    /// The lowercase name (`full`, `balanced`, `saver`, `critical`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Full => "full",
            Tier::Balanced => "balanced",
            Tier::Saver => "saver",
            Tier::Critical => "critical",
        }
    }

    /// The next less constrained tier (`full` stays `full`).
    pub fn relaxed(self) -> Tier {
        match self {
            Tier::Full | Tier::Balanced => Tier::Full,
            Tier::Saver => Tier::Balanced,
            Tier::Critical => Tier::Saver,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not a tier.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier {0:?} (one of full, balanced, saver, critical)")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;

    fn from_str(s: &str) -> Result<Tier, UnknownTier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownTier(s.to_string()))
    }
}

/// A change of tier and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: Tier,
    pub to: Tier,
    /// For people, e.g. "MemAvailable 4.1% < 5%".
    pub reasons: Vec<String>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} → {}: {}",
            self.from,
            self.to,
            self.reasons.join("; ")
        )
    }
}

/// The policy's state. Deterministic: time comes in with each sample.
#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    tier: Tier,
    /// When the current tier was entered (`None` before the first sample).
    entered_ms: Option<u64>,
    /// The dwell counts from here: entering the tier or the last sample that demanded it.
    dwell_from_ms: Option<u64>,
    /// The pin asked for and the pin in force (they differ until the next sample).
    pin_wanted: Option<Tier>,
    pin_active: Option<Tier>,
    events: EventCounters,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(PolicyConfig::default())
    }
}

impl Policy {
    /// A policy in `full`.
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            tier: Tier::Full,
            entered_ms: None,
            dwell_from_ms: None,
            pin_wanted: None,
            pin_active: None,
            events: EventCounters::default(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The current tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The pin in force (a pin asked for takes force at the next [`Policy::observe`]).
    pub fn pinned(&self) -> Option<Tier> {
        self.pin_active
    }

    /// When the current tier was entered, ms on the `observe` clock.
    pub fn entered_ms(&self) -> Option<u64> {
        self.entered_ms
    }

    /// Pins the tier (`Some`), overriding the readings, or unpins (`None`). Takes effect,
    /// and reports the transition, at the next [`Policy::observe`].
    pub fn pin(&mut self, tier: Option<Tier>) {
        self.pin_wanted = tier;
    }

    /// One sample at `now_ms` (any monotonic clock in milliseconds). Returns the
    /// transition when the tier changes.
    pub fn observe(&mut self, now_ms: u64, r: &Readings) -> Option<Transition> {
        if self.entered_ms.is_none() {
            self.entered_ms = Some(now_ms);
            self.dwell_from_ms = Some(now_ms);
        }
        // Counted every sample, pinned or not: an event is news once.
        let new = self.events.update(r);
        let verdicts = signals::evaluate(&self.cfg, r, new);
        let demand = verdicts
            .iter()
            .filter_map(|v| v.enter.as_ref().map(|e| e.0))
            .max()
            .unwrap_or(Tier::Full);

        if self.pin_wanted != self.pin_active {
            self.pin_active = self.pin_wanted;
            return match self.pin_active {
                Some(p) => self.go(
                    now_ms,
                    p,
                    vec![format!("pinned to {p} by an administrator")],
                ),
                None => {
                    let mut reasons = vec!["unpinned: the readings decide".to_string()];
                    reasons.extend(enter_reasons(&verdicts, demand));
                    self.go(now_ms, demand, reasons)
                }
            };
        }
        if self.pin_active.is_some() {
            return None;
        }

        if demand > self.tier {
            return self.go(now_ms, demand, enter_reasons(&verdicts, demand));
        }
        if demand == self.tier {
            self.dwell_from_ms = Some(now_ms);
            return None;
        }
        let held = verdicts
            .iter()
            .filter_map(|v| v.hold.as_ref().map(|h| h.0))
            .max()
            .unwrap_or(Tier::Full);
        if held >= self.tier {
            return None;
        }
        let dwell = self.cfg.dwell_ms(self.tier);
        let quiet = now_ms.saturating_sub(self.dwell_from_ms.unwrap_or(now_ms));
        if quiet < dwell {
            return None;
        }
        let from = self.tier;
        let to = from.relaxed();
        let in_tier = now_ms.saturating_sub(self.entered_ms.unwrap_or(now_ms));
        let mut reasons = vec![format!(
            "nothing holds {from}; {from} for {} s, not demanded for {} s ≥ min dwell {} s",
            num(in_tier as f64 / 1000.0),
            num(quiet as f64 / 1000.0),
            num(dwell as f64 / 1000.0)
        )];
        if held == to {
            reasons.extend(
                verdicts
                    .iter()
                    .filter_map(|v| v.hold.as_ref())
                    .filter(|h| h.0 == to)
                    .map(|h| format!("{to} held: {}", h.1)),
            );
        } else {
            reasons.push(format!(
                "readings allow {held}; relaxing one tier at a time"
            ));
        }
        self.go(now_ms, to, reasons)
    }

    /// Moves to `to` (nothing when already there).
    fn go(&mut self, now_ms: u64, to: Tier, reasons: Vec<String>) -> Option<Transition> {
        if to == self.tier {
            return None;
        }
        let from = self.tier;
        self.tier = to;
        self.entered_ms = Some(now_ms);
        self.dwell_from_ms = Some(now_ms);
        Some(Transition { from, to, reasons })
    }

    /// `tier`'s settings as concrete actions, the slice resolved against `slices` (name,
    /// parameters, as the engine lists them). The set is complete: the daemon applies it
    /// on every transition. Order: background admission, towers, PLE hot rows, context,
    /// threads, then the slice (`force` only in `critical`).
    pub fn actions(&self, tier: Tier, slices: &[(String, u64)]) -> Vec<Action> {
        actions::actions(tier, self.cfg.tiers.get(tier), slices)
    }
}

/// The enter reasons of the signals that demand `tier`.
fn enter_reasons(verdicts: &[Verdict], tier: Tier) -> Vec<String> {
    verdicts
        .iter()
        .filter_map(|v| v.enter.as_ref())
        .filter(|e| e.0 == tier)
        .map(|e| e.1.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_and_order() {
        let names: Vec<String> = Tier::ALL.iter().map(Tier::to_string).collect();
        assert_eq!(names, ["full", "balanced", "saver", "critical"]);
        assert!(Tier::ALL.windows(2).all(|w| w[0] < w[1]));
        for t in Tier::ALL {
            assert_eq!(t.name().parse::<Tier>(), Ok(t));
        }
        assert!("Full".parse::<Tier>().is_err());
        assert_eq!(Tier::Critical.relaxed(), Tier::Saver);
        assert_eq!(Tier::Full.relaxed(), Tier::Full);
    }

    #[test]
    fn defaults_are_valid() {
        PolicyConfig::default().validate().unwrap();
    }

    #[test]
    fn validate_catches_nonsense() {
        let mut c = PolicyConfig::default();
        c.memory.available_saver_pct = Some(30.0);
        c.cgroup.margin = -0.1;
        c.tiers.saver.max_threads = Some(0);
        c.tiers.balanced.auto_fraction = 1.5;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("memory.available_*_pct: thresholds must fall"),
            "{e}"
        );
        assert!(e.contains("cgroup.*_ratio: the margin -0.1"), "{e}");
        assert!(e.contains("tiers.saver.max_threads 0"), "{e}");
        assert!(e.contains("tiers.balanced.auto_fraction 1.5"), "{e}");
    }

    #[test]
    fn first_sample_starts_the_clock() {
        let mut p = Policy::default();
        assert_eq!(p.observe(5_000, &Readings::default()), None);
        assert_eq!(p.entered_ms(), Some(5_000));
        assert_eq!(p.tier(), Tier::Full);
    }
}
