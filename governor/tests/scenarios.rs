//! Scenario tests: traces of readings over time replayed through the policy, asserting
//! the tier sequence, the dwell times and the actions. Time is passed in; nothing sleeps.
//! `cargo test -p gemmad-governor --test scenarios -- --nocapture --test-threads=1`
//! prints each trace as a table: trace → tier → transition ⇒ actions.

use gemmad_governor::policy::{Action, Policy, PolicyConfig, Tier, Transition};
use gemmad_governor::sensors::{UpowerView, WarningLevel};
use gemmad_governor::Readings;

const GIB: u64 = 1 << 30;
const S: u64 = 1000;

/// The official E4B slice table (name, non-embedding parameters), as the engine lists it.
fn official_slices() -> Vec<(String, u64)> {
    [
        ("full", 3_980_000_000),
        ("E3.79B", 3_790_000_000),
        ("E3.59B", 3_590_000_000),
        ("E3.39B", 3_390_000_000),
        ("E3.18B", 3_180_000_000),
        ("E2.98B", 2_980_000_000),
        ("E2.69B", 2_690_000_000),
        ("E2.54B", 2_540_000_000),
        ("E1.96B", 1_960_000_000),
        ("E2B", 1_910_000_000),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), p))
    .collect()
}

/// Readings built up field by field; starts with nothing read, on AC.
#[derive(Clone, Debug, Default)]
struct R(Readings);

impl R {
    fn new() -> R {
        R(Readings::default())
    }
    /// A quiet laptop: 16 GiB with half available, no stalls, 50 °C under a 95 °C passive
    /// trip, full clocks, on AC with a full battery.
    fn calm() -> R {
        R::new()
            .mem(50.0)
            .psi(0.0, 0.0)
            .heat(50.0, 95.0)
            .cpufreq(1.0)
            .ac(100)
    }
    fn mem(mut self, pct: f64) -> R {
        self.0.mem_total = Some(16 * GIB);
        self.0.mem_available = Some((16.0 * GIB as f64 * pct / 100.0) as u64);
        self.0.swap_free = Some(0);
        self
    }
    fn psi(mut self, some: f64, full: f64) -> R {
        self.0.psi_some_avg10 = Some(some);
        self.0.psi_full_avg10 = Some(full);
        self
    }
    fn cgroup(mut self, current_gib: f64, high_gib: f64, max_gib: f64) -> R {
        let b = |g: f64| (g * GIB as f64) as u64;
        self.0.cgroup_current = Some(b(current_gib));
        self.0.cgroup_high = Some(b(high_gib));
        self.0.cgroup_max = Some(b(max_gib));
        self
    }
    fn events(mut self, high: u64, oom: u64) -> R {
        self.0.cgroup_high_events = Some(high);
        self.0.cgroup_oom_events = Some(oom);
        self
    }
    fn heat(mut self, temp_c: f64, trip_c: f64) -> R {
        self.0.thermal_zone = Some("x86_pkg_temp".into());
        self.0.temp_mc = Some((temp_c * 1000.0).round() as i64);
        self.0.trip_mc = Some((trip_c * 1000.0).round() as i64);
        self
    }
    fn cpufreq(mut self, ratio: f64) -> R {
        self.0.cpufreq_ratio = Some(ratio);
        self
    }
    fn ac(mut self, pct: u8) -> R {
        self.0.on_battery = false;
        self.0.battery_percent = Some(pct);
        self.0.battery_level = Some(level_of(pct).into());
        self.0.power_w = None;
        self
    }
    fn battery(mut self, pct: u8) -> R {
        self.0.on_battery = true;
        self.0.battery_percent = Some(pct);
        self.0.battery_level = Some(level_of(pct).into());
        self.0.power_w = Some(12.0);
        self
    }
}

/// A firmware's `capacity_level`, which need not match UPower's percentages.
fn level_of(pct: u8) -> &'static str {
    match pct {
        0..=4 => "Critical",
        5..=15 => "Low",
        16..=95 => "Normal",
        _ => "Full",
    }
}

