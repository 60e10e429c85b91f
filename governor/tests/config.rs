//! `[governor.policy]` from TOML: defaults, overrides, "none", unknown keys.

use gemmad_governor::policy::{PolicyConfig, SliceChoice, TierSettings};
use gemmad_governor::{GovernorConfig, Tier};
use serde::Deserialize;

/// The daemon's config as far as the governor goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Root {
    #[serde(default)]
    governor: GovernorConfig,
}

fn parse(text: &str) -> Result<PolicyConfig, String> {
    toml::from_str::<Root>(text)
        .map(|r| r.governor.policy)
        .map_err(|e| e.to_string())
}

#[test]
fn empty_is_default() {
    assert_eq!(parse("").unwrap(), PolicyConfig::default());
    assert_eq!(
        parse("[governor.policy]\n").unwrap(),
        PolicyConfig::default()
    );
    assert_eq!(
        toml::from_str::<PolicyConfig>("").unwrap(),
        PolicyConfig::default()
    );
}

#[test]
fn documented_defaults_file_is_the_default() {
    let text = include_str!("../policy.defaults.toml");
    let cfg = parse(text).unwrap();
    assert_eq!(cfg, PolicyConfig::default());
    cfg.validate().unwrap();
}

#[test]
fn defaults() {
    let c = PolicyConfig::default();
    assert_eq!(c.min_dwell_ms, 30_000);
    assert_eq!(c.memory.available_critical_pct, Some(5.0));
    assert_eq!(c.cgroup.high_event, Some(Tier::Critical));
    assert_eq!(c.heat.cpufreq_saver_ratio, None);
    assert_eq!(c.power.on_battery, Some(Tier::Balanced));
    assert_eq!(c.tiers.critical.slice, SliceChoice::Smallest);
    assert_eq!(c.tiers.saver.max_context, Some(8192));
    assert_eq!(c.dwell_ms(Tier::Saver), 30_000);
}

#[test]
fn overrides_keep_the_other_defaults() {
    let c = parse(
        r#"
        [governor.policy]
        min_dwell_ms = 5000

        [governor.policy.memory]
        available_critical_pct = 3      # an integer is fine for a float
        psi_full_balanced = "none"

        [governor.policy.power]
        on_battery = "none"
        level_low = "balanced"

        [governor.policy.tiers.saver]
        max_threads = 4
        max_context = "none"
        slice = "E2.54B"
        min_dwell_ms = 60000
        "#,
    )
    .unwrap();
    let d = PolicyConfig::default();
    assert_eq!(c.min_dwell_ms, 5000);
    assert_eq!(c.memory.available_critical_pct, Some(3.0));
    assert_eq!(c.memory.psi_full_balanced, None);
    // Keys not written keep their group's defaults.
    assert_eq!(c.memory.available_saver_pct, d.memory.available_saver_pct);
    assert_eq!(c.memory.psi_full_critical, d.memory.psi_full_critical);
    assert_eq!(c.power.on_battery, None);
    assert_eq!(c.power.level_low, Some(Tier::Balanced));
    assert_eq!(c.power.battery_saver_pct, Some(20.0));
    // A tier's table falls back to that tier's defaults, not full's.
    let saver = &c.tiers.saver;
    assert_eq!(saver.max_threads, Some(4));
    assert_eq!(saver.max_context, None);
    assert_eq!(saver.slice, SliceChoice::Named("E2.54B".into()));
    assert!(!saver.towers && !saver.admit_background);
    assert_eq!(saver.ple_hot_bytes, Some(2 << 20));
    assert_eq!(saver.auto_fraction, 0.5);
    assert_eq!(c.dwell_ms(Tier::Saver), 60_000);
    assert_eq!(c.dwell_ms(Tier::Critical), 5000);
    assert_eq!(c.tiers.full, d.tiers.full);
    assert_eq!(c.tiers.balanced, d.tiers.balanced);
    assert_eq!(c.tiers.critical, d.tiers.critical);
    assert_eq!(c.cgroup, d.cgroup);
    assert_eq!(c.heat, d.heat);
    c.validate().unwrap();
}

#[test]
fn slice_keywords() {
    for (word, choice) in [
        ("full", SliceChoice::Full),
        ("smallest", SliceChoice::Smallest),
        ("auto", SliceChoice::Auto),
        ("e2b-like", SliceChoice::Named("e2b-like".into())),
    ] {
        let s: TierSettings = toml::from_str(&format!("slice = \"{word}\"")).unwrap();
        assert_eq!(s.slice, choice);
        assert_eq!(s.slice.to_string(), word);
        // A standalone table falls back to full's settings.
        assert_eq!(s.max_context, None);
        assert!(s.towers);
    }
}

#[test]
fn unknown_keys_are_refused() {
    for (text, key) in [
        ("[governor.policy]\nmin_dwell = 1\n", "min_dwell"),
        (
            "[governor.policy.memory]\navailable_pct = 1\n",
            "available_pct",
        ),
        ("[governor.policy.cgroup]\nmax_ratio = 1\n", "max_ratio"),
        ("[governor.policy.heat]\ntrip_c = 1\n", "trip_c"),
        ("[governor.policy.power]\nac = \"full\"\n", "ac"),
        ("[governor.policy.tiers.saver]\nthreads = 2\n", "threads"),
        ("[governor.policy.tiers.eco]\nmax_threads = 2\n", "eco"),
        ("[governor.policy.disk]\n", "disk"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(
            e.contains("unknown field") && e.contains(key),
            "{text}: {e}"
        );
    }
}

#[test]
fn bad_values_are_refused() {
    for (text, want) in [
        (
            "[governor.policy.power]\non_battery = \"eco\"\n",
            "unknown variant `eco`",
        ),
        (
            "[governor.policy.memory]\navailable_saver_pct = \"off\"\n",
            "expected f64, or \"none\"",
        ),
        ("[governor.policy.tiers.critical]\nmax_threads = -1\n", ""),
        ("[governor.policy.tiers.critical]\ntowers = \"no\"\n", ""),
        ("[governor.policy]\nmin_dwell_ms = \"none\"\n", ""),
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn validate_is_separate_from_parsing() {
    let c = parse("[governor.policy.cgroup]\nsaver_ratio = 0.99\n").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("cgroup.*_ratio: thresholds must rise"), "{e}");
}
