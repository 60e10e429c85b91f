//! The sensors and PSI triggers against the running kernel's /proc and /sys. Where this
//! machine lacks a source, the test asserts the `None` it must then read, judged from the
//! tree itself, so a broken parser cannot pass as "missing here".

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use gemmad_governor::sensors::{CgroupVersion, PsiTrigger};
use gemmad_governor::Sensors;

fn has_entry_with_prefix(dir: &str, prefix: &str) -> bool {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
        .unwrap_or(false)
}

#[test]
fn real_proc_and_sys() {
    let s = Sensors::new("/proc".into(), "/sys".into(), None);
    let r = s.read();
    println!("cgroup: {:?}\nreadings: {r:#?}", s.cgroup());

    // meminfo exists on every Linux this runs on.
    let total = r.mem_total.expect("MemTotal");
    let avail = r.mem_available.expect("MemAvailable");
    assert!(
        total > 64 << 20 && avail <= total,
        "total {total} available {avail}"
    );
    assert!(
        r.swap_free.is_some(),
        "SwapFree is printed even without swap"
    );

    if Path::new("/proc/pressure/memory").exists() {
        let some = r.psi_some_avg10.expect("PSI some avg10");
        let full = r.psi_full_avg10.expect("PSI full avg10");
        assert!((0.0..=100.0).contains(&some) && (0.0..=100.0).contains(&full));
    } else {
        assert_eq!((r.psi_some_avg10, r.psi_full_avg10), (None, None));
    }

    // The cgroup: on a pure cgroup2 host our own v2 cgroup, on a legacy/hybrid host (the
    // test host: `4:memory:/process_api/...`) the v1 memory cgroup.
    let self_cgroup = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let unified = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").ok();
    let v1_line = self_cgroup.lines().any(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "memory"))
    });
    let expect = match (&unified, v1_line) {
        (Some(c), v1) if c.split_whitespace().any(|c| c == "memory") || !v1 => {
            Some(CgroupVersion::V2)
        }
        (_, true) => Some(CgroupVersion::V1),
        _ => None,
    };
    assert_eq!(s.cgroup().map(|c| c.version), expect);
    match expect {
        Some(CgroupVersion::V1) => {
            let dir = &s.cgroup().unwrap().dir;
            assert!(
                dir.starts_with("/sys/fs/cgroup/memory"),
                "{}",
                dir.display()
            );
            let usage = r.cgroup_current.expect("memory.usage_in_bytes");
            assert!(usage > 0);
            let limit: u64 = fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(r.cgroup_max, (limit < 1 << 62).then_some(limit));
            assert_eq!(r.cgroup_high, None);
            assert!(r.cgroup_high_events.is_some(), "memory.failcnt");
        }
        Some(CgroupVersion::V2) => {
            // The root cgroup (e.g. inside a cgroup namespace) has no memory.current.
            let dir = &s.cgroup().unwrap().dir;
            assert_eq!(
                r.cgroup_current.is_some(),
                dir.join("memory.current").exists()
            );
        }
        None => assert_eq!(r.cgroup_current, None),
    }

    // Heat and power: VMs and containers (the test host) have neither zones, cpufreq nor
    // supplies; with them, a reading must come out.
    let zone_with_temp = fs::read_dir("/sys/class/thermal").ok().is_some_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            e.file_name().to_string_lossy().starts_with("thermal_zone")
                && fs::read_to_string(e.path().join("temp"))
                    .ok()
                    .and_then(|t| t.trim().parse::<i64>().ok())
                    .is_some_and(|t| (-40_000..=200_000).contains(&t))
        })
    });
    assert_eq!(
        r.temp_mc.is_some(),
        zone_with_temp,
        "thermal zone {:?}",
        r.thermal_zone
    );
    let cpufreq = Path::new("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").exists();
    assert_eq!(r.cpufreq_ratio.is_some(), cpufreq);
    if let Some(ratio) = r.cpufreq_ratio {
        assert!((0.0..=1.0).contains(&ratio));
    }
    if !has_entry_with_prefix("/sys/class/power_supply", "") {
        assert!(!r.on_battery);
        assert_eq!(
            (r.battery_percent, r.battery_level.as_deref(), r.power_w),
            (None, None, None)
        );
    }
}

/// Whether CAP_SYS_RESOURCE (bit 24) is in our effective set: it decides which PSI
/// windows the kernel accepts.
fn has_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(eff.trim(), 16).expect("hex CapEff") & (1 << 24) != 0
}

#[test]
fn real_psi_trigger() {
    let path = Path::new("/proc/pressure/memory");
    if !path.exists() {
        // No PSI in this kernel: registering must say so, not pretend.
        let e = PsiTrigger::register(path, "some", 150_000, 2_000_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        return;
    }
    // A 2 s window is allowed to everyone since Linux 6.4 (and to privileged callers
    // before): systemd's default trigger.
    let t = PsiTrigger::register(path, "some", 200_000, 2_000_000).expect("2 s PSI trigger");
    let start = Instant::now();
    let fired = t.wait(Duration::from_millis(200)).expect("wait");
    println!("2 s trigger: fired={fired} after {:?}", start.elapsed());
    assert!(fired || start.elapsed() >= Duration::from_millis(200));
    // Each fd carries its own trigger.
    let full = PsiTrigger::register(path, "full", 100_000, 2_000_000).expect("full trigger");
    assert!(full.wait(Duration::from_millis(10)).is_ok());

    // A 1 s window needs CAP_SYS_RESOURCE (the test host runs as root without it).
    let one_second = PsiTrigger::register(path, "some", 150_000, 1_000_000);
    println!(
        "1 s trigger with CAP_SYS_RESOURCE={}: {:?}",
        has_cap_sys_resource(),
        one_second.as_ref().err()
    );
    if has_cap_sys_resource() {
        assert!(one_second.is_ok());
    } else {
        assert_eq!(one_second.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }
    // Rules every caller is held to: stall above window, window above 10 s.
    for (stall, window) in [(3_000_000, 2_000_000), (100_000, 12_000_000)] {
        let e = PsiTrigger::register(path, "some", stall, window).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{stall} {window}");
    }
}