/// The trace column: what was read, compactly.
fn summary(r: &Readings) -> String {
    let mut v = Vec::new();
    if let (Some(t), Some(a)) = (r.mem_total, r.mem_available) {
        let pct = a as f64 * 100.0 / t as f64;
        if t > 0 && (pct - 50.0).abs() > 0.01 {
            v.push(format!("mem {pct:.1}%"));
        }
    }
    if let (Some(s), Some(f)) = (r.psi_some_avg10, r.psi_full_avg10) {
        if s > 0.0 || f > 0.0 {
            v.push(format!("psi {s}/{f}"));
        }
    }
    if let Some(c) = r.cgroup_current {
        let g = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}G", b as f64 / GIB as f64));
        v.push(format!(
            "cg {} high {} max {}",
            g(Some(c)),
            g(r.cgroup_high),
            g(r.cgroup_max)
        ));
    }
    if r.psi_event {
        v.push(format!(
            "PSI trigger (total {} ms)",
            r.psi_some_total_us
                .map_or("-".into(), |t| (t / 1000).to_string())
        ));
    }
    if let (Some(h), Some(o)) = (r.cgroup_high_events, r.cgroup_oom_events) {
        v.push(format!("ev h{h} o{o}"));
    }
    if let (Some(t), Some(tr)) = (r.temp_mc, r.trip_mc) {
        if t != 50_000 {
            v.push(format!(
                "{:.0}/{:.0}°C",
                t as f64 / 1000.0,
                tr as f64 / 1000.0
            ));
        }
    }
    if let Some(c) = r.cpufreq_ratio {
        if c < 1.0 {
            v.push(format!("freq {c}"));
        }
    }
    match (r.on_battery, r.battery_percent, r.battery_level.as_deref()) {
        (true, Some(p), Some(l)) => v.push(format!("BAT {p}% {l}")),
        (true, _, _) => v.push("BAT".into()),
        (false, Some(p), _) if p < 100 => v.push(format!("AC {p}%")),
        (false, Some(_), _) => v.push("AC".into()),
        (false, None, _) => {}
    }
    if let Some(w) = r.upower_warning {
        v.push(format!("UPower {}", w.name()));
    }
    if v.is_empty() {
        "(nothing read)".into()
    } else {
        v.join(" ")
    }
}

/// One sample of a trace; `pin`: call `Policy::pin` before observing.
#[derive(Clone, Debug)]
struct Step {
    t_ms: u64,
    r: Readings,
    pin: Option<Option<Tier>>,
}

/// Samples every `step_s` from `from_s` up to, not including, `to_s`, readings by time.
fn seg(from_s: u64, to_s: u64, step_s: u64, f: impl Fn(u64) -> R) -> Vec<Step> {
    (from_s..to_s)
        .step_by(step_s as usize)
        .map(|t| Step {
            t_ms: t * S,
            r: f(t).0,
            pin: None,
        })
        .collect()
}

fn pin_at(t_s: u64, tier: Option<Tier>, r: R) -> Step {
    Step {
        t_ms: t_s * S,
        r: r.0,
        pin: Some(tier),
    }
}

/// What happened at one sample.
#[derive(Debug)]
struct Row {
    t_ms: u64,
    tier: Tier,
    transition: Option<Transition>,
    actions: Vec<Action>,
}

/// The printed table: a line per transition and per change of readings, runs of quiet
/// samples folded to their first and last.
struct Table {
    out: String,
    quiet: Vec<String>,
}

impl Table {
    const W: usize = 52;

    fn new(name: &str) -> Table {
        Table {
            out: format!(
                "\n### {name}\n{:>7}  {:<w$} {:<9} transition ⇒ actions\n",
                "t s",
                "trace",
                "tier",
                w = Table::W
            ),
            quiet: Vec::new(),
        }
    }

    fn flush(&mut self) {
        let q = std::mem::take(&mut self.quiet);
        if q.len() <= 3 {
            q.iter().for_each(|l| self.out += l);
        } else {
            self.out += &q[0];
            self.out += &format!("{:>7}  ({} more samples)\n", "⋮", q.len() - 2);
            self.out += &q[q.len() - 1];
        }
    }

    fn quiet(&mut self, t: &str, sum: &str, tier: Tier) {
        let w = Table::W;
        self.quiet
            .push(format!("{t:>7}  {sum:<w$} {:<9}\n", tier.to_string()));
    }

    fn transition(&mut self, t: &str, sum: &str, x: &Transition, actions: &[Action]) {
        self.flush();
        let w = Table::W;
        let acts: Vec<String> = actions.iter().map(ToString::to_string).collect();
        self.out += &format!("{t:>7}  {sum:<w$} {:<9} {x}\n", x.to.to_string());
        self.out += &format!("{:>pad$}⇒ {}\n", "", acts.join(", "), pad = w + 19);
    }
}

/// Replays `steps` through `p`, prints the table, returns a row per sample.
fn replay(name: &str, p: &mut Policy, steps: &[Step], slices: &[(String, u64)]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut table = Table::new(name);
    let mut last_summary = String::new();
    for s in steps {
        let mut note = String::new();
        if let Some(pin) = s.pin {
            p.pin(pin);
            note = match pin {
                Some(t) => format!(" [pin {t}]"),
                None => " [unpin]".into(),
            };
        }
        let tr = p.observe(s.t_ms, &s.r);
        let actions = tr
            .as_ref()
            .map(|t| p.actions(t.to, slices))
            .unwrap_or_default();
        let sum = format!("{}{note}", summary(&s.r));
        let t = format!("{:.0}", s.t_ms as f64 / 1000.0);
        match &tr {
            Some(x) => table.transition(&t, &sum, x, &actions),
            None if sum != last_summary => table.quiet(&t, &sum, p.tier()),
            None => {}
        }
        last_summary = sum;
        rows.push(Row {
            t_ms: s.t_ms,
            tier: p.tier(),
            transition: tr,
            actions,
        });
    }
    table.flush();
    println!("{}", table.out);
    rows
}

