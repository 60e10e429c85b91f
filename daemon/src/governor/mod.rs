//! The governor loop: reads the sensors, runs the policy and applies its actions through
//! the engine's control path (the same command inbox admin requests use). Sensors and
//! policy are `gemmad-governor`'s; this is the glue that runs them in the service, plus
//! the one piece of IPC the governor uses: UPower on the system bus ([`upower`]).
//!
//! Between samples the loop waits in one `poll(2)` on the PSI trigger, the cgroup's
//! `memory.events` (cgroup2) and a waker the UPower reader calls, bounded by
//! `interval_ms`; every action is logged with what woke the loop (`woke_by`) and
//! CLOCK_MONOTONIC timestamps, so reaction times can be measured from the log.

mod upower;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gemmad_engine::Control;
use gemmad_governor::sensors::{CgroupEventWatch, CgroupVersion, PsiTrigger, Watches, Woken};
use gemmad_governor::{Action, GovernorConfig, Policy, Readings, Sensors, Tier};

use crate::core::{Core, GovernorShared};

/// How many applied actions Status keeps.
const LAST_ACTIONS: usize = 16;

/// How often a wait looks at the pin request and the stop flag (neither can wake the
/// poll).
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Starts the loop on its own thread. `rt` runs the engine commands and the UPower
/// reader; `stop` ends it.
pub fn spawn(
    cfg: GovernorConfig,
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let shared = Arc::new(GovernorShared::default());
    core.attach_governor(shared.clone());
    let lp = Loop::new(cfg, core, rt, shared)?;
    std::thread::Builder::new()
        .name("gemmad-governor".into())
        .spawn(move || lp.run(&stop))
}

/// CLOCK_MONOTONIC in microseconds: the clock other processes (a benchmark's own PSI
/// trigger) can compare with the log.
fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// Why a sample was taken, for the log.
#[derive(Clone, Debug)]
struct Wake {
    /// `start`, `timer`, `pin`, `psi`, `cgroup`, `upower` (several joined by `+`).
    by: String,
    /// The PSI trigger fired.
    psi: bool,
    /// CLOCK_MONOTONIC µs when the wait returned.
    at_us: u64,
}

impl Wake {
    fn new(by: &str) -> Wake {
        Wake {
            by: by.into(),
            psi: false,
            at_us: mono_us(),
        }
    }

    fn from(w: &Woken) -> Wake {
        Wake {
            // The waker is only handed to the UPower reader.
            by: w.name().replace("waker", "upower"),
            psi: w.psi,
            at_us: mono_us(),
        }
    }
}

struct Loop {
    cfg: GovernorConfig,
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    shared: Arc<GovernorShared>,
    sensors: Sensors,
    policy: Policy,
    watches: Watches,
    /// UPower's view, while its reader runs (`[governor] upower`).
    upower: Option<upower::Upower>,
    /// What the engine ran with before the governor capped it.
    base_context: usize,
    base_threads: usize,
}

impl Loop {
    fn new(
        cfg: GovernorConfig,
        core: Arc<Core>,
        rt: tokio::runtime::Handle,
        shared: Arc<GovernorShared>,
    ) -> std::io::Result<Loop> {
        let sensors = Sensors::new(
            cfg.procfs_root.clone(),
            cfg.sysfs_root.clone(),
            cfg.cgroup_dir.clone(),
        );
        let trigger = psi_trigger(&cfg);
        let cgroup_watch = cgroup_watch(&sensors);
        let watches = Watches::new(trigger, cgroup_watch)
            .map_err(|e| std::io::Error::new(e.kind(), format!("governor waker: {e}")))?;
        let upower = cfg
            .upower
            .then(|| upower::Upower::spawn(&rt, watches.waker()));
        let st = core.engine_state();
        Ok(Loop {
            policy: Policy::new(cfg.policy.clone()),
            cfg,
            core,
            rt,
            shared,
            sensors,
            watches,
            upower,
            base_context: st.max_context,
            base_threads: st.threads,
        })
    }

