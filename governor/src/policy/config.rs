//! `[governor.policy]`: the thresholds of every signal and what each tier does. Every key
//! has a default (see the table in [`crate::policy`] and `governor/policy.defaults.toml`);
//! unknown keys are refused. A threshold or tier that may be absent (`Option`) is turned
//! off with the string `"none"` (TOML has no null).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};

use super::Tier;

/// `[governor.policy]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Minimum time, milliseconds, before the policy relaxes out of a tier: counted from
    /// entering the tier or from the last sample whose readings demanded it again,
    /// whichever is later. A tier's own `min_dwell_ms` overrides it. Default 30000.
    pub min_dwell_ms: u64,
    /// System memory: MemAvailable and PSI (`[governor.policy.memory]`).
    pub memory: MemoryThresholds,
    /// The service's cgroup (`[governor.policy.cgroup]`).
    pub cgroup: CgroupThresholds,
    /// Heat: thermal trip headroom and cpufreq (`[governor.policy.heat]`).
    pub heat: HeatThresholds,
    /// Power supply (`[governor.policy.power]`).
    pub power: PowerThresholds,
    /// What each tier does (`[governor.policy.tiers.<tier>]`).
    pub tiers: Tiers,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_dwell_ms: 30_000,
            memory: MemoryThresholds::default(),
            cgroup: CgroupThresholds::default(),
            heat: HeatThresholds::default(),
            power: PowerThresholds::default(),
            tiers: Tiers::default(),
        }
    }
}

/// `[governor.policy.memory]`. A tier is entered when its threshold is crossed and held
/// until the reading is `margin` past it on the safe side (hysteresis).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryThresholds {
    /// `MemAvailable` as a percentage of `MemTotal` below which `balanced` is entered.
    /// Default 20.
    #[serde(deserialize_with = "none_or")]
    pub available_balanced_pct: Option<f64>,
    /// ... below which `saver` is entered (earlyoom warns at 10). Default 10.
    #[serde(deserialize_with = "none_or")]
    pub available_saver_pct: Option<f64>,
    /// ... below which `critical` is entered (earlyoom kills at 5). Default 5.
    #[serde(deserialize_with = "none_or")]
    pub available_critical_pct: Option<f64>,
    /// Percentage points above an enter threshold needed to leave its tier. Default 5.
    pub available_margin_pct: f64,
    /// PSI memory `some avg10` (percent of time some task stalled) above which `balanced`
    /// is entered. Default 10.
    #[serde(deserialize_with = "none_or")]
    pub psi_some_balanced: Option<f64>,
    /// ... above which `saver` is entered. Default 20.
    #[serde(deserialize_with = "none_or")]
    pub psi_some_saver: Option<f64>,
    /// ... above which `critical` is entered. Default 40.
    #[serde(deserialize_with = "none_or")]
    pub psi_some_critical: Option<f64>,
    /// Points below an enter threshold of `some avg10` needed to leave its tier. Default 5.
    pub psi_some_margin: f64,
    /// PSI memory `full avg10` (percent of time all tasks stalled) above which `balanced`
    /// is entered. Default 5.
    #[serde(deserialize_with = "none_or")]
    pub psi_full_balanced: Option<f64>,
    /// ... above which `saver` is entered. Default 10.
    #[serde(deserialize_with = "none_or")]
    pub psi_full_saver: Option<f64>,
    /// ... above which `critical` is entered (systemd-oomd kills at 60 for 30 s).
    /// Default 20.
    #[serde(deserialize_with = "none_or")]
    pub psi_full_critical: Option<f64>,
    /// Points below an enter threshold of `full avg10` needed to leave its tier. Default 3.
    pub psi_full_margin: f64,
    /// The tier a PSI trigger event demands for that sample (the kernel saw 200 ms of
    /// stall in 2 s, about `some avg10` 10 as a short burst), when the `some` total
    /// confirms it grew. Default "balanced".
    #[serde(deserialize_with = "none_or")]
    pub psi_event: Option<Tier>,
}

impl Default for MemoryThresholds {
    fn default() -> Self {
        MemoryThresholds {
            available_balanced_pct: Some(20.0),
            available_saver_pct: Some(10.0),
            available_critical_pct: Some(5.0),
            available_margin_pct: 5.0,
            psi_some_balanced: Some(10.0),
            psi_some_saver: Some(20.0),
            psi_some_critical: Some(40.0),
            psi_some_margin: 5.0,
            psi_full_balanced: Some(5.0),
            psi_full_saver: Some(10.0),
            psi_full_critical: Some(20.0),
            psi_full_margin: 3.0,
            psi_event: Some(Tier::Balanced),
        }
    }
}