/// (time in s, from, to) of every transition.
fn transitions(rows: &[Row]) -> Vec<(f64, Tier, Tier)> {
    rows.iter()
        .filter_map(|r| {
            r.transition
                .as_ref()
                .map(|t| (r.t_ms as f64 / 1000.0, t.from, t.to))
        })
        .collect()
}

fn reasons_at(rows: &[Row], t_s: u64) -> Vec<String> {
    rows.iter()
        .find(|r| r.t_ms == t_s * S)
        .and_then(|r| r.transition.as_ref())
        .map(|t| t.reasons.clone())
        .unwrap_or_else(|| panic!("no transition at {t_s} s"))
}

/// Asserts the policy never relaxed sooner than `dwell_s` after the previous transition.
fn assert_dwell(rows: &[Row], dwell_s: f64) {
    let tr = transitions(rows);
    for w in tr.windows(2) {
        if w[1].2 < w[1].1 {
            assert!(
                w[1].0 - w[0].0 >= dwell_s,
                "relaxed {:?} only {} s after {:?}",
                w[1],
                w[1].0 - w[0].0,
                w[0]
            );
        }
    }
}

use Tier::{Balanced as B, Critical as C, Full as F, Saver as Sv};

#[test]
fn memory_squeeze_and_recovery() {
    let mut p = Policy::default();
    let mut steps = seg(0, 10, 1, |_| R::calm());
    steps.extend(seg(10, 20, 1, |_| R::calm().mem(18.0)));
    steps.extend(seg(20, 30, 1, |_| R::calm().mem(8.0)));
    steps.extend(seg(30, 50, 1, |_| R::calm().mem(4.1)));
    steps.extend(seg(50, 170, 1, |_| R::calm().mem(40.0)));
    let rows = replay(
        "memory squeeze and recovery",
        &mut p,
        &steps,
        &official_slices(),
    );
    // Up at once, down one tier per 30 s once the last critical sample (49 s) is 30 s old.
    assert_eq!(
        transitions(&rows),
        [
            (10.0, F, B),
            (20.0, B, Sv),
            (30.0, Sv, C),
            (79.0, C, Sv),
            (109.0, Sv, B),
            (139.0, B, F)
        ]
    );
    assert_eq!(reasons_at(&rows, 10), ["MemAvailable 18.0% < 20%"]);
    assert_eq!(reasons_at(&rows, 30), ["MemAvailable 4.1% < 5%"]);
    let r = reasons_at(&rows, 79);
    assert_eq!(
        r[0],
        "nothing holds critical; critical for 49 s, not demanded for 30 s ≥ min dwell 30 s"
    );
    assert_eq!(r[1], "readings allow full; relaxing one tier at a time");
    assert_dwell(&rows, 30.0);

    // The actions, resolved against the official table.
    let at = |t| &rows.iter().find(|r| r.t_ms == t * S).unwrap().actions;
    assert_eq!(
        at(30),
        &[
            Action::AdmitBackground(false),
            Action::UnloadTowers,
            Action::DropPromptCache,
            Action::SetPleHotBytes(0),
            Action::LimitContext(Some(2048)),
            Action::LimitThreads(Some(1)),
            Action::SetSlice {
                name: "E2B".into(),
                force: true
            },
        ]
    );
    assert_eq!(
        at(79).last(),
        Some(&Action::SetSlice {
            name: "E1.96B".into(),
            force: false
        })
    );
    assert_eq!(
        at(109).last(),
        Some(&Action::SetSlice {
            name: "E2.98B".into(),
            force: false
        })
    );
    assert_eq!(
        at(139),
        &[
            Action::AdmitBackground(true),
            Action::AllowTowers,
            Action::SetPleHotBytes(8 << 20),
            Action::LimitContext(None),
            Action::LimitThreads(None),
            Action::SetSlice {
                name: "full".into(),
                force: false
            },
        ]
    );
}

#[test]
fn memory_recovery_through_the_leave_band() {
    // Leaving needs the enter threshold plus the 5-point margin: 7 % keeps critical
    // (< 10), 12 % keeps saver (< 15), 22 % keeps balanced (< 25).
    let mut p = Policy::default();
    let mut steps = seg(0, 10, 1, |_| R::calm().mem(4.0));
    steps.extend(seg(10, 80, 1, |_| R::calm().mem(7.0)));
    steps.extend(seg(80, 140, 1, |_| R::calm().mem(12.0)));
    steps.extend(seg(140, 200, 1, |_| R::calm().mem(22.0)));
    steps.extend(seg(200, 240, 1, |_| R::calm().mem(30.0)));
    let rows = replay(
        "memory recovery through the leave band",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [(0.0, F, C), (80.0, C, Sv), (140.0, Sv, B), (200.0, B, F)]
    );
    assert_eq!(
        reasons_at(&rows, 80)[1],
        "saver held: MemAvailable 12.0% < 15%"
    );
    assert_eq!(
        reasons_at(&rows, 140)[1],
        "balanced held: MemAvailable 22.0% < 25%"
    );
}

