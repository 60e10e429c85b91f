//! The governor in a real `gemmad serve`: a fake procfs/sysfs/cgroup tree given by the
//! `[governor]` roots drives the tier, and the tier the model's size (the MatFormer
//! fixture's slices), as `gemmactl status --json` shows; a generation running across the
//! change completes; an admin pin holds a tier; a rise of the cgroup's `memory.events`
//! counters wakes the governor at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gemmad_client::{pb, user_prompt};
use gemmad_e2e::{Daemon, HANG};

fn fixture() -> PathBuf {
    PathBuf::from(gemmad_e2e::MATFORMER_FIXTURE)
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    // Written whole then renamed: the governor never reads half a file.
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

/// A laptop with plenty of memory, on AC, cool.
fn healthy_tree(root: &Path) {
    write(
        root,
        "proc/meminfo",
        "MemTotal:       16000000 kB\nMemFree:         8000000 kB\nMemAvailable:   12000000 kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\n",
    );
    write(
        root,
        "proc/pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    write(root, "cgroup/memory.current", "100000000\n");
    write(root, "cgroup/memory.max", "max\n");
    write(root, "cgroup/memory.high", "max\n");
    write(
        root,
        "cgroup/memory.events",
        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    );
    write(
        root,
        "sys/class/thermal/thermal_zone0/type",
        "x86_pkg_temp\n",
    );
    write(root, "sys/class/thermal/thermal_zone0/temp", "45000\n");
    write(
        root,
        "sys/class/thermal/thermal_zone0/trip_point_0_temp",
        "95000\n",
    );
    write(
        root,
        "sys/class/thermal/thermal_zone0/trip_point_0_type",
        "passive\n",
    );
    write(root, "sys/class/power_supply/AC/type", "Mains\n");
    write(root, "sys/class/power_supply/AC/online", "1\n");
    battery(root, "Charging", 80, "Normal");
}

fn battery(root: &Path, status: &str, percent: u8, level: &str) {
    write(root, "sys/class/power_supply/BAT0/type", "Battery\n");
    write(
        root,
        "sys/class/power_supply/BAT0/status",
        &format!("{status}\n"),
    );
    write(
        root,
        "sys/class/power_supply/BAT0/capacity",
        &format!("{percent}\n"),
    );
    write(
        root,
        "sys/class/power_supply/BAT0/capacity_level",
        &format!("{level}\n"),
    );
}

fn unplug(root: &Path, percent: u8, level: &str) {
    write(root, "sys/class/power_supply/AC/online", "0\n");
    battery(root, "Discharging", percent, level);
}

fn plug_in(root: &Path) {
    write(root, "sys/class/power_supply/AC/online", "1\n");
    battery(root, "Charging", 80, "Normal");
}

fn start(root: &Path, dwell_ms: u64) -> Daemon {
    start_with(root, dwell_ms, 50)
}

/// The daemon on the fake tree, polling every `interval_ms`. UPower is off: the
/// machine's own UPower (a developer's laptop) must not change the tier
/// (`governor_upower.rs` tests it on a private bus).
fn start_with(root: &Path, dwell_ms: u64, interval_ms: u64) -> Daemon {
    let csv = fixture().join("slices.csv");
    Daemon::builder()
        .model(fixture())
        .config(format!(
            "[model]\nthreads = 1\nmax_context = 4096\nmatformer_config = {csv:?}\n\
             [limits]\nmax_tokens = 3000\n\
             [governor]\nenabled = true\nprocfs_root = {proc:?}\nsysfs_root = {sys:?}\n\
             cgroup_dir = {cg:?}\ninterval_ms = {interval_ms}\nupower = false\n\
             [governor.policy]\nmin_dwell_ms = {dwell_ms}\n",
            csv = csv.display().to_string(),
            proc = root.join("proc").display().to_string(),
            sys = root.join("sys").display().to_string(),
            cg = root.join("cgroup").display().to_string(),
        ))
        .log_level("info")
        .start()
        .expect("starting gemmad")
}

async fn governor(c: &mut gemmad_client::Client) -> pb::StatusResponse {
    c.status().await.unwrap()
}

/// Waits until the daemon's tier and slice are `tier` and `slice`; returns how long it
/// took.
async fn wait_for(d: &Daemon, c: &mut gemmad_client::Client, tier: &str, slice: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let st = governor(c).await;
        let g = st.governor.clone().expect("Status has the governor");
        if g.tier == tier && st.active_slice == slice {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < HANG,
            "still {} / {} waiting for {tier} / {slice}\n{}",
            g.tier,
            st.active_slice,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn battery_drain_moves_the_tier_and_the_model_size_and_back() {
    let tree = tempfile::tempdir().unwrap();
    healthy_tree(tree.path());
    let d = start(tree.path(), 300);
    let mut c = d.client().await.unwrap();
    wait_for(&d, &mut c, "full", "full").await;
    let smallest = {
        let mut s = c.list_slices().await.unwrap();
        s.sort_by_key(|s| s.params);
        s[0].name.clone()
    };
    assert_eq!(smallest, "e2b-like");

    // A long generation runs across the change to critical (a forced switch).
    let mut req = user_prompt("Tell me a story.");
    req.max_tokens = 3000;
    req.ignore_eos = true;
    let mut gen_client = d.client().await.unwrap();
    let generation = tokio::spawn(async move { gen_client.generate_text(req).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    unplug(tree.path(), 3, "Critical");
    wait_for(&d, &mut c, "critical", &smallest).await;
    let done = generation.await.unwrap().unwrap();
    let f = done.finished.unwrap();
    assert_eq!(f.usage.unwrap().completion_tokens, 3000);

    // gemmactl shows the same.
    let out = d
        .gemmactl()
        .unwrap()
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["governor"]["tier"], "critical");
    assert_eq!(v["active_slice"], smallest);
    let actions = v["governor"]["last_actions"].as_array().unwrap();
    assert!(
        actions
            .iter()
            .any(|a| a.as_str().unwrap().contains(&smallest)),
        "{actions:?}"
    );

    // Plugged back in: back to full, one tier per dwell time.
    let t0 = Instant::now();
    plug_in(tree.path());
    wait_for(&d, &mut c, "full", "full").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "relaxed without dwelling"
    );
    // Background requests were refused while constrained and are admitted again.
    let mut bg = user_prompt("hi");
    bg.max_tokens = 4;
    bg.priority = pb::Priority::Background as i32;
    c.generate_text(bg).await.unwrap();
}

/// Reaction time from a fake-sensor change to the applied action (the active slice
/// changed), median and max of 20 (printed: `cargo test -p gemmad-e2e --test governor
/// -- --nocapture`).
#[tokio::test]
async fn reaction_time_from_a_sensor_change() {
    let tree = tempfile::tempdir().unwrap();
    healthy_tree(tree.path());
    let d = start(tree.path(), 0);
    let mut c = d.client().await.unwrap();
    wait_for(&d, &mut c, "full", "full").await;
    let mut times = Vec::new();
    for _ in 0..20 {
        unplug(tree.path(), 3, "Critical");
        times.push(wait_for(&d, &mut c, "critical", "e2b-like").await);
        plug_in(tree.path());
        wait_for(&d, &mut c, "full", "full").await;
    }
    times.sort();
    println!(
        "sensor change -> slice switched: median {:.1} ms, max {:.1} ms (interval 50 ms, 20 runs)",
        times[10].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn an_admin_pin_holds_a_tier_until_unpinned() {
    let tree = tempfile::tempdir().unwrap();
    healthy_tree(tree.path());
    let d = start(tree.path(), 0);
    let mut c = d.client().await.unwrap();
    wait_for(&d, &mut c, "full", "full").await;
    // The test runs as the daemon's own user: an admin.
    let out = d
        .gemmactl()
        .unwrap()
        .args(["governor", "pin", "critical"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&d, &mut c, "critical", "e2b-like").await;
    assert_eq!(governor(&mut c).await.governor.unwrap().pinned, "critical");
    // A request's own size is honoured within the tier: `full` runs on the tier's slice.
    let mut big = user_prompt("hi");
    big.max_tokens = 4;
    big.size = "full".into();
    let got = c.generate_text(big).await.unwrap();
    assert_eq!(got.started.unwrap().active_slice, "e2b-like");
    let err = c
        .governor_pin(Some("lukewarm"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lukewarm"), "{err}");
    c.governor_pin(None).await.unwrap();
    wait_for(&d, &mut c, "full", "full").await;
}

/// Garbage and missing sensor files keep the daemon serving at full.
#[tokio::test]
async fn garbage_sensors_change_nothing() {
    let tree = tempfile::tempdir().unwrap();
    write(tree.path(), "proc/meminfo", "MemTotal: lots\n\0\0garbage");
    write(tree.path(), "proc/pressure/memory", "some avg10=NaN\n");
    write(tree.path(), "sys/class/power_supply/BAT0/type", "Battery\n");
    write(tree.path(), "sys/class/power_supply/BAT0/capacity", "-7\n");
    std::fs::create_dir_all(tree.path().join("cgroup")).unwrap();
    let d = start(tree.path(), 0);
    let mut c = d.client().await.unwrap();
    wait_for(&d, &mut c, "full", "full").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(governor(&mut c).await.governor.unwrap().tier, "full");
    let got = c.generate_text(user_prompt("hi")).await.unwrap();
    assert!(got.finished.is_some());
}

/// A new `high` event in the cgroup's `memory.events` wakes the governor (inotify) and
/// takes it to critical at once. The poll interval is 10 minutes, far past the wait's
/// hang limit: only the wakeup can explain the change, and the log says so.
#[tokio::test]
async fn memory_events_rise_wakes_the_governor() {
    let tree = tempfile::tempdir().unwrap();
    healthy_tree(tree.path());
    write(
        tree.path(),
        "cgroup/memory.events",
        "low 0\nhigh 4\nmax 0\noom 0\noom_kill 0\n",
    );
    let d = start_with(tree.path(), 0, 600_000);
    let mut c = d.client().await.unwrap();
    // The first sample (at start) is the baseline of the counters.
    wait_for(&d, &mut c, "full", "full").await;
    assert!(
        d.log().contains("cgroup_events=true"),
        "the watch is armed\n{}",
        d.log()
    );
    write(
        tree.path(),
        "cgroup/memory.events",
        "low 3\nhigh 5\nmax 0\noom 0\noom_kill 0\n",
    );
    wait_for(&d, &mut c, "critical", "e2b-like").await;
    let st = governor(&mut c).await.governor.unwrap();
    assert!(
        st.last_actions
            .iter()
            .any(|a| a.contains("cgroup memory.high exceeded: 1 new high event(s)")),
        "{:?}",
        st.last_actions
    );
    assert_eq!(st.transitions, 1, "one step, straight to critical");
    let log = d.log();
    assert!(
        log.contains("cgroup memory.events counters rose") && log.contains("woke_by=cgroup"),
        "{log}"
    );
}
