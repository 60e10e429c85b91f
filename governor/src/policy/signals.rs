//! Readings → what each signal demands. A signal demands a tier through its *enter*
//! thresholds (the tier goes up to it at once) and holds a tier through its *leave*
//! thresholds (the enter threshold moved by the margin toward the safe side): the policy
//! relaxes below a tier only once no signal holds it. A missing reading is no signal.

use std::fmt::Write as _;

use crate::sensors::{Readings, WarningLevel};

use super::config::PolicyConfig;
use super::Tier;

/// What one signal says about one sample.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Verdict {
    /// The highest tier whose enter threshold is crossed, with why.
    pub enter: Option<(Tier, String)>,
    /// The highest tier whose leave threshold is not yet crossed (it keeps that tier),
    /// with why. Always at least `enter`.
    pub hold: Option<(Tier, String)>,
}

/// How a reading is compared with its thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    /// `value < threshold` crosses it (the threshold + margin holds).
    Below,
    /// `value <= threshold`.
    AtMost,
    /// `value > threshold` (the threshold − margin holds).
    Above,
    /// `value >= threshold`.
    AtLeast,
}

impl Cmp {
    fn crossed(self, value: f64, threshold: f64) -> bool {
        match self {
            Cmp::Below => value < threshold,
            Cmp::AtMost => value <= threshold,
            Cmp::Above => value > threshold,
            Cmp::AtLeast => value >= threshold,
        }
    }

    /// The leave threshold: `threshold` moved by `margin` toward the safe side.
    fn hold_threshold(self, threshold: f64, margin: f64) -> f64 {
        match self {
            Cmp::Below | Cmp::AtMost => threshold + margin,
            Cmp::Above | Cmp::AtLeast => threshold - margin,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::Below => "<",
            Cmp::AtMost => "≤",
            Cmp::Above => ">",
            Cmp::AtLeast => "≥",
        }
    }
}

/// A number for people: at most 3 decimals, trailing zeros dropped.
pub(crate) fn num(x: f64) -> String {
    let mut s = format!("{x:.3}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

/// A continuous reading against thresholds for balanced, saver, critical.
struct Gauge<'a> {
    /// What is measured, e.g. "MemAvailable".
    label: &'a str,
    value: f64,
    /// Appended to numbers, e.g. "%", " °C".
    unit: &'a str,
    /// Decimals shown for the value.
    decimals: usize,
    cmp: Cmp,
    levels: [Option<f64>; 3],
    margin: f64,
}

const RAISED: [Tier; 3] = [Tier::Balanced, Tier::Saver, Tier::Critical];

impl Gauge<'_> {
    fn reason(&self, threshold: f64) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{} {:.*}{} {} {}{}",
            self.label,
            self.decimals,
            self.value,
            self.unit,
            self.cmp.symbol(),
            num(threshold),
            self.unit
        );
        s
    }

    fn verdict(&self) -> Verdict {
        if !self.value.is_finite() {
            return Verdict {
                enter: None,
                hold: None,
            };
        }
        let mut enter = None;
        let mut hold = None;
        // The highest tier wins: walk from critical down.
        for (tier, level) in RAISED.iter().zip(self.levels).rev() {
            let Some(th) = level else { continue };
            if enter.is_none() && self.cmp.crossed(self.value, th) {
                enter = Some((*tier, self.reason(th)));
            }
            let hold_th = self.cmp.hold_threshold(th, self.margin.max(0.0));
            if hold.is_none() && self.cmp.crossed(self.value, hold_th) {
                hold = Some((*tier, self.reason(hold_th)));
            }
        }
        // With thresholds out of order a lower tier's band could win over a higher
        // tier's entry; holding is never below entering.
        if let (Some((e, er)), Some((h, _))) = (&enter, &hold) {
            if h < e {
                hold = Some((*e, er.clone()));
            }
        }
        if hold.is_none() {
            hold.clone_from(&enter);
        }
        Verdict { enter, hold }
    }
}

/// A discrete condition (on battery, a battery level, a new cgroup event): it demands and
/// holds `tier` while true.
fn flag(tier: Option<Tier>, on: bool, why: impl FnOnce() -> String) -> Verdict {
    match tier {
        Some(t) if on && t > Tier::Full => {
            let r = why();
            Verdict {
                enter: Some((t, r.clone())),
                hold: Some((t, r)),
            }
        }
        _ => Verdict {
            enter: None,
            hold: None,
        },
    }
}

