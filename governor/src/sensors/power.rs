//! Power: AC or battery, charge and discharge power, from
//! `/sys/class/power_supply/*`. No supply at all (desktops, servers, VMs) is "on AC with
//! no battery", the normal state there.
//!
//! Also UPower's view ([`UpowerView`]) as plain values: the daemon reads it over D-Bus
//! (this crate does no IPC) and [`Readings::merge_upower`] lets it take precedence.

use std::path::Path;

use super::files::{entries_with_prefix, read_parsed, read_str};
use super::Readings;

/// UPower's `WarningLevel` of its display device (`org.freedesktop.UPower.Device`, `u`):
/// UPower's own judgement of the battery against its `PercentageLow`/`Critical`/`Action`
/// (or `Time*`) settings, computed only while discharging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarningLevel {
    /// 1: no warning.
    None,
    /// 2: a UPS is discharging (UPSes only).
    Discharging,
    /// 3: low.
    Low,
    /// 4: critical.
    Critical,
    /// 5: UPower is about to take its critical action (hibernate, power off).
    Action,
}

impl WarningLevel {
    /// The D-Bus value; `None` for 0 (Unknown) and values UPower does not define.
    pub fn from_dbus(v: u32) -> Option<WarningLevel> {
        match v {
            1 => Some(WarningLevel::None),
            2 => Some(WarningLevel::Discharging),
            3 => Some(WarningLevel::Low),
            4 => Some(WarningLevel::Critical),
            5 => Some(WarningLevel::Action),
            _ => None,
        }
    }

    /// The D-Bus value.
    pub fn to_dbus(self) -> u32 {
        match self {
            WarningLevel::None => 1,
            WarningLevel::Discharging => 2,
            WarningLevel::Low => 3,
            WarningLevel::Critical => 4,
            WarningLevel::Action => 5,
        }
    }

    /// Lowercase, for logs and reasons.
    pub fn name(self) -> &'static str {
        match self {
            WarningLevel::None => "none",
            WarningLevel::Discharging => "discharging",
            WarningLevel::Low => "low",
            WarningLevel::Critical => "critical",
            WarningLevel::Action => "action",
        }
    }
}

/// What UPower says, as far as the governor uses it; `None`: not known (the property
/// could not be read, or the display device is missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpowerView {
    /// `OnBattery` of `/org/freedesktop/UPower`.
    pub on_battery: Option<bool>,
    /// `WarningLevel` of `/org/freedesktop/UPower/devices/DisplayDevice`.
    pub warning_level: Option<WarningLevel>,
}