#[test]
fn psi_stall_burst() {
    let mut p = Policy::default();
    let mut steps = seg(0, 10, 1, |_| R::calm());
    steps.extend(seg(10, 20, 1, |_| R::calm().psi(15.0, 0.0)));
    steps.extend(seg(20, 30, 1, |_| R::calm().psi(45.0, 25.0)));
    steps.extend(seg(30, 130, 1, |_| R::calm().psi(3.0, 0.0)));
    let rows = replay("PSI stall burst", &mut p, &steps, &official_slices());
    assert_eq!(
        transitions(&rows),
        [
            (10.0, F, B),
            (20.0, B, C),
            (59.0, C, Sv),
            (89.0, Sv, B),
            (119.0, B, F)
        ]
    );
    assert_eq!(reasons_at(&rows, 10), ["PSI memory some avg10 15.00 > 10"]);
    assert_eq!(
        reasons_at(&rows, 20),
        [
            "PSI memory some avg10 45.00 > 40",
            "PSI memory full avg10 25.00 > 20"
        ]
    );
}

#[test]
fn laptop_unplugged_battery_drains_then_plugged_back() {
    let mut p = Policy::default();
    let mut steps = seg(0, 60, 5, |_| R::calm().ac(90));
    // One percent every 5 s from 90 %.
    steps.extend(seg(60, 500, 5, |t| {
        R::calm().battery(90 - ((t - 60) / 5) as u8)
    }));
    steps.extend(seg(500, 620, 5, |t| {
        R::calm().ac(3 + ((t - 500) / 30) as u8)
    }));
    let rows = replay(
        "laptop unplugged, battery drains to Low and Critical, plugged back",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [
            (60.0, F, B),
            (410.0, B, Sv),
            (485.0, Sv, C),
            (525.0, C, Sv),
            (555.0, Sv, B),
            (585.0, B, F)
        ]
    );
    assert_eq!(reasons_at(&rows, 60), ["on battery"]);
    assert_eq!(reasons_at(&rows, 410), ["battery 20% ≤ 20%"]);
    assert_eq!(reasons_at(&rows, 485), ["battery 5% ≤ 5%"]);
    // The firmware's Low level at 15 % keeps saver demanded without a change of tier.
    let low = rows.iter().find(|r| r.t_ms == 435 * S).unwrap();
    assert_eq!((low.tier, low.transition.is_none()), (Sv, true));
    // On AC the 3 % battery (level Critical) demands nothing; relaxing waits for the
    // last critical sample on battery (495 s) + 30 s.
    assert_dwell(&rows, 30.0);
}

#[test]
fn battery_level_alone() {
    // A battery that reports only capacity_level (no percentage).
    let mut p = Policy::default();
    let lvl = |l: &str| {
        let mut r = R::calm().battery(50);
        r.0.battery_percent = None;
        r.0.battery_level = Some(l.into());
        r
    };
    let mut steps = seg(0, 10, 1, |_| lvl("Normal"));
    steps.extend(seg(10, 20, 1, |_| lvl("Low")));
    steps.extend(seg(20, 30, 1, |_| lvl("Critical")));
    let rows = replay("battery level only", &mut p, &steps, &official_slices());
    assert_eq!(
        transitions(&rows),
        [(0.0, F, B), (10.0, B, Sv), (20.0, Sv, C)]
    );
    assert_eq!(reasons_at(&rows, 20), ["battery level Critical"]);
}

/// UPower runs: its OnBattery and warning level win over what sysfs says (here a
/// firmware that reports AC and a Normal level throughout).
#[test]
fn upower_on_battery_and_warning_levels() {
    let mut p = Policy::default();
    let up = |on_battery: bool, level: u32| {
        let mut r = R::calm().ac(60);
        r.0.merge_upower(&UpowerView {
            on_battery: Some(on_battery),
            warning_level: WarningLevel::from_dbus(level),
        });
        r
    };
    let mut steps = seg(0, 10, 1, |_| up(false, 1));
    steps.extend(seg(10, 20, 1, |_| up(true, 1)));
    steps.extend(seg(20, 30, 1, |_| up(true, 3)));
    steps.extend(seg(30, 40, 1, |_| up(true, 5)));
    // Unknown (0) falls back to the firmware's level (Normal): on battery only.
    steps.extend(seg(40, 120, 1, |_| up(true, 0)));
    steps.extend(seg(120, 160, 1, |_| up(false, 1)));
    let rows = replay(
        "UPower: on battery, warning low, action; firmware says AC, Normal",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [
            (10.0, F, B),
            (20.0, B, Sv),
            (30.0, Sv, C),
            (69.0, C, Sv),
            (99.0, Sv, B),
            (149.0, B, F)
        ]
    );
    assert_eq!(reasons_at(&rows, 10), ["on battery"]);
    assert_eq!(reasons_at(&rows, 20), ["UPower warning level low"]);
    assert_eq!(reasons_at(&rows, 30), ["UPower warning level action"]);
    assert_dwell(&rows, 30.0);
}

