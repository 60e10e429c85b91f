//! The governor reads UPower over D-Bus: a private `dbus-daemon` stands in for the system
//! bus (`DBUS_SYSTEM_BUS_ADDRESS`), this test serves a minimal UPower on it (the real
//! interface names, `OnBattery` and the display device's `WarningLevel`, with
//! PropertiesChanged), and a real `gemmad serve` on a fake sysfs tree follows it:
//! UPower appearing late, taking precedence over sysfs, a change waking the loop, and
//! UPower leaving (back to sysfs).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gemmad_e2e::{Daemon, HANG};

const NAME: &str = "org.freedesktop.UPower";
const PATH: &str = "/org/freedesktop/UPower";
const DISPLAY_DEVICE: &str = "/org/freedesktop/UPower/devices/DisplayDevice";

/// `org.freedesktop.UPower` at `/org/freedesktop/UPower`, the one property gemmad reads.
struct UpowerDaemon {
    on_battery: bool,
}

#[zbus::interface(name = "org.freedesktop.UPower")]
impl UpowerDaemon {
    #[zbus(property)]
    fn on_battery(&self) -> bool {
        self.on_battery
    }
}

/// `org.freedesktop.UPower.Device` at the display device path.
struct DisplayDevice {
    warning_level: u32,
}

#[zbus::interface(name = "org.freedesktop.UPower.Device")]
impl DisplayDevice {
    #[zbus(property)]
    fn warning_level(&self) -> u32 {
        self.warning_level
    }
}

/// A private bus: `dbus-daemon --session` on a socket in a temporary folder, killed on
/// drop.
struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    /// `None` when dbus-daemon is not installed (the caller skips).
    fn start() -> Option<Bus> {
        let dir = tempfile::tempdir().expect("temporary folder");
        let spawned = Command::new("dbus-daemon")
            .arg("--session")
            .arg(format!(
                "--address=unix:path={}",
                dir.path().join("bus").display()
            ))
            .args(["--print-address=1", "--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot start dbus-daemon: {e}"),
        };
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading dbus-daemon's address");
        let address = line.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed no address: {line:?}"
        );
        Some(Bus {
            child,
            address,
            _dir: dir,
        })
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves the stand-in on `bus` under UPower's name.
async fn serve_upower(bus: &Bus, on_battery: bool, warning_level: u32) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address.as_str())
        .name(NAME)
        .serve_at(PATH, UpowerDaemon { on_battery })
        .serve_at(DISPLAY_DEVICE, DisplayDevice { warning_level })
        .build()
        .await
        .expect("serving the UPower stand-in")
}

/// Changes the stand-in's properties and emits PropertiesChanged for each, the warning
/// level first (UPower computes it before it updates OnBattery).
async fn set_upower(conn: &zbus::Connection, on_battery: bool, warning_level: u32) {
    let server = conn.object_server();
    let dev = server
        .interface::<_, DisplayDevice>(DISPLAY_DEVICE)
        .await
        .expect("the display device");
    dev.get_mut().await.warning_level = warning_level;
    dev.get()
        .await
        .warning_level_changed(dev.signal_emitter())
        .await
        .expect("emitting WarningLevel");
    let d = server
        .interface::<_, UpowerDaemon>(PATH)
        .await
        .expect("the UPower object");
    d.get_mut().await.on_battery = on_battery;
    d.get()
        .await
        .on_battery_changed(d.signal_emitter())
        .await
        .expect("emitting OnBattery");
}