/// `[governor.policy.cgroup]`: the service's own cgroup. The ratio is `memory.current`
/// over the tighter of `memory.high` and `memory.max` (no limit: no signal).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupThresholds {
    /// Ratio at or above which `balanced` is entered. Default 0.8.
    #[serde(deserialize_with = "none_or")]
    pub balanced_ratio: Option<f64>,
    /// Ratio at or above which `saver` is entered. Default 0.9.
    #[serde(deserialize_with = "none_or")]
    pub saver_ratio: Option<f64>,
    /// Ratio at or above which `critical` is entered. Default 0.97.
    #[serde(deserialize_with = "none_or")]
    pub critical_ratio: Option<f64>,
    /// How far below an enter ratio the ratio must fall to leave its tier. Default 0.05.
    pub margin: f64,
    /// The tier a new `high` or `max` event in `memory.events` (the cgroup went over
    /// `memory.high` or reclaimed at `memory.max` since the last sample) demands for that
    /// sample. Default "critical".
    #[serde(deserialize_with = "none_or")]
    pub high_event: Option<Tier>,
    /// The tier a new `oom` or `oom_kill` event demands for that sample. Default
    /// "critical".
    #[serde(deserialize_with = "none_or")]
    pub oom_event: Option<Tier>,
}

impl Default for CgroupThresholds {
    fn default() -> Self {
        CgroupThresholds {
            balanced_ratio: Some(0.8),
            saver_ratio: Some(0.9),
            critical_ratio: Some(0.97),
            margin: 0.05,
            high_event: Some(Tier::Critical),
            oom_event: Some(Tier::Critical),
        }
    }
}

/// `[governor.policy.heat]`. Headroom is the trip temperature of the sensors' trip point
/// (the zone's first passive trip, else hot, else critical) minus the temperature, °C;
/// negative above the trip. A trip at or below 0 °C is "unset" and gives no signal.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeatThresholds {
    /// Headroom at or below which `balanced` is entered (10 °C below the trip).
    /// Default 10.
    #[serde(deserialize_with = "none_or")]
    pub balanced_headroom_c: Option<f64>,
    /// Headroom at or below which `saver` is entered (3 °C below the trip or above it).
    /// Default 3.
    #[serde(deserialize_with = "none_or")]
    pub saver_headroom_c: Option<f64>,
    /// Headroom at or below which `critical` is entered: -5 = 5 °C above the trip, i.e.
    /// passive cooling is not holding. Default -5.
    #[serde(deserialize_with = "none_or")]
    pub critical_headroom_c: Option<f64>,
    /// Degrees of extra headroom needed to leave a tier. Default 3.
    pub headroom_margin_c: f64,
    /// `cpufreq_ratio` (lowest current/maximum frequency) below which `balanced` is
    /// entered. Default "none": idle cores of a laptop sit near their lowest clock, so
    /// the lowest ratio is no throttling signal; set e.g. 0.6 on a board that runs its
    /// cores flat out.
    #[serde(deserialize_with = "none_or")]
    pub cpufreq_balanced_ratio: Option<f64>,
    /// ... below which `saver` is entered. Default "none".
    #[serde(deserialize_with = "none_or")]
    pub cpufreq_saver_ratio: Option<f64>,
    /// How far above an enter ratio the ratio must rise to leave its tier. Default 0.1.
    pub cpufreq_margin: f64,
}

impl Default for HeatThresholds {
    fn default() -> Self {
        HeatThresholds {
            balanced_headroom_c: Some(10.0),
            saver_headroom_c: Some(3.0),
            critical_headroom_c: Some(-5.0),
            headroom_margin_c: 3.0,
            cpufreq_balanced_ratio: None,
            cpufreq_saver_ratio: None,
            cpufreq_margin: 0.1,
        }
    }
}

