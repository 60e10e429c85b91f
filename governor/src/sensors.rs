//! Sensors: memory (meminfo, PSI, the service's cgroup), heat (thermal zones, cpufreq)
//! and power (power_supply), read from procfs/sysfs/cgroup trees under configurable
//! roots. A missing or garbage source is a `None` reading, never an error: VMs and
//! containers have no thermal zones, batteries or cpufreq, and a kernel may lack PSI or
//! the v1 memory controller. Each source that yields nothing is logged once, at debug.
//!
//! [`PsiTrigger`] arms kernel PSI triggers (and systemd's `MemoryPressureWatch=`) and
//! [`CgroupEventWatch`] watches a cgroup2 `memory.events` with inotify; [`Watches`]
//! waits on both (and a [`Waker`]) in one `poll(2)`, so the governor loop wakes on memory
//! pressure instead of waiting for its next poll.

mod cgroup;
mod cgroup_events;
mod files;
mod memory;
mod power;
mod psi;
mod thermal;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

pub use cgroup::{Cgroup, CgroupVersion};
pub use cgroup_events::{CgroupEventWatch, EventCounts};
pub use power::{UpowerView, WarningLevel};
pub use psi::PsiTrigger;
pub use watch::{Waker, Watches, Woken};

/// One sample of everything the governor watches. `None`: the source is missing here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readings {
    /// `MemTotal`, `MemAvailable`, `SwapFree` of meminfo, bytes.
    pub mem_total: Option<u64>,
    pub mem_available: Option<u64>,
    pub swap_free: Option<u64>,
    /// PSI `pressure/memory`: `some avg10` and `full avg10`, percent.
    pub psi_some_avg10: Option<f64>,
    pub psi_full_avg10: Option<f64>,
    /// PSI `pressure/memory` `some total`: stall time so far, µs. The policy checks that
    /// it grew before it believes a PSI trigger event (the first event after arming may
    /// come on an idle machine).
    pub psi_some_total_us: Option<u64>,
    /// A PSI trigger (ours or systemd's pressure watch) fired since the last sample. Set
    /// by whoever waits on the [`PsiTrigger`] (the daemon's loop), not by [`Sensors::read`].
    pub psi_event: bool,
    /// The service's cgroup: memory in use, its `memory.max` and `memory.high` (`None`:
    /// unlimited or unknown), and the counts of `high`/`max`/`oom` events so far.
    /// v2: `memory.current`, `memory.max`, `memory.high`; `high_events` = `high` + `max`
    /// of `memory.events` (throttled above memory.high or reclaimed at memory.max),
    /// `oom_events` = its `oom` + `oom_kill` (the OOM killer ran; it killed).
    /// v1: `memory.usage_in_bytes`, `memory.limit_in_bytes`; no `high` (v1 has no
    /// throttle limit); `high_events` = `memory.failcnt` (times usage hit the limit),
    /// `oom_events` = `oom_kill` of `memory.oom_control`.
    pub cgroup_current: Option<u64>,
    pub cgroup_max: Option<u64>,
    pub cgroup_high: Option<u64>,
    pub cgroup_high_events: Option<u64>,
    pub cgroup_oom_events: Option<u64>,
    /// The thermal zone nearest to throttling (least margin to its trip; the hottest when
    /// no zone has a trip): its type, temperature and the temperature of its lowest
    /// passive (else hot, else critical) trip point, millidegrees Celsius.
    pub thermal_zone: Option<String>,
    pub temp_mc: Option<i64>,
    pub trip_mc: Option<i64>,
    /// Lowest `scaling_cur_freq / cpuinfo_max_freq` over the CPUs (1.0 = not throttled).
    pub cpufreq_ratio: Option<f64>,
    /// On battery: a battery that is discharging and no mains supply online. No battery
    /// at all is "on AC".
    pub on_battery: bool,
    /// Battery charge, percent, and its `capacity_level` (`Critical`, `Low`, ...).
    pub battery_percent: Option<u8>,
    pub battery_level: Option<String>,
    /// UPower's warning level, when UPower runs ([`Readings::merge_upower`]; sysfs
    /// reading leaves it `None`). The policy prefers it to `battery_level`.
    pub upower_warning: Option<WarningLevel>,
    /// Battery discharge power, watts.
    pub power_w: Option<f64>,
}

/// Where the sensors read from.
#[derive(Clone, Debug)]
pub struct Sensors {
    procfs_root: PathBuf,
    sysfs_root: PathBuf,
    cgroup: Option<Cgroup>,
    logged: LoggedOnce,
}

