//! Heat: thermal zones (`/sys/class/thermal/thermal_zone*`) and CPU frequency capping
//! (`/sys/devices/system/cpu/cpu*/cpufreq`).

use std::path::Path;

use super::files::{entries_with_prefix, read_parsed, read_str};

/// Temperatures outside this range (m°C) are sensor errors, not heat: `-274000` is the
/// kernel's THERMAL_TEMP_INVALID, and sleeping or broken sensors read 0xffff-ish values.
const TEMP_VALID_MC: std::ops::RangeInclusive<i64> = -40_000..=200_000;

/// Trip points at or below 0 m°C are unset (x86_pkg_temp's programmable thresholds read 0,
/// invalid ones -274000); above 200 °C they are placeholders, not limits.
const TRIP_VALID_MC: std::ops::RangeInclusive<i64> = 1..=200_000;

/// The zone closest to throttling.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Thermal {
    pub zone: String,
    pub temp_mc: i64,
    /// Its lowest passive trip, else hot, else critical; `None`: no valid trip.
    pub trip_mc: Option<i64>,
}

/// Reads every zone under `<sysfs>/class/thermal` and picks the one with the least
/// margin to its trip; when no zone has a valid trip, the hottest one. Zones without a
/// valid temperature are ignored. `None`: no zone (VMs, containers, many desktops).
pub(crate) fn read_thermal(sysfs_root: &Path) -> Option<Thermal> {
    let zones = entries_with_prefix(&sysfs_root.join("class/thermal"), "thermal_zone")
        .into_iter()
        .filter_map(|(name, dir)| read_zone(&name, &dir));
    pick_zone(zones)
}

fn read_zone(name: &str, dir: &Path) -> Option<Thermal> {
    let temp_mc = read_parsed::<i64>(&dir.join("temp")).filter(|t| TEMP_VALID_MC.contains(t))?;
    // Zone numbering is not stable across boots; the type is what identifies it. A zone
    // without one still counts, under its directory name.
    let zone = read_str(&dir.join("type")).unwrap_or_else(|| name.to_string());
    Some(Thermal {
        zone,
        temp_mc,
        trip_mc: throttle_trip(dir),
    })
}

/// The lowest valid trip of the first kind present among passive (throttling starts),
/// hot, critical (shutdown). Active trips only start fans and are not a limit.
fn throttle_trip(dir: &Path) -> Option<i64> {
    let mut trips: Vec<(String, i64)> = Vec::new();
    for (name, path) in entries_with_prefix(dir, "trip_point_") {
        let Some(index) = name
            .strip_prefix("trip_point_")
            .and_then(|r| r.strip_suffix("_type"))
        else {
            continue;
        };
        let Some(kind) = read_str(&path) else {
            continue;
        };
        let Some(temp) = read_parsed::<i64>(&dir.join(format!("trip_point_{index}_temp"))) else {
            continue;
        };
        if TRIP_VALID_MC.contains(&temp) {
            trips.push((kind, temp));
        }
    }
    ["passive", "hot", "critical"].iter().find_map(|want| {
        trips
            .iter()
            .filter(|(kind, _)| kind == want)
            .map(|&(_, t)| t)
            .min()
    })
}

fn pick_zone(zones: impl Iterator<Item = Thermal>) -> Option<Thermal> {
    // Key: (has a trip, -margin or temperature); the maximum is the zone nearest trouble.
    // Ties keep the first zone (lowest number) for a stable choice.
    let key = |z: &Thermal| match z.trip_mc {
        Some(trip) => (1, z.temp_mc - trip),
        None => (0, z.temp_mc),
    };
    zones.fold(None, |best: Option<Thermal>, z| match best {
        Some(b) if key(&b) >= key(&z) => Some(b),
        _ => Some(z),
    })
}

/// Lowest `scaling_cur_freq / cpuinfo_max_freq` over the online CPUs, at most 1.0 (a
/// measured current frequency may exceed the nominal maximum). `None`: no cpufreq (VMs).
pub(crate) fn read_cpufreq_ratio(sysfs_root: &Path) -> Option<f64> {
    entries_with_prefix(&sysfs_root.join("devices/system/cpu"), "cpu")
        .into_iter()
        .filter(|(name, _)| name[3..].parse::<u32>().is_ok())
        // `online` is absent on CPUs that cannot go offline (often cpu0): online.
        .filter(|(_, dir)| read_parsed::<u8>(&dir.join("online")) != Some(0))
        .filter_map(|(_, dir)| {
            let cur: u64 = read_parsed(&dir.join("cpufreq/scaling_cur_freq"))?;
            let max: u64 = read_parsed(&dir.join("cpufreq/cpuinfo_max_freq"))?;
            (max > 0).then(|| (cur as f64 / max as f64).min(1.0))
        })
        .reduce(f64::min)
}

#[cfg(test)]
mod tests {
    use super::super::files::testutil::put;
    use super::*;

    fn zone(sys: &Path, n: u32, ty: &str, temp: &str, trips: &[(&str, &str)]) {
        let z = format!("class/thermal/thermal_zone{n}");
        put(sys, &format!("{z}/type"), &format!("{ty}\n"));
        put(sys, &format!("{z}/temp"), &format!("{temp}\n"));
        for (i, (kind, t)) in trips.iter().enumerate() {
            put(
                sys,
                &format!("{z}/trip_point_{i}_type"),
                &format!("{kind}\n"),
            );
            put(sys, &format!("{z}/trip_point_{i}_temp"), &format!("{t}\n"));
        }
    }