/// New events since the last sample: counters are baselined at their first reading,
/// and a counter that went down (a new cgroup, a wrapped total) is re-baselined without
/// an event.
#[derive(Clone, Debug, Default)]
pub(crate) struct EventCounters {
    high: Option<u64>,
    oom: Option<u64>,
    psi_total: Option<u64>,
}

/// What happened since the last sample, from the counters of this one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NewEvents {
    /// New cgroup `high`/`max` events.
    pub high: u64,
    /// New cgroup `oom`/`oom_kill` events.
    pub oom: u64,
    /// Growth of the PSI `some` total, µs; `None` without a total or a baseline.
    pub psi_stall_us: Option<u64>,
}

impl EventCounters {
    /// Returns what is new in `r`, and remembers its counts.
    pub fn update(&mut self, r: &Readings) -> NewEvents {
        fn delta(last: &mut Option<u64>, now: Option<u64>) -> Option<u64> {
            let d = match (*last, now) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            };
            if now.is_some() {
                *last = now;
            }
            d
        }
        NewEvents {
            high: delta(&mut self.high, r.cgroup_high_events).unwrap_or(0),
            oom: delta(&mut self.oom, r.cgroup_oom_events).unwrap_or(0),
            psi_stall_us: delta(&mut self.psi_total, r.psi_some_total_us),
        }
    }
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