/// `[governor.policy.power]`, after UPower's defaults (`PercentageLow=20`,
/// `PercentageCritical=5`). The battery's charge and level count only on battery.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowerThresholds {
    /// The tier running on battery demands. Default "balanced".
    #[serde(deserialize_with = "none_or")]
    pub on_battery: Option<Tier>,
    /// Charge, percent, at or below which `saver` is entered (UPower's low). Default 20.
    #[serde(deserialize_with = "none_or")]
    pub battery_saver_pct: Option<f64>,
    /// Charge at or below which `critical` is entered (UPower's critical). Default 5.
    #[serde(deserialize_with = "none_or")]
    pub battery_critical_pct: Option<f64>,
    /// Percentage points above an enter threshold needed to leave its tier. Default 5.
    pub battery_margin_pct: f64,
    /// The tier the battery's `capacity_level` `Low` demands. Default "saver".
    #[serde(deserialize_with = "none_or")]
    pub level_low: Option<Tier>,
    /// The tier `capacity_level` `Critical` demands. Default "critical".
    #[serde(deserialize_with = "none_or")]
    pub level_critical: Option<Tier>,
}

impl Default for PowerThresholds {
    fn default() -> Self {
        PowerThresholds {
            on_battery: Some(Tier::Balanced),
            battery_saver_pct: Some(20.0),
            battery_critical_pct: Some(5.0),
            battery_margin_pct: 5.0,
            level_low: Some(Tier::Saver),
            level_critical: Some(Tier::Critical),
        }
    }
}

/// Which MatFormer slice a tier serves. In TOML a string: `"full"`, `"smallest"`,
/// `"auto"` or a slice's name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum SliceChoice {
    /// The whole checkpoint (the slice named `full`).
    Full,
    /// The slice with the fewest parameters.
    Smallest,
    /// The largest slice with at most the tier's `auto_fraction` of `full`'s parameters
    /// (the smallest slice when none is that small).
    Auto,
    /// This slice.
    Named(String),
}

impl From<String> for SliceChoice {
    fn from(s: String) -> Self {
        match s.as_str() {
            "full" => SliceChoice::Full,
            "smallest" => SliceChoice::Smallest,
            "auto" => SliceChoice::Auto,
            _ => SliceChoice::Named(s),
        }
    }
}

impl fmt::Display for SliceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SliceChoice::Full => "full",
            SliceChoice::Smallest => "smallest",
            SliceChoice::Auto => "auto",
            SliceChoice::Named(n) => n,
        })
    }
}

/// What a tier does. In TOML (`[governor.policy.tiers.<tier>]`) every key is optional
/// and falls back to *that tier's* default; a standalone `TierSettings` falls back to
/// `full`'s ([`TierSettings::default`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "TierPatch")]
pub struct TierSettings {
    /// The slice: `"full"`, `"smallest"`, `"auto"` or a slice's name.
    pub slice: SliceChoice,
    /// For `slice = "auto"`: the largest share of `full`'s parameters the slice may
    /// have (0..=1).
    pub auto_fraction: f64,
    /// The vision/audio towers may stay loaded (false: unload them).
    pub towers: bool,
    /// The PLE hot-row cache budget, bytes (0 turns the cache off; "none": leave it).
    pub ple_hot_bytes: Option<usize>,
    /// Context cap, tokens ("none": the configured context).
    pub max_context: Option<usize>,
    /// Compute-thread cap ("none": the configured threads).
    pub max_threads: Option<usize>,
    /// Background-priority requests are admitted.
    pub admit_background: bool,
    /// The prompt cache may keep K/V states in RAM (false: drop them on entering the
    /// tier; files on disk stay).
    pub prompt_cache: bool,
    /// Minimum dwell before relaxing out of this tier, ms ("none": the policy's
    /// `min_dwell_ms`).
    pub min_dwell_ms: Option<u64>,
}

/// The engine's default PLE hot-row budget (`gemmad_engine::DEFAULT_PLE_HOT_BYTES`).
pub const ENGINE_PLE_HOT_BYTES: usize = 8 << 20;

impl TierSettings {
    /// The defaults of `tier`.
    pub fn defaults(tier: Tier) -> TierSettings {
        match tier {
            Tier::Full => TierSettings {
                slice: SliceChoice::Full,
                auto_fraction: 1.0,
                towers: true,
                ple_hot_bytes: Some(ENGINE_PLE_HOT_BYTES),
                max_context: None,
                max_threads: None,
                admit_background: true,
                prompt_cache: true,
                min_dwell_ms: None,
            },
            Tier::Balanced => TierSettings {
                slice: SliceChoice::Auto,
                auto_fraction: 0.75,
                towers: true,
                ple_hot_bytes: Some(ENGINE_PLE_HOT_BYTES),
                max_context: None,
                max_threads: None,
                admit_background: true,
                prompt_cache: true,
                min_dwell_ms: None,
            },
            Tier::Saver => TierSettings {
                slice: SliceChoice::Auto,
                auto_fraction: 0.5,
                towers: false,
                ple_hot_bytes: Some(2 << 20),
                max_context: Some(8192),
                max_threads: Some(2),
                admit_background: false,
                prompt_cache: false,
                min_dwell_ms: None,
            },
            Tier::Critical => TierSettings {
                slice: SliceChoice::Smallest,
                auto_fraction: 0.0,
                towers: false,
                ple_hot_bytes: Some(0),
                max_context: Some(2048),
                max_threads: Some(1),
                admit_background: false,
                prompt_cache: false,
                min_dwell_ms: None,
            },
        }
    }
}