impl Sensors {
    /// Sensors reading `procfs_root` (normally `/proc`) and `sysfs_root` (`/sys`). The
    /// cgroup is `cgroup_dir` when given (v1 or v2, told by its files), else discovered
    /// once, now, from `<procfs>/self/cgroup` (see [`Cgroup::discover`]).
    pub fn new(procfs_root: PathBuf, sysfs_root: PathBuf, cgroup_dir: Option<PathBuf>) -> Sensors {
        let cgroup = match cgroup_dir {
            Some(dir) => Some(Cgroup::at(dir)),
            None => Cgroup::discover(&procfs_root, &sysfs_root),
        };
        match &cgroup {
            Some(c) => {
                tracing::debug!(dir = %c.dir.display(), version = ?c.version, "governor cgroup")
            }
            None => tracing::debug!("governor: no memory cgroup found"),
        }
        Sensors {
            procfs_root,
            sysfs_root,
            cgroup,
            logged: LoggedOnce::default(),
        }
    }

    pub fn procfs_root(&self) -> &Path {
        &self.procfs_root
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    /// The memory cgroup read, if any.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// One sample. Cheap (a few dozen small file reads); never fails.
    pub fn read(&self) -> Readings {
        let mem = files::read_str(&self.procfs_root.join("meminfo"))
            .map(|t| memory::parse_meminfo(&t))
            .unwrap_or_default();
        self.note_missing(Source::Meminfo, mem.total.is_none());

        let psi = files::read_str(&self.procfs_root.join("pressure/memory"))
            .map(|t| memory::parse_psi(&t))
            .unwrap_or_default();
        self.note_missing(Source::Psi, psi.some_avg10.is_none());

        let cg = self.cgroup.as_ref().map(Cgroup::read).unwrap_or_default();
        self.note_missing(Source::Cgroup, cg.current.is_none());

        let heat = thermal::read_thermal(&self.sysfs_root);
        self.note_missing(Source::Thermal, heat.is_none());

        let cpufreq_ratio = thermal::read_cpufreq_ratio(&self.sysfs_root);
        self.note_missing(Source::Cpufreq, cpufreq_ratio.is_none());

        let power = power::read_power(&self.sysfs_root);
        self.note_missing(Source::Battery, power.battery_percent.is_none());

        let (thermal_zone, temp_mc, trip_mc) = match heat {
            Some(h) => (Some(h.zone), Some(h.temp_mc), h.trip_mc),
            None => (None, None, None),
        };
        Readings {
            mem_total: mem.total,
            mem_available: mem.available,
            swap_free: mem.swap_free,
            psi_some_avg10: psi.some_avg10,
            psi_full_avg10: psi.full_avg10,
            psi_some_total_us: psi.some_total_us,
            psi_event: false,
            cgroup_current: cg.current,
            cgroup_max: cg.max,
            cgroup_high: cg.high,
            cgroup_high_events: cg.high_events,
            cgroup_oom_events: cg.oom_events,
            thermal_zone,
            temp_mc,
            trip_mc,
            cpufreq_ratio,
            on_battery: power.on_battery,
            battery_percent: power.battery_percent,
            battery_level: power.battery_level,
            upower_warning: None,
            power_w: power.power_w,
        }
    }

    fn note_missing(&self, source: Source, missing: bool) {
        if missing && self.logged.first(source) {
            tracing::debug!(
                source = source.name(),
                "governor sensor source missing here; reading None"
            );
        }
    }
}

/// The sources logged once each when they yield nothing.
#[derive(Clone, Copy)]
enum Source {
    Meminfo = 0,
    Psi = 1,
    Cgroup = 2,
    Thermal = 3,
    Cpufreq = 4,
    Battery = 5,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Meminfo => "meminfo",
            Source::Psi => "pressure/memory",
            Source::Cgroup => "cgroup",
            Source::Thermal => "thermal zones",
            Source::Cpufreq => "cpufreq",
            Source::Battery => "battery",
        }
    }
}

/// One bit per [`Source`]: set once it has been logged. Atomic so `read` can take
/// `&self`.
#[derive(Debug, Default)]
struct LoggedOnce(AtomicU8);