/// Every signal's verdict on `r`; `new`: the events since the last sample.
pub(crate) fn evaluate(cfg: &PolicyConfig, r: &Readings, new: NewEvents) -> Vec<Verdict> {
    let (new_high, new_oom) = (new.high, new.oom);
    let mut v = Vec::new();
    let m = &cfg.memory;

    // MemAvailable, percent of MemTotal.
    if let (Some(total), Some(avail)) = (r.mem_total, r.mem_available) {
        if total > 0 {
            v.push(
                Gauge {
                    label: "MemAvailable",
                    value: avail as f64 * 100.0 / total as f64,
                    unit: "%",
                    decimals: 1,
                    cmp: Cmp::Below,
                    levels: [
                        m.available_balanced_pct,
                        m.available_saver_pct,
                        m.available_critical_pct,
                    ],
                    margin: m.available_margin_pct,
                }
                .verdict(),
            );
        }
    }
    // PSI memory.
    if let Some(x) = finite(r.psi_some_avg10) {
        v.push(
            Gauge {
                label: "PSI memory some avg10",
                value: x,
                unit: "",
                decimals: 2,
                cmp: Cmp::Above,
                levels: [m.psi_some_balanced, m.psi_some_saver, m.psi_some_critical],
                margin: m.psi_some_margin,
            }
            .verdict(),
        );
    }
    if let Some(x) = finite(r.psi_full_avg10) {
        v.push(
            Gauge {
                label: "PSI memory full avg10",
                value: x,
                unit: "",
                decimals: 2,
                cmp: Cmp::Above,
                levels: [m.psi_full_balanced, m.psi_full_saver, m.psi_full_critical],
                margin: m.psi_full_margin,
            }
            .verdict(),
        );
    }

    // A PSI trigger event: believed when the stall total grew since the last sample (the
    // first event after arming may come on an idle machine), or when there is no total
    // to check against.
    if r.psi_event {
        let confirmed = match (r.psi_some_total_us, new.psi_stall_us) {
            (None, _) => true,
            (Some(_), growth) => growth.is_some_and(|g| g > 0),
        };
        v.push(flag(m.psi_event, confirmed, || match new.psi_stall_us {
            Some(g) => format!(
                "PSI trigger fired: memory stalled {} ms since the last sample",
                num(g as f64 / 1000.0)
            ),
            None => "PSI trigger fired".into(),
        }));
    }

    // The cgroup: current over the tighter limit.
    let c = &cfg.cgroup;
    if let Some(cur) = r.cgroup_current {
        let limits = [("memory.high", r.cgroup_high), ("memory.max", r.cgroup_max)];
        let tight = limits
            .iter()
            .filter_map(|(n, l)| l.filter(|&l| l > 0).map(|l| (*n, cur as f64 / l as f64)))
            .fold(None, |best: Option<(&str, f64)>, x| match best {
                Some(b) if b.1 >= x.1 => Some(b),
                _ => Some(x),
            });
        if let Some((name, ratio)) = tight {
            let label = format!("cgroup memory.current/{name}");
            v.push(
                Gauge {
                    label: &label,
                    value: ratio,
                    unit: "",
                    decimals: 3,
                    cmp: Cmp::AtLeast,
                    levels: [c.balanced_ratio, c.saver_ratio, c.critical_ratio],
                    margin: c.margin,
                }
                .verdict(),
            );
        }
    }
    v.push(flag(c.high_event, new_high > 0, || {
        format!("cgroup memory.high exceeded: {new_high} new high event(s)")
    }));
    v.push(flag(c.oom_event, new_oom > 0, || {
        format!("cgroup OOM: {new_oom} new oom event(s)")
    }));

    // Heat.
    let h = &cfg.heat;
    if let (Some(temp), Some(trip)) = (r.temp_mc, r.trip_mc) {
        if trip > 0 {
            let (t, tr) = (temp as f64 / 1000.0, trip as f64 / 1000.0);
            let zone = r.thermal_zone.as_deref().unwrap_or("thermal zone");
            let label = format!("{zone} {t:.1} °C, trip {tr:.1} °C: headroom");
            v.push(
                Gauge {
                    label: &label,
                    value: tr - t,
                    unit: " °C",
                    decimals: 1,
                    cmp: Cmp::AtMost,
                    levels: [
                        h.balanced_headroom_c,
                        h.saver_headroom_c,
                        h.critical_headroom_c,
                    ],
                    margin: h.headroom_margin_c,
                }
                .verdict(),
            );
        }
    }
    if let Some(x) = finite(r.cpufreq_ratio) {
        v.push(
            Gauge {
                label: "cpufreq ratio",
                value: x,
                unit: "",
                decimals: 2,
                cmp: Cmp::Below,
                levels: [h.cpufreq_balanced_ratio, h.cpufreq_saver_ratio, None],
                margin: h.cpufreq_margin,
            }
            .verdict(),
        );
    }

    // Power: the battery counts only while it powers the machine.
    let p = &cfg.power;
    v.push(flag(p.on_battery, r.on_battery, || "on battery".into()));
    if r.on_battery {
        if let Some(pct) = r.battery_percent {
            v.push(
                Gauge {
                    label: "battery",
                    value: f64::from(pct),
                    unit: "%",
                    decimals: 0,
                    cmp: Cmp::AtMost,
                    levels: [None, p.battery_saver_pct, p.battery_critical_pct],
                    margin: p.battery_margin_pct,
                }
                .verdict(),
            );
        }
        // UPower's warning level, when it runs, instead of the firmware's level: UPower
        // applies the administrator's thresholds and knows quirky batteries.
        if let Some(w) = r.upower_warning {
            let low = w == WarningLevel::Low;
            let crit = matches!(w, WarningLevel::Critical | WarningLevel::Action);
            let why = || format!("UPower warning level {}", w.name());
            v.push(flag(p.level_low, low, why));
            v.push(flag(p.level_critical, crit, why));
        } else if let Some(level) = r.battery_level.as_deref() {
            let low = level.eq_ignore_ascii_case("low");
            let crit = level.eq_ignore_ascii_case("critical");
            v.push(flag(p.level_low, low, || format!("battery level {level}")));
            v.push(flag(p.level_critical, crit, || {
                format!("battery level {level}")
            }));
        }
    }
    v.retain(|x| x.enter.is_some() || x.hold.is_some());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(num(20.0), "20");
        assert_eq!(num(0.9 - 0.05), "0.85");
        assert_eq!(num(-5.0), "-5");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(-0.0001), "0");
    }

    #[test]
    fn gauge_enter_and_hold() {
        let g = |value| {
            Gauge {
                label: "MemAvailable",
                value,
                unit: "%",
                decimals: 1,
                cmp: Cmp::Below,
                levels: [Some(20.0), Some(10.0), Some(5.0)],
                margin: 5.0,
            }
            .verdict()
        };
        let t = |v: &Verdict| (v.enter.as_ref().map(|e| e.0), v.hold.as_ref().map(|h| h.0));
        assert_eq!(t(&g(50.0)), (None, None));
        assert_eq!(t(&g(22.0)), (None, Some(Tier::Balanced)));
        assert_eq!(t(&g(19.0)), (Some(Tier::Balanced), Some(Tier::Balanced)));
        assert_eq!(t(&g(12.0)), (Some(Tier::Balanced), Some(Tier::Saver)));
        assert_eq!(t(&g(7.0)), (Some(Tier::Saver), Some(Tier::Critical)));
        let v = g(4.1);
        assert_eq!(v.enter.unwrap().1, "MemAvailable 4.1% < 5%");
        assert_eq!(v.hold.unwrap().1, "MemAvailable 4.1% < 10%");
        assert_eq!(t(&g(f64::NAN)), (None, None));
    }

    #[test]
    fn event_counters_baseline_and_reset() {
        let mut c = EventCounters::default();
        let r = |h: Option<u64>, o: Option<u64>| Readings {
            cgroup_high_events: h,
            cgroup_oom_events: o,
            ..Readings::default()
        };
        let ho = |e: NewEvents| (e.high, e.oom);
        assert_eq!(
            ho(c.update(&r(Some(7), Some(1)))),
            (0, 0),
            "first reading is a baseline"
        );
        assert_eq!(ho(c.update(&r(Some(9), Some(1)))), (2, 0));
        assert_eq!(
            ho(c.update(&r(None, None))),
            (0, 0),
            "missing: no event, baseline kept"
        );
        assert_eq!(ho(c.update(&r(Some(10), Some(2)))), (1, 1));
        assert_eq!(
            ho(c.update(&r(Some(0), Some(0)))),
            (0, 0),
            "reset: re-baselined"
        );
        assert_eq!(ho(c.update(&r(Some(1), Some(0)))), (1, 0));
    }

    #[test]
    fn psi_stall_growth() {
        let mut c = EventCounters::default();
        let r = |t: Option<u64>| Readings {
            psi_some_total_us: t,
            ..Readings::default()
        };
        assert_eq!(c.update(&r(Some(100))).psi_stall_us, None, "baseline");
        assert_eq!(c.update(&r(Some(100))).psi_stall_us, Some(0));
        assert_eq!(c.update(&r(Some(350_100))).psi_stall_us, Some(350_000));
        assert_eq!(c.update(&r(None)).psi_stall_us, None);
        assert_eq!(c.update(&r(Some(350_200))).psi_stall_us, Some(100));
        assert_eq!(c.update(&r(Some(5))).psi_stall_us, Some(0), "went down");
    }

    /// A PSI event demands `memory.psi_event` only when the stall total grew (or cannot
    /// be checked); the reason says by how much.
    #[test]
    fn psi_event_is_confirmed_by_the_total() {
        let cfg = PolicyConfig::default();
        let demand = |r: &Readings, stall: Option<u64>| {
            let new = NewEvents {
                psi_stall_us: stall,
                ..NewEvents::default()
            };
            evaluate(&cfg, r, new)
                .into_iter()
                .filter_map(|v| v.enter)
                .max_by_key(|e| e.0)
        };
        let mut r = Readings {
            psi_event: true,
            psi_some_total_us: Some(1),
            ..Readings::default()
        };
        let (tier, why) = demand(&r, Some(250_000)).unwrap();
        assert_eq!(tier, Tier::Balanced);
        assert_eq!(
            why,
            "PSI trigger fired: memory stalled 250 ms since the last sample"
        );
        assert_eq!(demand(&r, Some(0)), None, "no stall: spurious");
        assert_eq!(demand(&r, None), None, "no baseline yet: unconfirmed");
        r.psi_some_total_us = None;
        assert_eq!(
            demand(&r, None),
            Some((Tier::Balanced, "PSI trigger fired".into()))
        );
        r.psi_event = false;
        assert_eq!(demand(&r, None), None);
        let mut off = PolicyConfig::default();
        off.memory.psi_event = None;
        r.psi_event = true;
        assert!(evaluate(&off, &r, NewEvents::default()).is_empty());
    }

    /// UPower's warning level replaces the firmware's `capacity_level`, on battery only.
    #[test]
    fn upower_warning_level_takes_precedence() {
        let cfg = PolicyConfig::default();
        let demand = |r: &Readings| {
            evaluate(&cfg, r, NewEvents::default())
                .into_iter()
                .filter_map(|v| v.enter)
                .max_by_key(|e| e.0)
        };
        let mut r = Readings {
            on_battery: true,
            battery_level: Some("Critical".into()),
            ..Readings::default()
        };
        assert_eq!(demand(&r).map(|e| e.0), Some(Tier::Critical));
        r.upower_warning = Some(WarningLevel::None);
        assert_eq!(
            demand(&r).map(|e| e.0),
            Some(Tier::Balanced),
            "on battery only"
        );
        r.upower_warning = Some(WarningLevel::Discharging);
        assert_eq!(demand(&r).map(|e| e.0), Some(Tier::Balanced));
        r.upower_warning = Some(WarningLevel::Low);
        assert_eq!(
            demand(&r),
            Some((Tier::Saver, "UPower warning level low".into()))
        );
        for w in [WarningLevel::Critical, WarningLevel::Action] {
            r.upower_warning = Some(w);
            assert_eq!(
                demand(&r),
                Some((Tier::Critical, format!("UPower warning level {}", w.name())))
            );
        }
        r.on_battery = false;
        assert_eq!(demand(&r), None, "a warning on AC counts for nothing");
    }
}