impl Readings {
    /// Lets UPower's view take precedence over sysfs: its `OnBattery` replaces
    /// `on_battery` (UPower also knows UPSes and quirky firmware), and its warning level
    /// becomes `upower_warning`, which the policy then uses instead of the firmware's
    /// `capacity_level`. What UPower does not know leaves the sysfs reading as it is.
    pub fn merge_upower(&mut self, u: &UpowerView) {
        if let Some(b) = u.on_battery {
            self.on_battery = b;
        }
        if let Some(w) = u.warning_level {
            self.upower_warning = Some(w);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Power {
    pub on_battery: bool,
    pub battery_percent: Option<u8>,
    pub battery_level: Option<String>,
    pub power_w: Option<f64>,
}

/// One system battery.
#[derive(Debug)]
struct Battery {
    discharging: bool,
    percent: Option<f64>,
    /// `energy_now`, `energy_full`, µWh, to combine several batteries by energy.
    energy: Option<(u64, u64)>,
    level: Option<String>,
    /// Draw, watts.
    power_w: Option<f64>,
}

pub(crate) fn read_power(sysfs_root: &Path) -> Power {
    let mut line_online = false;
    let mut batteries = Vec::new();
    for (_, dir) in entries_with_prefix(&sysfs_root.join("class/power_supply"), "") {
        // Peripheral batteries (mice, headsets) say scope=Device; they do not power us.
        if read_str(&dir.join("scope")).as_deref() == Some("Device") {
            continue;
        }
        let kind = read_str(&dir.join("type"));
        match kind.as_deref() {
            // USB covers USB_C, USB_PD, ... (one type per charger protocol); a wireless
            // charger is line power too. online: 1 fixed voltage, 2 programmable (PD PPS).
            Some(t) if t == "Mains" || t.starts_with("USB") || t == "Wireless" => {
                line_online |= read_parsed::<u8>(&dir.join("online")).is_some_and(|o| o >= 1);
            }
            // present=0: an empty battery bay.
            Some("Battery") if read_parsed::<u8>(&dir.join("present")) != Some(0) => {
                batteries.push(read_battery(&dir));
            }
            _ => {}
        }
    }
    combine(line_online, &batteries)
}

fn read_battery(dir: &Path) -> Battery {
    let discharging = read_str(&dir.join("status")).as_deref() == Some("Discharging");
    let u = |name: &str| read_parsed::<u64>(&dir.join(name));
    let i = |name: &str| read_parsed::<i64>(&dir.join(name));
    // Energy (µWh) or charge (µAh) units, never mixed; a ratio of either is a percentage.
    let ratio = |now: Option<u64>, full: Option<u64>| match (now, full) {
        (Some(n), Some(f)) if f > 0 => Some((n as f64 / f as f64 * 100.0).min(100.0)),
        _ => None,
    };
    let energy = match (u("energy_now"), u("energy_full")) {
        (Some(n), Some(f)) if f > 0 => Some((n, f)),
        _ => None,
    };
    let percent = u("capacity")
        .filter(|&c| c <= 100)
        .map(|c| c as f64)
        .or_else(|| ratio(u("energy_now"), u("energy_full")))
        .or_else(|| ratio(u("charge_now"), u("charge_full")));
    // power_now is µW. Else current × voltage (µA × µV); current's sign differs between
    // drivers, so only its magnitude counts.
    let power_w = i("power_now")
        .map(|p| p.unsigned_abs() as f64 / 1e6)
        .or_else(|| {
            Some(
                i("current_now")?.unsigned_abs() as f64 * i("voltage_now")?.unsigned_abs() as f64
                    / 1e12,
            )
        });
    Battery {
        discharging,
        percent,
        energy,
        level: read_str(&dir.join("capacity_level")),
        power_w,
    }
}

fn combine(line_online: bool, batteries: &[Battery]) -> Power {
    // Several batteries (BAT0 + BAT1) drain as one: by energy when all report it, else the
    // emptiest one decides.
    let battery_percent = if batteries.len() > 1 && batteries.iter().all(|b| b.energy.is_some()) {
        let (now, full) = batteries
            .iter()
            .filter_map(|b| b.energy)
            .fold((0u64, 0u64), |(n, f), (bn, bf)| {
                (n.saturating_add(bn), f.saturating_add(bf))
            });
        Some(now as f64 / full as f64 * 100.0)
    } else {
        batteries.iter().filter_map(|b| b.percent).reduce(f64::min)
    };
    let discharging: Vec<&Battery> = batteries.iter().filter(|b| b.discharging).collect();
    let power_w = discharging
        .iter()
        .filter_map(|b| b.power_w)
        .reduce(|a, b| a + b);
    Power {
        on_battery: !line_online && !discharging.is_empty(),
        battery_percent: battery_percent.map(|p| p.round().clamp(0.0, 100.0) as u8),
        battery_level: batteries
            .iter()
            .filter_map(|b| b.level.clone())
            .min_by_key(|l| level_rank(l)),
        // Only a draw while discharging is a discharge power.
        power_w: if discharging.is_empty() {
            None
        } else {
            power_w
        },
    }
}

/// Worst first; unknown strings (including `Unknown`) rank last.
fn level_rank(level: &str) -> u8 {
    match level {
        "Critical" => 0,
        "Low" => 1,
        "Normal" => 2,
        "High" => 3,
        "Full" => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::super::files::testutil::put;
    use super::*;

    fn supply(sys: &Path, name: &str, attrs: &[(&str, &str)]) {
        for (k, v) in attrs {
            put(
                sys,
                &format!("class/power_supply/{name}/{k}"),
                &format!("{v}\n"),
            );
        }
    }

    #[test]
    fn warning_levels_from_dbus() {
        assert_eq!(WarningLevel::from_dbus(0), None, "Unknown");
        assert_eq!(WarningLevel::from_dbus(6), None);
        assert_eq!(WarningLevel::from_dbus(u32::MAX), None);
        for v in 1..=5 {
            let w = WarningLevel::from_dbus(v).unwrap();
            assert_eq!(w.to_dbus(), v);
        }
        assert_eq!(WarningLevel::from_dbus(3), Some(WarningLevel::Low));
        assert_eq!(
            WarningLevel::from_dbus(4).map(WarningLevel::name),
            Some("critical")
        );
    }

    /// UPower wins for on-battery and the warning level; what it does not know leaves the
    /// sysfs readings alone.
    #[test]
    fn upower_view_takes_precedence() {
        let sysfs = Readings {
            on_battery: true,
            battery_percent: Some(50),
            battery_level: Some("Normal".into()),
            ..Readings::default()
        };
        let mut r = sysfs.clone();
        r.merge_upower(&UpowerView::default());
        assert_eq!(r, sysfs, "nothing known: nothing changes");
        r.merge_upower(&UpowerView {
            on_battery: Some(false),
            warning_level: None,
        });
        assert!(!r.on_battery);
        assert_eq!(r.upower_warning, None);
        r.merge_upower(&UpowerView {
            on_battery: None,
            warning_level: Some(WarningLevel::Critical),
        });
        assert!(!r.on_battery, "unknown OnBattery keeps the last value");
        assert_eq!(r.upower_warning, Some(WarningLevel::Critical));
        assert_eq!(
            (r.battery_percent, r.battery_level.as_deref()),
            (Some(50), Some("Normal")),
            "sysfs charge and level are kept for display"
        );
    }

    #[test]
    fn no_supply_dir_is_ac() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read_power(t.path()), Power::default());
        std::fs::create_dir_all(t.path().join("class/power_supply")).unwrap();
        assert_eq!(read_power(t.path()), Power::default());
    }

    #[test]
    fn ac_only() {
        let t = tempfile::tempdir().unwrap();
        supply(t.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        assert_eq!(read_power(t.path()), Power::default());
        // A desktop's mains adapter reporting offline and no battery: still not on battery.
        supply(t.path(), "AC", &[("online", "0")]);
        assert!(!read_power(t.path()).on_battery);
    }

    #[test]
    fn battery_discharging() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        supply(sys, "AC", &[("type", "Mains"), ("online", "0")]);
        supply(
            sys,
            "BAT0",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("capacity", "42"),
                ("capacity_level", "Normal"),
                ("energy_now", "21000000"),
                ("energy_full", "50000000"),
                ("power_now", "12500000"),
            ],
        );
        assert_eq!(
            read_power(sys),
            Power {
                on_battery: true,
                battery_percent: Some(42),
                battery_level: Some("Normal".into()),
                power_w: Some(12.5)
            }
        );
    }

    /// No power_now: current × voltage, with a negative (discharging) current.
    #[test]
    fn power_from_current_and_voltage() {
        let t = tempfile::tempdir().unwrap();
        supply(
            t.path(),
            "BAT1",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("current_now", "-1500000"),
                ("voltage_now", "12000000"),
            ],
        );
        let p = read_power(t.path());
        assert!(p.on_battery);
        assert_eq!(p.power_w, Some(18.0));
        assert_eq!(p.battery_percent, None);
    }