impl LoggedOnce {
    /// True the first time `source` is seen.
    fn first(&self, source: Source) -> bool {
        let bit = 1u8 << source as u8;
        self.0.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

impl Clone for LoggedOnce {
    fn clone(&self) -> Self {
        LoggedOnce(AtomicU8::new(self.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::files::testutil::put;
    use super::*;

    /// A whole fake machine: a laptop on battery in a cgroup2 service.
    #[test]
    fn read_combines_all_sources() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        put(
            &proc,
            "meminfo",
            "MemTotal: 8000 kB\nMemAvailable: 2000 kB\nSwapFree: 0 kB\n",
        );
        put(
            &proc,
            "pressure/memory",
            "some avg10=12.50 avg60=1.00 avg300=0.10 total=1\nfull avg10=3.25 avg60=0.00 avg300=0.00 total=1\n",
        );
        put(&proc, "self/cgroup", "0::/gemmad.service\n");
        put(&sys, "fs/cgroup/cgroup.controllers", "memory\n");
        put(&sys, "fs/cgroup/gemmad.service/memory.current", "1048576\n");
        put(&sys, "fs/cgroup/gemmad.service/memory.max", "max\n");
        put(&sys, "fs/cgroup/gemmad.service/memory.high", "2097152\n");
        put(
            &sys,
            "fs/cgroup/gemmad.service/memory.events",
            "high 1\nmax 0\noom 0\noom_kill 0\n",
        );
        put(&sys, "class/thermal/thermal_zone0/type", "cpu-thermal\n");
        put(&sys, "class/thermal/thermal_zone0/temp", "71000\n");
        put(
            &sys,
            "class/thermal/thermal_zone0/trip_point_0_type",
            "passive\n",
        );
        put(
            &sys,
            "class/thermal/thermal_zone0/trip_point_0_temp",
            "75000\n",
        );
        put(
            &sys,
            "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq",
            "600000\n",
        );
        put(
            &sys,
            "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
            "2400000\n",
        );
        put(&sys, "class/power_supply/BAT0/type", "Battery\n");
        put(&sys, "class/power_supply/BAT0/status", "Discharging\n");
        put(&sys, "class/power_supply/BAT0/capacity", "15\n");
        put(&sys, "class/power_supply/BAT0/capacity_level", "Low\n");
        put(&sys, "class/power_supply/BAT0/power_now", "7000000\n");

        let s = Sensors::new(proc.clone(), sys.clone(), None);
        assert_eq!(s.cgroup().map(|c| c.version), Some(CgroupVersion::V2));
        assert_eq!(
            s.read(),
            Readings {
                mem_total: Some(8000 * 1024),
                mem_available: Some(2000 * 1024),
                swap_free: Some(0),
                psi_some_avg10: Some(12.5),
                psi_full_avg10: Some(3.25),
                psi_some_total_us: Some(1),
                psi_event: false,
                cgroup_current: Some(1 << 20),
                cgroup_max: None,
                cgroup_high: Some(2 << 20),
                cgroup_high_events: Some(1),
                cgroup_oom_events: Some(0),
                thermal_zone: Some("cpu-thermal".into()),
                temp_mc: Some(71000),
                trip_mc: Some(75000),
                cpufreq_ratio: Some(0.25),
                on_battery: true,
                battery_percent: Some(15),
                battery_level: Some("Low".into()),
                upower_warning: None,
                power_w: Some(7.0),
            }
        );

        // A configured cgroup directory overrides discovery.
        put(&sys, "other/memory.usage_in_bytes", "5\n");
        let s = Sensors::new(proc, sys.clone(), Some(sys.join("other")));
        assert_eq!(
            s.cgroup(),
            Some(&Cgroup {
                dir: sys.join("other"),
                version: CgroupVersion::V1
            })
        );
        assert_eq!(s.read().cgroup_current, Some(5));
    }

    /// Empty roots: everything `None`, on AC, and no panic (twice, for the log-once path).
    #[test]
    fn empty_roots_read_nothing() {
        let t = tempfile::tempdir().unwrap();
        let s = Sensors::new(t.path().join("proc"), t.path().join("sys"), None);
        assert_eq!(s.cgroup(), None);
        assert_eq!(s.read(), Readings::default());
        assert_eq!(s.clone().read(), Readings::default());
    }

    #[test]
    fn logged_once_per_source() {
        let l = LoggedOnce::default();
        assert!(l.first(Source::Psi));
        assert!(!l.first(Source::Psi));
        assert!(l.first(Source::Battery));
        assert!(!l.clone().first(Source::Battery));
    }
}