fn fixture() -> PathBuf {
    PathBuf::from(gemmad_e2e::MATFORMER_FIXTURE)
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

/// Plenty of memory, cool; the firmware says: unplugged, battery at 50 %, Normal (on
/// battery: `balanced`).
fn tree_on_battery(root: &Path) {
    write(
        root,
        "proc/meminfo",
        "MemTotal: 16000000 kB\nMemAvailable: 12000000 kB\nSwapFree: 0 kB\n",
    );
    write(root, "cgroup/memory.current", "100000000\n");
    write(root, "sys/class/power_supply/AC/type", "Mains\n");
    write(root, "sys/class/power_supply/AC/online", "0\n");
    write(root, "sys/class/power_supply/BAT0/type", "Battery\n");
    write(root, "sys/class/power_supply/BAT0/status", "Discharging\n");
    write(root, "sys/class/power_supply/BAT0/capacity", "50\n");
    write(
        root,
        "sys/class/power_supply/BAT0/capacity_level",
        "Normal\n",
    );
}

/// Waits until the tier is `tier` and, when given, the active slice `slice`.
async fn wait_for(d: &Daemon, c: &mut gemmad_client::Client, tier: &str, slice: Option<&str>) {
    let t0 = Instant::now();
    loop {
        let st = c.status().await.unwrap();
        let g = st.governor.clone().expect("Status has the governor");
        if g.tier == tier && slice.is_none_or(|s| st.active_slice == s) {
            return;
        }
        assert!(
            t0.elapsed() < HANG,
            "still {} / {} waiting for {tier} / {slice:?}\n{}",
            g.tier,
            st.active_slice,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_log(d: &Daemon, text: &str) {
    let t0 = Instant::now();
    while !d.log().contains(text) {
        assert!(t0.elapsed() < HANG, "no {text:?} in the log:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lines of the log that are governor actions.
fn action_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("governor action"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upower_takes_precedence_and_wakes_the_governor() {
    let Some(bus) = Bus::start() else {
        gemmad_e2e::skip("dbus-daemon is not installed (Debian: apt install dbus)");
        return;
    };
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    tree_on_battery(root);
    let csv = fixture().join("slices.csv");
    let dwell_ms = 300;
    let d = Daemon::builder()
        .model(fixture())
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .config(format!(
            "[model]\nthreads = 1\nmax_context = 4096\nmatformer_config = {csv:?}\n\
             [governor]\nenabled = true\nprocfs_root = {proc:?}\nsysfs_root = {sys:?}\n\
             cgroup_dir = {cg:?}\ninterval_ms = 1000\nupower = true\n\
             [governor.policy]\nmin_dwell_ms = {dwell_ms}\n",
            csv = csv.display().to_string(),
            proc = root.join("proc").display().to_string(),
            sys = root.join("sys").display().to_string(),
            cg = root.join("cgroup").display().to_string(),
        ))
        .log_level("info")
        .start()
        .expect("starting gemmad");
    let mut c = d.client().await.unwrap();

    // No UPower on the bus yet: sysfs decides (on battery: balanced), and the daemon
    // says why, once.
    wait_for(&d, &mut c, "balanced", None).await;
    wait_for_log(&d, "UPower is not on the system bus").await;

    // UPower appears and says "on AC, no warning": it wins over the firmware.
    let upower = serve_upower(&bus, false, 1).await;
    wait_for(&d, &mut c, "full", Some("full")).await;
    wait_for_log(&d, "from UPower").await;
    let before = action_lines(&d.log()).len();

    // Unplugged, critical: critical and the smallest slice, woken by UPower's signal.
    set_upower(&upower, true, 4).await;
    wait_for(&d, &mut c, "critical", Some("e2b-like")).await;
    let out = d
        .gemmactl()
        .unwrap()
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["governor"]["tier"], "critical");
    assert_eq!(v["active_slice"], "e2b-like");
    let readings = v["governor"]["readings"].as_array().unwrap();
    let reading = |name: &str| {
        readings
            .iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["value"].as_f64())
    };
    assert_eq!(reading("upower"), Some(1.0), "{readings:?}");
    assert_eq!(reading("upower_warning_level"), Some(4.0), "{readings:?}");
    assert_eq!(reading("on_battery"), Some(1.0), "{readings:?}");
    let log = d.log();
    let new_actions = &action_lines(&log)[before..];
    // OnBattery and WarningLevel change in two signals: the first may already move the
    // tier (and the slice) down one step, the second to critical. Either way UPower's
    // changes woke the loop, and critical was entered for the warning level.
    let slice_switch = new_actions
        .iter()
        .find(|l| l.contains("slice e2b-like"))
        .unwrap_or_else(|| panic!("no slice switch among {new_actions:#?}"));
    assert!(slice_switch.contains("woke_by=upower"), "{slice_switch}");
    assert!(
        new_actions.iter().any(|l| l.contains("tier=critical")
            && l.contains("UPower warning level critical")
            && l.contains("woke_by=upower")),
        "no action of the critical tier for UPower's warning level: {new_actions:#?}"
    );

    // Plugged back in: back to full, one tier per dwell and sample.
    set_upower(&upower, false, 1).await;
    wait_for(&d, &mut c, "full", Some("full")).await;
    let g = c.status().await.unwrap().governor.unwrap();
    assert!(
        g.last_actions
            .iter()
            .any(|a| a.starts_with("full:") && a.contains("min dwell")),
        "{:?}",
        g.last_actions
    );

    // UPower leaves the bus: the firmware's "on battery" counts again.
    upower.release_name(NAME).await.unwrap();
    wait_for(&d, &mut c, "balanced", None).await;
    wait_for_log(&d, "UPower left the system bus").await;
    drop(upower);
}