impl Default for TierSettings {
    fn default() -> Self {
        TierSettings::defaults(Tier::Full)
    }
}

/// `[governor.policy.tiers]`: one table per tier.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "TiersPatch")]
pub struct Tiers {
    pub full: TierSettings,
    pub balanced: TierSettings,
    pub saver: TierSettings,
    pub critical: TierSettings,
}

impl Tiers {
    pub fn get(&self, tier: Tier) -> &TierSettings {
        match tier {
            Tier::Full => &self.full,
            Tier::Balanced => &self.balanced,
            Tier::Saver => &self.saver,
            Tier::Critical => &self.critical,
        }
    }

    pub fn get_mut(&mut self, tier: Tier) -> &mut TierSettings {
        match tier {
            Tier::Full => &mut self.full,
            Tier::Balanced => &mut self.balanced,
            Tier::Saver => &mut self.saver,
            Tier::Critical => &mut self.critical,
        }
    }
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers {
            full: TierSettings::defaults(Tier::Full),
            balanced: TierSettings::defaults(Tier::Balanced),
            saver: TierSettings::defaults(Tier::Saver),
            critical: TierSettings::defaults(Tier::Critical),
        }
    }
}

/// A tier's table as written: only the keys present.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TierPatch {
    slice: Option<SliceChoice>,
    auto_fraction: Option<f64>,
    towers: Option<bool>,
    #[serde(deserialize_with = "present_none_or")]
    ple_hot_bytes: Option<Option<usize>>,
    #[serde(deserialize_with = "present_none_or")]
    max_context: Option<Option<usize>>,
    #[serde(deserialize_with = "present_none_or")]
    max_threads: Option<Option<usize>>,
    admit_background: Option<bool>,
    prompt_cache: Option<bool>,
    #[serde(deserialize_with = "present_none_or")]
    min_dwell_ms: Option<Option<u64>>,
}

impl TierPatch {
    fn apply(self, mut s: TierSettings) -> TierSettings {
        if let Some(v) = self.slice {
            s.slice = v;
        }
        if let Some(v) = self.auto_fraction {
            s.auto_fraction = v;
        }
        if let Some(v) = self.towers {
            s.towers = v;
        }
        if let Some(v) = self.ple_hot_bytes {
            s.ple_hot_bytes = v;
        }
        if let Some(v) = self.max_context {
            s.max_context = v;
        }
        if let Some(v) = self.max_threads {
            s.max_threads = v;
        }
        if let Some(v) = self.admit_background {
            s.admit_background = v;
        }
        if let Some(v) = self.prompt_cache {
            s.prompt_cache = v;
        }
        if let Some(v) = self.min_dwell_ms {
            s.min_dwell_ms = v;
        }
        s
    }
}