    #[test]
    fn no_thermal_class_or_empty_is_none() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read_thermal(t.path()), None);
        std::fs::create_dir_all(t.path().join("class/thermal")).unwrap();
        assert_eq!(read_thermal(t.path()), None);
    }

    /// A laptop-like set: the package sensor is hotter, but acpitz is nearer its passive
    /// trip; the unset x86_pkg_temp thresholds (0) are not trips.
    #[test]
    fn least_margin_to_passive_trip_wins() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        zone(
            sys,
            0,
            "acpitz",
            "60000",
            &[
                ("critical", "105000"),
                ("passive", "65000"),
                ("active", "50000"),
            ],
        );
        zone(
            sys,
            1,
            "x86_pkg_temp",
            "80000",
            &[("passive", "0"), ("passive", "0"), ("critical", "110000")],
        );
        put(sys, "class/thermal/cooling_device0/type", "Processor\n");
        assert_eq!(
            read_thermal(sys),
            Some(Thermal {
                zone: "acpitz".into(),
                temp_mc: 60000,
                trip_mc: Some(65000)
            })
        );
    }

    #[test]
    fn passive_else_hot_else_critical() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        zone(
            sys,
            0,
            "soc-thermal",
            "50000",
            &[
                ("critical", "115000"),
                ("hot", "95000"),
                ("active", "60000"),
            ],
        );
        assert_eq!(read_thermal(sys).and_then(|z| z.trip_mc), Some(95000));
        let t = tempfile::tempdir().unwrap();
        zone(
            t.path(),
            0,
            "cpu-thermal",
            "50000",
            &[("critical", "110000"), ("unknown", "70000")],
        );
        assert_eq!(read_thermal(t.path()).and_then(|z| z.trip_mc), Some(110000));
        // Two passive trips: the lower one is where throttling starts.
        let t = tempfile::tempdir().unwrap();
        zone(
            t.path(),
            0,
            "z",
            "50000",
            &[("passive", "90000"), ("passive", "80000")],
        );
        assert_eq!(read_thermal(t.path()).and_then(|z| z.trip_mc), Some(80000));
    }

    /// Missing, garbage and absurd temperatures drop the zone; absurd trips drop the trip.
    #[test]
    fn bad_zones_are_ignored() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        zone(sys, 0, "iwlwifi_1", "-274000", &[("passive", "60000")]);
        zone(sys, 1, "broken", "65535000", &[("critical", "100000")]);
        zone(sys, 2, "garbage", "hot\n", &[("critical", "100000")]);
        put(sys, "class/thermal/thermal_zone3/type", "no-temp\n");
        put(sys, "class/thermal/thermal_zone4/temp", "");
        zone(
            sys,
            5,
            "pch_cannonlake",
            "45000",
            &[("critical", "-274000"), ("hot", "999999"), ("passive", "x")],
        );
        assert_eq!(
            read_thermal(sys),
            Some(Thermal {
                zone: "pch_cannonlake".into(),
                temp_mc: 45000,
                trip_mc: None
            })
        );
        // A zone with a trip beats a hotter one without.
        zone(sys, 6, "acpitz", "30000", &[("critical", "100000")]);
        assert_eq!(read_thermal(sys).map(|z| z.zone), Some("acpitz".into()));
    }

    /// Without trips anywhere the hottest zone wins; a zone missing `type` is named by its
    /// directory; a trip with a missing `_temp` is skipped.
    #[test]
    fn hottest_without_trips() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        zone(sys, 0, "a", "40000", &[]);
        put(sys, "class/thermal/thermal_zone1/temp", "55000\n");
        put(
            sys,
            "class/thermal/thermal_zone1/trip_point_0_type",
            "passive\n",
        );
        assert_eq!(
            read_thermal(sys),
            Some(Thermal {
                zone: "thermal_zone1".into(),
                temp_mc: 55000,
                trip_mc: None
            })
        );
    }

    fn cpu(sys: &Path, n: u32, cur: &str, max: &str) {
        put(
            sys,
            &format!("devices/system/cpu/cpu{n}/cpufreq/scaling_cur_freq"),
            cur,
        );
        put(
            sys,
            &format!("devices/system/cpu/cpu{n}/cpufreq/cpuinfo_max_freq"),
            max,
        );
    }

    #[test]
    fn cpufreq_lowest_ratio() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        assert_eq!(read_cpufreq_ratio(sys), None);
        cpu(sys, 0, "2400000\n", "4800000\n");
        cpu(sys, 1, "4900000\n", "4800000\n"); // measured above nominal: capped at 1.0
        cpu(sys, 2, "1200000\n", "4800000\n");
        put(sys, "devices/system/cpu/cpu2/online", "0\n"); // offline: ignored
        cpu(sys, 3, "garbage\n", "4800000\n");
        cpu(sys, 4, "1000\n", "0\n");
        put(
            sys,
            "devices/system/cpu/cpufreq/policy0/scaling_cur_freq",
            "1\n",
        );
        put(sys, "devices/system/cpu/cpuidle/current_driver", "none\n");
        assert_eq!(read_cpufreq_ratio(sys), Some(0.5));
        put(sys, "devices/system/cpu/cpu2/online", "1\n");
        assert_eq!(read_cpufreq_ratio(sys), Some(0.25));
    }

    #[test]
    fn cpufreq_absent_in_vm() {
        let t = tempfile::tempdir().unwrap();
        put(t.path(), "devices/system/cpu/cpu0/online", "1\n");
        put(t.path(), "devices/system/cpu/cpu1/topology/core_id", "1\n");
        assert_eq!(read_cpufreq_ratio(t.path()), None);
    }
}