    fn run(mut self, stop: &AtomicBool) {
        let start = Instant::now();
        let interval = Duration::from_millis(self.cfg.interval_ms.max(10));
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            psi_trigger = self.watches.psi().is_some(),
            cgroup_events = self.watches.cgroup().is_some(),
            upower = self.upower.is_some(),
            "governor running"
        );
        let mut wake = Wake::new("start");
        while !stop.load(Ordering::Relaxed) {
            let pin = self.shared.pin.lock().ok().and_then(|mut p| p.take());
            if let Some(tier) = pin {
                self.policy.pin(tier);
                tracing::info!(tier = ?tier, "governor pin");
                self.update(|s| s.pinned = tier.map(|t| t.to_string()));
            }
            let mut r = self.sensors.read();
            r.psi_event = wake.psi;
            if let Some(view) = self.upower.as_ref().and_then(upower::Upower::view) {
                r.merge_upower(&view);
            }
            let now_ms = start.elapsed().as_millis() as u64;
            if let Some(t) = self.policy.observe(now_ms, &r) {
                let reasons = t.reasons.join("; ");
                tracing::info!(from = %t.from, to = %t.to, reasons = %reasons,
                    woke_by = %wake.by, woke_mono_us = wake.at_us, "governor tier change");
                let slices: Vec<(String, u64)> = self
                    .core
                    .engine_state()
                    .slices
                    .into_iter()
                    .map(|s| (s.name, s.params))
                    .collect();
                // A forced switch first: it applies between two decode steps, while the
                // others wait for the running request to end.
                let mut actions = self.policy.actions(t.to, &slices);
                actions.sort_by_key(|a| !matches!(a, Action::SetSlice { force: true, .. }));
                for a in actions {
                    self.apply(&a, t.to, &reasons, &wake);
                }
                self.update(|s| s.transitions += 1);
            }
            let tier = self.policy.tier();
            let upower_view = self.upower.as_ref().and_then(upower::Upower::view);
            self.update(|s| {
                s.tier = tier.to_string();
                s.readings = readings_list(&r, upower_view.is_some());
            });
            wake = self.wait(interval, stop);
        }
    }

    /// Waits up to `interval` for a PSI event, a `memory.events` rise, a UPower change, a
    /// pin or `stop`, and says which.
    fn wait(&mut self, interval: Duration, stop: &AtomicBool) -> Wake {
        let until = Instant::now() + interval;
        loop {
            let now = Instant::now();
            if now >= until || stop.load(Ordering::Relaxed) {
                return Wake::new("timer");
            }
            let pinned = self.shared.pin.lock().map(|p| p.is_some()).unwrap_or(false);
            if pinned {
                return Wake::new("pin");
            }
            let woken = self.watches.wait((until - now).min(CHECK_EVERY));
            if let Some(rise) = woken.cgroup {
                tracing::info!(
                    high = rise.high,
                    max = rise.max,
                    oom = rise.oom,
                    oom_kill = rise.oom_kill,
                    "cgroup memory.events counters rose"
                );
            }
            if woken.psi {
                tracing::debug!("PSI trigger fired");
            }
            if woken.any() {
                return Wake::from(&woken);
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut crate::core::types::GovernorSnapshot)) {
        if let Ok(mut s) = self.shared.snapshot.lock() {
            f(&mut s);
        }
    }

    /// Applies one action through the engine thread (waiting for it: between requests or
    /// between decode steps, as the command allows), and records it.
    fn apply(&self, a: &Action, tier: Tier, reasons: &str, wake: &Wake) {
        let controls: Vec<Control> = match a {
            Action::SetSlice { name, force } => vec![Control::SetSlice {
                name: name.clone(),
                force: *force,
            }],
            Action::UnloadTowers => self
                .core
                .engine_state()
                .towers
                .iter()
                .filter(|t| t.loaded)
                .map(|t| Control::UnloadTower(t.modality))
                .collect(),
            Action::AllowTowers => Vec::new(),
            Action::SetPleHotBytes(b) => {
                if self.core.engine_state().ple_hot_bytes.is_some() {
                    vec![Control::SetPleHotBytes(*b)]
                } else {
                    Vec::new()
                }
            }
            Action::LimitContext(n) => {
                vec![Control::LimitContext(
                    n.unwrap_or(self.base_context).min(self.base_context),
                )]
            }
            Action::LimitThreads(n) => {
                vec![Control::LimitThreads(
                    n.unwrap_or(self.base_threads)
                        .clamp(1, self.base_threads.max(1)),
                )]
            }
            Action::DropPromptCache => {
                if self.core.engine_state().prompt_cache.ram_bytes > 0 {
                    vec![Control::DropPromptCache]
                } else {
                    Vec::new()
                }
            }
            Action::AdmitBackground(admit) => {
                self.core
                    .queue()
                    .set_background_admission(*admit, &format!("tier {tier}"));
                Vec::new()
            }
        };
        let mut outcome = "applied".to_string();
        for c in controls {
            let state = self.core.engine_state();
            let noop = match &c {
                Control::SetSlice { name, .. } => state.slice == *name,
                Control::LimitContext(n) => state.max_context == *n,
                Control::LimitThreads(n) => state.threads == *n,
                Control::SetPleHotBytes(b) => state.ple_hot_bytes == Some(*b),
                _ => false,
            };
            if noop {
                continue;
            }
            if let Err(e) = self.rt.block_on(self.core.service_control(c.clone())) {
                outcome = format!("failed: {e}");
                tracing::warn!(action = %a, command = %c, error = %e, "governor action failed");
            }
        }
        let done_us = mono_us();
        tracing::info!(action = %a, tier = %tier, reasons, outcome = %outcome,
            woke_by = %wake.by, woke_mono_us = wake.at_us, mono_us = done_us,
            "governor action");
        let line = format!("{tier}: {a} ({outcome}; {reasons})");
        self.update(|s| {
            s.actions_applied += 1;
            s.last_actions.push(line);
            let n = s.last_actions.len();
            if n > LAST_ACTIONS {
                s.last_actions.drain(..n - LAST_ACTIONS);
            }
        });
    }
}