impl From<TierPatch> for TierSettings {
    fn from(p: TierPatch) -> Self {
        p.apply(TierSettings::default())
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TiersPatch {
    full: TierPatch,
    balanced: TierPatch,
    saver: TierPatch,
    critical: TierPatch,
}

impl From<TiersPatch> for Tiers {
    fn from(p: TiersPatch) -> Self {
        Tiers {
            full: p.full.apply(TierSettings::defaults(Tier::Full)),
            balanced: p.balanced.apply(TierSettings::defaults(Tier::Balanced)),
            saver: p.saver.apply(TierSettings::defaults(Tier::Saver)),
            critical: p.critical.apply(TierSettings::defaults(Tier::Critical)),
        }
    }
}

/// Reads a value, or the string `"none"` as `None`.
struct NoneOrVisitor<T>(PhantomData<T>);

impl<T> NoneOrVisitor<T> {
    fn value<'de, E, D>(d: D) -> Result<Option<T>, E>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de, Error = E>,
        E: de::Error,
    {
        T::deserialize(d).map(Some)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for NoneOrVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or \"none\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<T>, E> {
        if s == "none" {
            return Ok(None);
        }
        Self::value(s.into_deserializer())
            .map_err(|e: E| E::custom(format_args!("{}, or \"none\"", e.to_string().trim_end())))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<T>, E> {
        Self::value(v.into_deserializer())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<T>, E> {
        Self::value(v.into_deserializer())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<T>, E> {
        Self::value(v.into_deserializer())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<T>, E> {
        Self::value(v.into_deserializer())
    }
}

/// Deserializes a scalar, or `"none"` as `None`.
fn none_or<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_any(NoneOrVisitor(PhantomData))
}

/// [`none_or`] for a key that may be absent (outer `None`).
fn present_none_or<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    none_or(d).map(Some)
}

/// A configuration that parses but makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("[governor.policy]: {0}")]
pub struct ConfigError(pub String);

impl PolicyConfig {
    /// Checks what serde cannot: margins are finite and not negative, thresholds are
    /// finite and ordered from `balanced` to `critical`, `auto_fraction` is in 0..=1 and
    /// caps are not 0. The policy runs with any configuration; this is for the daemon to
    /// refuse a nonsensical one at load.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let m = &self.memory;
        let c = &self.cgroup;
        let h = &self.heat;
        let p = &self.power;
        // (name, [balanced, saver, critical], margin, thresholds fall as tiers rise)
        let groups: [(&str, [Option<f64>; 3], f64, bool); 7] = [
            (
                "memory.available_*_pct",
                [
                    m.available_balanced_pct,
                    m.available_saver_pct,
                    m.available_critical_pct,
                ],
                m.available_margin_pct,
                true,
            ),
            (
                "memory.psi_some_*",
                [m.psi_some_balanced, m.psi_some_saver, m.psi_some_critical],
                m.psi_some_margin,
                false,
            ),
            (
                "memory.psi_full_*",
                [m.psi_full_balanced, m.psi_full_saver, m.psi_full_critical],
                m.psi_full_margin,
                false,
            ),
            (
                "cgroup.*_ratio",
                [c.balanced_ratio, c.saver_ratio, c.critical_ratio],
                c.margin,
                false,
            ),
            (
                "heat.*_headroom_c",
                [
                    h.balanced_headroom_c,
                    h.saver_headroom_c,
                    h.critical_headroom_c,
                ],
                h.headroom_margin_c,
                true,
            ),
            (
                "heat.cpufreq_*_ratio",
                [h.cpufreq_balanced_ratio, h.cpufreq_saver_ratio, None],
                h.cpufreq_margin,
                true,
            ),
            (
                "power.battery_*_pct",
                [None, p.battery_saver_pct, p.battery_critical_pct],
                p.battery_margin_pct,
                true,
            ),
        ];
        for (name, levels, margin, falling) in groups {
            if !margin.is_finite() || margin < 0.0 {
                errs.push(format!("{name}: the margin {margin} must be 0 or more"));
            }
            let set: Vec<f64> = levels.iter().flatten().copied().collect();
            if set.iter().any(|x| !x.is_finite()) {
                errs.push(format!("{name}: thresholds must be finite"));
                continue;
            }
            let ordered = set
                .windows(2)
                .all(|w| if falling { w[0] >= w[1] } else { w[0] <= w[1] });
            if !ordered {
                let dir = if falling { "fall" } else { "rise" };
                errs.push(format!(
                    "{name}: thresholds must {dir} from balanced to critical"
                ));
            }
        }
        for t in Tier::ALL {
            let s = self.tiers.get(t);
            if !(0.0..=1.0).contains(&s.auto_fraction) {
                errs.push(format!(
                    "tiers.{t}.auto_fraction {} is not within 0..=1",
                    s.auto_fraction
                ));
            }
            if s.max_context == Some(0) {
                errs.push(format!("tiers.{t}.max_context 0: use \"none\" for no cap"));
            }
            if s.max_threads == Some(0) {
                errs.push(format!("tiers.{t}.max_threads 0: use \"none\" for no cap"));
            }
            if let SliceChoice::Named(n) = &s.slice {
                if n.is_empty() {
                    errs.push(format!("tiers.{t}.slice is empty"));
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs.join("; ")))
        }
    }

    /// The minimum dwell in `tier` before relaxing, ms.
    pub fn dwell_ms(&self, tier: Tier) -> u64 {
        self.tiers
            .get(tier)
            .min_dwell_ms
            .unwrap_or(self.min_dwell_ms)
    }
}