/// PSI trigger events: each believed one (the stall total grew) demands balanced for
/// that sample and restarts the dwell; one with no new stall (the spurious first event
/// after arming) demands nothing.
#[test]
fn psi_trigger_events() {
    let mut p = Policy::default();
    let ev = |total_ms: u64, fired: bool| {
        let mut r = R::calm();
        r.0.psi_some_total_us = Some(total_ms * 1000);
        r.0.psi_event = fired;
        r
    };
    // Armed at 0 s: an event with no stall since the last sample.
    let mut steps = seg(0, 1, 1, |_| ev(5_000, false));
    steps.extend(seg(1, 2, 1, |_| ev(5_000, true)));
    steps.extend(seg(2, 10, 1, |_| ev(5_000, false)));
    // Real stalls: 300 ms at 10 s, again at 20 s.
    steps.extend(seg(10, 11, 1, |_| ev(5_300, true)));
    steps.extend(seg(11, 20, 1, |_| ev(5_300, false)));
    steps.extend(seg(20, 21, 1, |_| ev(5_600, true)));
    steps.extend(seg(21, 60, 1, |_| ev(5_600, false)));
    let rows = replay("PSI trigger events", &mut p, &steps, &official_slices());
    assert_eq!(transitions(&rows), [(10.0, F, B), (50.0, B, F)]);
    assert_eq!(
        reasons_at(&rows, 10),
        ["PSI trigger fired: memory stalled 300 ms since the last sample"]
    );
    assert_dwell(&rows, 30.0);
}

#[test]
fn heat_soak_crossing_the_passive_trip_and_cooling() {
    let mut p = Policy::default();
    let mut steps = seg(0, 60, 5, |_| R::calm().heat(60.0, 95.0));
    // +1 °C every 5 s up to 102 °C (7 °C over the passive trip); the kernel's passive
    // cooling halves the clocks from 230 s.
    steps.extend(seg(60, 300, 5, |t| {
        let temp = (60.0 + (t - 60) as f64 / 5.0).min(102.0);
        let r = R::calm().heat(temp, 95.0);
        if t >= 230 {
            r.cpufreq(0.55)
        } else {
            r
        }
    }));
    // Cooling: −1 °C every 5 s.
    steps.extend(seg(300, 520, 5, |t| {
        R::calm().heat(102.0 - (t - 300) as f64 / 5.0, 95.0)
    }));
    let rows = replay(
        "heat soak crossing the passive trip and cooling",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [
            (185.0, F, B),
            (220.0, B, Sv),
            (260.0, Sv, C),
            (340.0, C, Sv),
            (380.0, Sv, B),
            (415.0, B, F)
        ]
    );
    assert_eq!(
        reasons_at(&rows, 185),
        ["x86_pkg_temp 85.0 °C, trip 95.0 °C: headroom 10.0 °C ≤ 10 °C"]
    );
    assert_eq!(
        reasons_at(&rows, 260),
        ["x86_pkg_temp 100.0 °C, trip 95.0 °C: headroom -5.0 °C ≤ -5 °C"]
    );
    assert_eq!(
        reasons_at(&rows, 380)[1],
        "balanced held: x86_pkg_temp 86.0 °C, trip 95.0 °C: headroom 9.0 °C ≤ 13 °C"
    );
    assert_dwell(&rows, 30.0);
}

#[test]
fn cpufreq_throttling_alone() {
    // Off by default (idle laptop cores read low); a board that runs flat out opts in.
    let mut quiet = Policy::default();
    let idle = seg(0, 60, 1, |_| R::calm().cpufreq(0.2));
    let rows = replay(
        "cpufreq low by default",
        &mut quiet,
        &idle,
        &official_slices(),
    );
    assert!(transitions(&rows).is_empty());
    let mut cfg = PolicyConfig::default();
    cfg.heat.cpufreq_balanced_ratio = Some(0.6);
    let mut p = Policy::new(cfg);
    let mut steps = seg(0, 10, 1, |_| R::calm().cpufreq(0.95));
    steps.extend(seg(10, 40, 1, |_| R::calm().cpufreq(0.5)));
    steps.extend(seg(40, 60, 1, |_| R::calm().cpufreq(0.65)));
    steps.extend(seg(60, 100, 1, |_| R::calm().cpufreq(0.8)));
    let rows = replay("cpufreq throttling", &mut p, &steps, &official_slices());
    // 0.65 is inside the band (< 0.7): balanced holds until 60 s; the last demand (0.5 at
    // 39 s) + 30 s lets it go at 69 s.
    assert_eq!(transitions(&rows), [(10.0, F, B), (69.0, B, F)]);
    assert_eq!(reasons_at(&rows, 10), ["cpufreq ratio 0.50 < 0.6"]);
}

#[test]
fn flapping_around_the_enter_threshold() {
    // MemAvailable alternates 19.5 / 20.5 % every second for 3 minutes.
    let mut p = Policy::default();
    let mut steps = seg(0, 180, 1, |t| {
        R::calm().mem(if t % 2 == 0 { 19.5 } else { 20.5 })
    });
    steps.extend(seg(180, 240, 1, |_| R::calm().mem(30.0)));
    let rows = replay(
        "flapping around the balanced enter threshold (20 %)",
        &mut p,
        &steps,
        &official_slices(),
    );
    // One entry; the relax waits 30 s after the last sample under 20 % (178 s).
    assert_eq!(transitions(&rows), [(0.0, F, B), (208.0, B, F)]);
}