/// The readings Status shows, with units. `upower`: UPower's view was merged (then
/// `on_battery` is UPower's).
fn readings_list(r: &Readings, upower: bool) -> Vec<(String, f64, String)> {
    let mut v = Vec::new();
    let mut push = |name: &str, value: Option<f64>, unit: &str| {
        if let Some(x) = value {
            v.push((name.to_string(), x, unit.to_string()));
        }
    };
    push("mem_total", r.mem_total.map(|x| x as f64), "bytes");
    push("mem_available", r.mem_available.map(|x| x as f64), "bytes");
    push("swap_free", r.swap_free.map(|x| x as f64), "bytes");
    push("psi_some_avg10", r.psi_some_avg10, "percent");
    push("psi_full_avg10", r.psi_full_avg10, "percent");
    push(
        "cgroup_current",
        r.cgroup_current.map(|x| x as f64),
        "bytes",
    );
    push("cgroup_max", r.cgroup_max.map(|x| x as f64), "bytes");
    push("cgroup_high", r.cgroup_high.map(|x| x as f64), "bytes");
    push("temp", r.temp_mc.map(|x| x as f64 / 1000.0), "celsius");
    push("trip", r.trip_mc.map(|x| x as f64 / 1000.0), "celsius");
    push("cpufreq_ratio", r.cpufreq_ratio, "ratio");
    push(
        "on_battery",
        Some(if r.on_battery { 1.0 } else { 0.0 }),
        "bool",
    );
    push("upower", upower.then_some(1.0), "bool");
    push(
        "upower_warning_level",
        r.upower_warning.map(|w| f64::from(w.to_dbus())),
        "enum",
    );
    push("battery", r.battery_percent.map(f64::from), "percent");
    push("power", r.power_w, "watts");
    v
}

/// Memory pressure wakes the loop at once: systemd's MemoryPressureWatch= when it set one,
/// else our own PSI trigger (200 ms stalled in 2 s, systemd's default; without
/// CAP_SYS_RESOURCE the kernel takes only multiples of 2 s windows).
fn psi_trigger(cfg: &GovernorConfig) -> Option<PsiTrigger> {
    match PsiTrigger::from_systemd_env() {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::info!("MemoryPressureWatch is off; the governor polls");
            None
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "MEMORY_PRESSURE_WATCH is set but cannot be used; polling");
            None
        }
        None => {
            let path = cfg.procfs_root.join("pressure/memory");
            match PsiTrigger::register(&path, "some", 200_000, 2_000_000) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "no PSI trigger; the governor polls");
                    None
                }
            }
        }
    }
}

/// On cgroup2, a rise of the cgroup's `memory.events` counters wakes the loop at once.
fn cgroup_watch(sensors: &Sensors) -> Option<CgroupEventWatch> {
    let cg = sensors.cgroup()?;
    if cg.version != CgroupVersion::V2 {
        tracing::debug!(dir = %cg.dir.display(), "v1 memory cgroup: memory.events is not watched");
        return None;
    }
    match CgroupEventWatch::new(cg) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::info!(error = %e, "memory.events is not watched; the governor polls it");
            None
        }
    }
}
