//! The governor loop: reads the sensors, runs the policy and applies its actions through
//! the engine's control path (the same command inbox admin requests use). Sensors and
//! policy are `gemmad-governor`'s; this is the glue that runs them in the service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gemmad_engine::Control;
use gemmad_governor::sensors::PsiTrigger;
use gemmad_governor::{Action, GovernorConfig, Policy, Readings, Sensors, Tier};

use crate::core::{Core, GovernorShared};

/// How many applied actions Status keeps.
const LAST_ACTIONS: usize = 16;

/// Starts the loop on its own thread. `rt` runs the engine commands; `stop` ends it.
pub fn spawn(
    cfg: GovernorConfig,
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let shared = Arc::new(GovernorShared::default());
    core.attach_governor(shared.clone());
    std::thread::Builder::new()
        .name("gemmad-governor".into())
        .spawn(move || Loop::new(cfg, core, rt, shared).run(&stop))
}

struct Loop {
    cfg: GovernorConfig,
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    shared: Arc<GovernorShared>,
    sensors: Sensors,
    policy: Policy,
    trigger: Option<PsiTrigger>,
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
    ) -> Loop {
        let sensors = Sensors::new(
            cfg.procfs_root.clone(),
            cfg.sysfs_root.clone(),
            cfg.cgroup_dir.clone(),
        );
        // Memory pressure wakes the loop at once: systemd's MemoryPressureWatch= when it
        // set one, else our own PSI trigger (200 ms stalled in 2 s, systemd's default;
        // without CAP_SYS_RESOURCE the kernel takes only multiples of 2 s windows).
        let trigger = match PsiTrigger::from_systemd_env() {
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
        };
        let st = core.engine_state();
        Loop {
            policy: Policy::new(cfg.policy.clone()),
            cfg,
            core,
            rt,
            shared,
            sensors,
            trigger,
            base_context: st.max_context,
            base_threads: st.threads,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let start = Instant::now();
        let interval = Duration::from_millis(self.cfg.interval_ms.max(10));
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            psi_trigger = self.trigger.is_some(),
            "governor running"
        );
        while !stop.load(Ordering::Relaxed) {
            let pin = self.shared.pin.lock().ok().and_then(|mut p| p.take());
            if let Some(tier) = pin {
                self.policy.pin(tier);
                tracing::info!(tier = ?tier, "governor pin");
                self.update(|s| s.pinned = tier.map(|t| t.to_string()));
            }
            let r = self.sensors.read();
            let now_ms = start.elapsed().as_millis() as u64;
            if let Some(t) = self.policy.observe(now_ms, &r) {
                let reasons = t.reasons.join("; ");
                tracing::info!(from = %t.from, to = %t.to, reasons = %reasons, "governor tier change");
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
                    self.apply(&a, t.to, &reasons);
                }
                self.update(|s| s.transitions += 1);
            }
            let tier = self.policy.tier();
            self.update(|s| {
                s.tier = tier.to_string();
                s.readings = readings_list(&r);
            });
            self.wait(interval, stop);
        }
    }

    /// Sleeps up to `interval`, waking early for a PSI event, a pin or `stop`.
    fn wait(&self, interval: Duration, stop: &AtomicBool) {
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            let pinned = self.shared.pin.lock().map(|p| p.is_some()).unwrap_or(false);
            if pinned {
                return;
            }
            let step = (until - Instant::now()).min(Duration::from_millis(50));
            match &self.trigger {
                Some(t) => {
                    if let Ok(true) = t.wait(step) {
                        tracing::debug!("PSI trigger fired");
                        return;
                    }
                }
                None => std::thread::sleep(step),
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
    fn apply(&self, a: &Action, tier: Tier, reasons: &str) {
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
        tracing::info!(action = %a, tier = %tier, reasons, outcome = %outcome, "governor action");
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

/// The readings Status shows, with units.
fn readings_list(r: &Readings) -> Vec<(String, f64, String)> {
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
    push("battery", r.battery_percent.map(f64::from), "percent");
    push("power", r.power_w, "watts");
    v
}