#[test]
fn flapping_psi_around_the_saver_threshold() {
    let mut p = Policy::default();
    let mut steps = seg(0, 120, 1, |t| {
        R::calm().psi(if t % 2 == 0 { 19.0 } else { 21.0 }, 0.0)
    });
    steps.extend(seg(120, 200, 1, |_| R::calm().psi(2.0, 0.0)));
    let rows = replay(
        "PSI some flapping around the saver threshold (20)",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [(0.0, F, B), (1.0, B, Sv), (149.0, Sv, B), (179.0, B, F)]
    );
}

#[test]
fn wide_swings_do_not_flap() {
    // 19 % and 26 % in turn, 10 s each: each 19 % sample demands balanced again, so the
    // dwell restarts and the policy stays put instead of flapping every 30 s.
    let mut p = Policy::default();
    let mut steps = seg(0, 300, 10, |t| {
        R::calm().mem(if (t / 10) % 2 == 0 { 19.0 } else { 26.0 })
    });
    steps.extend(seg(300, 400, 10, |_| R::calm().mem(26.0)));
    let rows = replay(
        "wide swings 19 % ↔ 26 % every 10 s",
        &mut p,
        &steps,
        &official_slices(),
    );
    // The last 19 % sample is at 280 s.
    assert_eq!(transitions(&rows), [(0.0, F, B), (310.0, B, F)]);
}