    #[test]
    fn battery_charging_is_on_ac() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        supply(sys, "ADP1", &[("type", "USB_C"), ("online", "2")]);
        supply(
            sys,
            "BAT0",
            &[
                ("type", "Battery"),
                ("status", "Charging"),
                ("capacity", "80"),
                ("power_now", "30000000"),
            ],
        );
        assert_eq!(
            read_power(sys),
            Power {
                on_battery: false,
                battery_percent: Some(80),
                battery_level: None,
                power_w: None
            }
        );
        // Discharging while a charger is online (charge_behaviour=force-discharge): AC.
        supply(sys, "BAT0", &[("status", "Discharging")]);
        let p = read_power(sys);
        assert!(!p.on_battery);
        assert_eq!(p.power_w, Some(30.0));
    }

    #[test]
    fn garbage_capacity_falls_back_to_energy_then_none() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        supply(
            sys,
            "BAT0",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("capacity", "lots"),
                ("energy_now", "25000000"),
                ("energy_full", "40000000"),
            ],
        );
        assert_eq!(read_power(sys).battery_percent, Some(63)); // 62.5 rounds up
        supply(sys, "BAT0", &[("capacity", "250"), ("energy_full", "0")]);
        assert_eq!(read_power(sys).battery_percent, None);
        supply(
            sys,
            "BAT0",
            &[
                ("capacity", ""),
                ("charge_now", "1000"),
                ("charge_full", "4000"),
            ],
        );
        assert_eq!(read_power(sys).battery_percent, Some(25));
        // Garbage status: not known to discharge, so not on battery.
        supply(sys, "BAT0", &[("status", "\u{1}\u{2}")]);
        assert!(!read_power(sys).on_battery);
    }

    /// Two system batteries combine by energy; a mouse battery and an empty bay are ignored.
    #[test]
    fn several_batteries() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        supply(
            sys,
            "BAT0",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("capacity", "10"),
                ("capacity_level", "Low"),
                ("energy_now", "2000000"),
                ("energy_full", "20000000"),
                ("power_now", "5000000"),
            ],
        );
        supply(
            sys,
            "BAT1",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("capacity", "90"),
                ("capacity_level", "High"),
                ("energy_now", "54000000"),
                ("energy_full", "60000000"),
                ("power_now", "1000000"),
            ],
        );
        supply(
            sys,
            "BAT2",
            &[
                ("type", "Battery"),
                ("present", "0"),
                ("capacity", "0"),
                ("capacity_level", "Critical"),
            ],
        );
        supply(
            sys,
            "hidpp_battery_0",
            &[
                ("type", "Battery"),
                ("scope", "Device"),
                ("status", "Discharging"),
                ("capacity", "1"),
                ("capacity_level", "Critical"),
            ],
        );
        assert_eq!(
            read_power(sys),
            Power {
                on_battery: true,
                battery_percent: Some(70),
                battery_level: Some("Low".into()),
                power_w: Some(6.0)
            }
        );
        // Without energy on one of them, the emptiest decides.
        std::fs::remove_file(sys.join("class/power_supply/BAT1/energy_now")).unwrap();
        assert_eq!(read_power(sys).battery_percent, Some(10));
    }
}