#[test]
fn flapping_around_the_leave_threshold() {
    // In balanced; MemAvailable alternates 24.5 / 25.5 % around the leave threshold (25):
    // the first 25.5 % sample after the dwell relaxes, and 24.5 % does not re-enter (< 20
    // needed).
    let mut p = Policy::default();
    let mut steps = seg(0, 5, 1, |_| R::calm().mem(15.0));
    steps.extend(seg(5, 200, 1, |t| {
        R::calm().mem(if t % 2 == 0 { 24.5 } else { 25.5 })
    }));
    let rows = replay(
        "flapping around the balanced leave threshold (25 %)",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(transitions(&rows), [(0.0, F, B), (35.0, B, F)]);
}

#[test]
fn missing_readings_stay_full() {
    let mut p = Policy::default();
    let mut steps = seg(0, 60, 1, |_| R::new());
    // Garbage and half-readings: no MemTotal, a zero MemTotal, NaN PSI, an unset (0) or
    // invalid (-274 °C) trip with a hot zone, a cgroup without limits, a first sight of
    // large event counters, a dead battery while on AC.
    steps.extend(seg(60, 120, 1, |t| {
        let mut r = R::new().ac(2);
        r.0.battery_level = Some("Critical".into());
        r.0.mem_available = Some(0);
        r.0.mem_total = if t % 2 == 0 { None } else { Some(0) };
        r.0.psi_some_avg10 = Some(f64::NAN);
        r.0.psi_full_avg10 = Some(f64::INFINITY);
        r.0.temp_mc = Some(120_000);
        r.0.trip_mc = Some(if t % 2 == 0 { 0 } else { -274_000 });
        r.0.cgroup_current = Some(100 * GIB);
        r.0.cgroup_high_events = Some(1_000);
        r.0.cgroup_oom_events = Some(3);
        r.0.cpufreq_ratio = Some(f64::NAN);
        r
    }));
    let rows = replay(
        "sensor readings missing or garbage",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert!(transitions(&rows).is_empty());
    assert!(rows.iter().all(|r| r.tier == F));
}

#[test]
fn readings_that_vanish_relax_and_never_raise() {
    let mut p = Policy::default();
    let mut steps = seg(0, 10, 1, |_| R::calm().mem(4.0));
    steps.extend(seg(10, 120, 1, |_| R::new()));
    let rows = replay(
        "readings vanish while critical",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [(0.0, F, C), (39.0, C, Sv), (69.0, Sv, B), (99.0, B, F)]
    );
}

#[test]
fn cgroup_near_memory_high_and_events() {
    // memory.high 4 GiB, memory.max 5 GiB; 12 high events before the daemon started.
    let mut p = Policy::default();
    let cg =
        |cur: f64, high_ev: u64, oom: u64| R::calm().cgroup(cur, 4.0, 5.0).events(high_ev, oom);
    let mut steps = seg(0, 30, 1, |_| cg(2.0, 12, 0));
    steps.extend(seg(30, 60, 1, |_| cg(3.4, 12, 0)));
    steps.extend(seg(60, 90, 1, |_| cg(3.7, 12, 0)));
    steps.extend(seg(90, 91, 1, |_| cg(3.7, 15, 0)));
    steps.extend(seg(91, 100, 1, |_| cg(3.7, 15, 0)));
    steps.extend(seg(100, 150, 1, |_| cg(3.5, 15, 0)));
    steps.extend(seg(150, 200, 1, |_| cg(2.0, 15, 0)));
    steps.extend(seg(200, 201, 1, |_| cg(2.0, 15, 1)));
    steps.extend(seg(201, 300, 1, |_| cg(2.0, 15, 1)));
    let rows = replay(
        "cgroup near memory.high, a new high event, later an OOM event",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [
            (30.0, F, B),
            (60.0, B, Sv),
            (90.0, Sv, C),
            (120.0, C, Sv),
            (150.0, Sv, B),
            (180.0, B, F),
            (200.0, F, C),
            (230.0, C, Sv),
            (260.0, Sv, B),
            (290.0, B, F)
        ]
    );
    assert_eq!(
        reasons_at(&rows, 30),
        ["cgroup memory.current/memory.high 0.850 ≥ 0.8"]
    );
    assert_eq!(
        reasons_at(&rows, 90),
        ["cgroup memory.high exceeded: 3 new high event(s)"]
    );
    assert_eq!(
        reasons_at(&rows, 120)[1],
        "saver held: cgroup memory.current/memory.high 0.875 ≥ 0.85"
    );
    assert_eq!(reasons_at(&rows, 200), ["cgroup OOM: 1 new oom event(s)"]);
}

#[test]
fn cgroup_max_only() {
    // No memory.high: the ratio is against memory.max.
    let mut p = Policy::default();
    let mut r = R::calm();
    r.0.cgroup_current = Some(39 * GIB / 10);
    r.0.cgroup_max = Some(4 * GIB);
    let rows = replay(
        "cgroup at 97.5 % of memory.max",
        &mut p,
        &seg(0, 5, 1, |_| r.clone()),
        &official_slices(),
    );
    assert_eq!(transitions(&rows), [(0.0, F, C)]);
    assert_eq!(
        reasons_at(&rows, 0),
        ["cgroup memory.current/memory.max 0.975 ≥ 0.97"]
    );
}

#[test]
fn pin_and_unpin() {
    let mut p = Policy::default();
    let squeeze = || R::calm().mem(4.0);
    let mut steps = seg(0, 10, 1, |_| R::calm());
    steps.push(pin_at(10, Some(Sv), R::calm()));
    steps.extend(seg(11, 20, 1, |_| R::calm()));
    steps.extend(seg(20, 40, 1, |_| squeeze()));
    steps.push(pin_at(40, None, squeeze()));
    steps.extend(seg(41, 50, 1, |_| squeeze()));
    steps.push(pin_at(50, Some(F), squeeze()));
    steps.extend(seg(51, 70, 1, |_| R::calm()));
    steps.push(pin_at(70, Some(C), R::calm()));
    steps.extend(seg(71, 80, 1, |_| R::calm()));
    steps.push(pin_at(80, None, R::calm()));
    steps.extend(seg(81, 90, 1, |_| R::calm()));
    steps.push(pin_at(90, Some(F), R::calm()));
    steps.extend(seg(91, 110, 1, |_| squeeze()));
    steps.push(pin_at(110, None, squeeze()));
    let rows = replay("pin and unpin", &mut p, &steps, &official_slices());
    assert_eq!(
        transitions(&rows),
        [
            (10.0, F, Sv),
            (40.0, Sv, C),
            (50.0, C, F),
            (70.0, F, C),
            (80.0, C, F),
            (110.0, F, C)
        ]
    );
    assert_eq!(
        reasons_at(&rows, 10),
        ["pinned to saver by an administrator"]
    );
    assert_eq!(
        reasons_at(&rows, 40),
        ["unpinned: the readings decide", "MemAvailable 4.0% < 5%"]
    );
    // Pinned full under a squeeze: the readings are ignored.
    assert!(rows
        .iter()
        .filter(|r| (51..70).contains(&(r.t_ms / S)) || (91..110).contains(&(r.t_ms / S)))
        .all(|r| r.tier == F));
    // Unpinning relaxes at once: the dwell is for the readings, not for the admin.
    assert_eq!(reasons_at(&rows, 80), ["unpinned: the readings decide"]);
    // Pinning the current tier changes nothing but holds it.
    let at90 = rows.iter().find(|r| r.t_ms == 90 * S).unwrap();
    assert!(at90.transition.is_none());
    assert_eq!(p.pinned(), None);
}

#[test]
fn pin_then_unpin_before_a_sample_is_nothing() {
    let mut p = Policy::default();
    assert_eq!(p.observe(0, &R::calm().0), None);
    p.pin(Some(C));
    p.pin(None);
    assert_eq!(p.observe(1000, &R::calm().0), None);
    p.pin(Some(Sv));
    p.pin(Some(C));
    let t = p.observe(2000, &R::calm().0).unwrap();
    assert_eq!((t.from, t.to), (F, C));
    assert_eq!(p.pinned(), Some(C));
}

#[test]
fn configured_dwell_per_tier() {
    let mut cfg = PolicyConfig {
        min_dwell_ms: 5_000,
        ..PolicyConfig::default()
    };
    cfg.tiers.critical.min_dwell_ms = Some(60_000);
    let mut p = Policy::new(cfg);
    let mut steps = seg(0, 5, 1, |_| R::calm().mem(4.0));
    steps.extend(seg(5, 100, 1, |_| R::calm()));
    let rows = replay(
        "min_dwell_ms 5 s, critical 60 s",
        &mut p,
        &steps,
        &official_slices(),
    );
    assert_eq!(
        transitions(&rows),
        [(0.0, F, C), (64.0, C, Sv), (69.0, Sv, B), (74.0, B, F)]
    );
}

#[test]
fn several_signals_take_the_max() {
    // On battery (balanced) + warm (balanced) + PSI (saver) → saver; the battery alone
    // keeps balanced after the stall.
    let mut p = Policy::default();
    let mut steps = seg(0, 10, 1, |_| R::calm().battery(60).heat(88.0, 95.0));
    steps.extend(seg(10, 20, 1, |_| {
        R::calm().battery(60).heat(88.0, 95.0).psi(25.0, 0.0)
    }));
    steps.extend(seg(20, 80, 1, |_| R::calm().battery(60)));
    let rows = replay("several signals", &mut p, &steps, &official_slices());
    assert_eq!(
        transitions(&rows),
        [(0.0, F, B), (10.0, B, Sv), (49.0, Sv, B)]
    );
    assert_eq!(
        reasons_at(&rows, 0),
        [
            "x86_pkg_temp 88.0 °C, trip 95.0 °C: headroom 7.0 °C ≤ 10 °C",
            "on battery"
        ]
    );
    assert_eq!(reasons_at(&rows, 49)[1], "balanced held: on battery");
}

#[test]
fn actions_per_tier_and_slice_table() {
    let p = Policy::default();
    let only_full = vec![("full".to_string(), 3_980_000_000)];
    let slice = |t: Tier, table: &[(String, u64)]| match p.actions(t, table).last() {
        Some(Action::SetSlice { name, force }) => (name.clone(), *force),
        a => panic!("{a:?}"),
    };
    let mut out = String::from("\n### actions per tier\n");
    for t in Tier::ALL {
        let acts: Vec<String> = p
            .actions(t, &official_slices())
            .iter()
            .map(ToString::to_string)
            .collect();
        out += &format!("{t:<9} ⇒ {}\n", acts.join(", "));
    }
    println!("{out}");
    let official = official_slices();
    assert_eq!(slice(F, &official), ("full".into(), false));
    assert_eq!(slice(B, &official), ("E2.98B".into(), false));
    assert_eq!(slice(Sv, &official), ("E1.96B".into(), false));
    assert_eq!(slice(C, &official), ("E2B".into(), true));
    for t in Tier::ALL {
        assert_eq!(slice(t, &only_full).0, "full", "{t}");
        assert_eq!(slice(t, &[]).0, "full", "{t}");
    }
    // A table without a slice small enough for auto: the smallest one.
    let big = vec![
        ("full".to_string(), 100),
        ("big".to_string(), 90),
        ("bigger".to_string(), 95),
    ];
    assert_eq!(slice(Sv, &big).0, "big");
    assert_eq!(slice(B, &big).0, "big");
    // A named slice is passed through.
    let mut cfg = PolicyConfig::default();
    cfg.tiers.balanced.slice = "E2.54B".to_string().into();
    assert_eq!(
        Policy::new(cfg).actions(B, &official).last(),
        Some(&Action::SetSlice {
            name: "E2.54B".into(),
            force: false
        })
    );
    // "none" PLE budget: no PLE action at all.
    let mut cfg = PolicyConfig::default();
    cfg.tiers.saver.ple_hot_bytes = None;
    assert!(!Policy::new(cfg)
        .actions(Sv, &official)
        .iter()
        .any(|a| matches!(a, Action::SetPleHotBytes(_))));
}

#[test]
fn display() {
    let shown: Vec<String> = [
        Action::SetSlice {
            name: "E2B".into(),
            force: true,
        },
        Action::SetSlice {
            name: "full".into(),
            force: false,
        },
        Action::UnloadTowers,
        Action::AllowTowers,
        Action::SetPleHotBytes(2 << 20),
        Action::SetPleHotBytes(0),
        Action::LimitContext(Some(2048)),
        Action::LimitContext(None),
        Action::LimitThreads(Some(1)),
        Action::LimitThreads(None),
        Action::AdmitBackground(false),
        Action::AdmitBackground(true),
        Action::DropPromptCache,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(
        shown,
        [
            "slice E2B (forced)",
            "slice full",
            "unload towers",
            "allow towers",
            "PLE hot rows 2 MiB",
            "PLE hot rows off",
            "context ≤ 2048 tokens",
            "context uncapped",
            "threads ≤ 1",
            "threads uncapped",
            "refuse background",
            "admit background",
            "drop prompt cache"
        ]
    );
    let t = Transition {
        from: F,
        to: C,
        reasons: vec!["MemAvailable 4.1% < 5%".into()],
    };
    assert_eq!(t.to_string(), "full → critical: MemAvailable 4.1% < 5%");
}
