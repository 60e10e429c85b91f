//! UPower on the system bus (`org.freedesktop.UPower`): `OnBattery` of
//! `/org/freedesktop/UPower` and `WarningLevel` of the display device, followed with
//! zbus property-change streams so that a change wakes the governor loop at once. The
//! governor merges this view over what sysfs `power_supply` says.
//!
//! No system bus, or no UPower on it: the governor keeps reading sysfs (logged once, at
//! info). UPower starting later is picked up, and UPower leaving falls back to sysfs.
//! The bus address follows zbus's rules (`DBUS_SYSTEM_BUS_ADDRESS`, else
//! `/var/run/dbus/system_bus_socket`), which lets tests use a private bus.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gemmad_governor::sensors::{UpowerView, Waker, WarningLevel};
use tokio_stream::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::names::BusName;
use zbus::{Connection, Proxy};

const NAME: &str = "org.freedesktop.UPower";
const PATH: &str = "/org/freedesktop/UPower";
const DISPLAY_DEVICE: &str = "/org/freedesktop/UPower/devices/DisplayDevice";
const DEVICE_INTERFACE: &str = "org.freedesktop.UPower.Device";

/// How long to wait before following UPower again after a bus error, so a broken bus
/// does not spin the reader.
const RETRY: Duration = Duration::from_secs(5);

/// The reader task and the view it keeps. Dropping it stops the task.
pub(super) struct Upower {
    view: Arc<Mutex<Option<UpowerView>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upower {
    /// Starts the reader on `rt`; `waker` wakes the governor loop on every change.
    pub(super) fn spawn(rt: &tokio::runtime::Handle, waker: Waker) -> Upower {
        let view = Arc::new(Mutex::new(None));
        let task = rt.spawn(run(view.clone(), waker));
        Upower { view, task }
    }

    /// UPower's view while it is on the bus; `None`: use sysfs.
    pub(super) fn view(&self) -> Option<UpowerView> {
        self.view.lock().ok().and_then(|v| *v)
    }
}

impl Drop for Upower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `v` and wakes the loop when it differs from what was there.
fn publish(view: &Mutex<Option<UpowerView>>, waker: &Waker, v: Option<UpowerView>) {
    let Ok(mut cur) = view.lock() else { return };
    if *cur != v {
        *cur = v;
        tracing::debug!(view = ?v, "UPower view changed");
        waker.wake();
    }
}

async fn run(view: Arc<Mutex<Option<UpowerView>>>, waker: Waker) {
    let conn = match Connection::system().await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "no system bus; the governor reads the battery from sysfs power_supply");
            return;
        }
    };
    let mut said_absent = false;
    loop {
        match follow(&conn, &view, &waker, &mut said_absent).await {
            Ok(()) => {
                tracing::info!("UPower left the system bus; the governor reads the battery from sysfs power_supply");
                said_absent = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_s = RETRY.as_secs(),
                    "reading UPower failed; the governor reads the battery from sysfs power_supply");
                publish(&view, &waker, None);
                tokio::time::sleep(RETRY).await;
            }
        }
        publish(&view, &waker, None);
    }
}

/// Waits for UPower to own its name, then follows its properties until it leaves
/// (`Ok`) or the bus fails (`Err`).
async fn follow(
    conn: &Connection,
    view: &Mutex<Option<UpowerView>>,
    waker: &Waker,
    said_absent: &mut bool,
) -> zbus::Result<()> {
    let dbus = DBusProxy::new(conn).await?;
    // Subscribed before asking, so that an owner change in between is not missed.
    let mut owners = dbus
        .receive_name_owner_changed_with_args(&[(0, NAME)])
        .await?;
    let name = BusName::try_from(NAME)?;
    if !dbus.name_has_owner(name.clone()).await? {
        if !*said_absent {
            tracing::info!("UPower is not on the system bus; the governor reads the battery from sysfs power_supply");
            *said_absent = true;
        }
        loop {
            let Some(sig) = owners.next().await else {
                return Err(zbus::Error::Failure("the bus connection closed".into()));
            };
            if sig.args().is_ok_and(|a| a.new_owner().is_some()) {
                break;
            }
        }
    }
    *said_absent = false;
    // The owner followed: the signal that announced it may still be queued.
    let owner = dbus.get_name_owner(name).await?.to_string();

    let daemon = Proxy::new(conn, NAME, PATH, NAME).await?;
    let display = Proxy::new(conn, NAME, DISPLAY_DEVICE, DEVICE_INTERFACE).await?;
    let mut on_battery_changes = daemon.receive_property_changed::<bool>("OnBattery").await;
    let mut warning_changes = display
        .receive_property_changed::<u32>("WarningLevel")
        .await;
    // The first values, asked for directly; the streams then report changes (they start
    // with the current value too, which changes nothing). A property that cannot be read
    // (no display device: no battery) stays unknown, and sysfs decides it.
    let mut v = UpowerView {
        on_battery: daemon.get_property::<bool>("OnBattery").await.ok(),
        warning_level: display
            .get_property::<u32>("WarningLevel")
            .await
            .ok()
            .and_then(WarningLevel::from_dbus),
    };
    tracing::info!(on_battery = ?v.on_battery, warning_level = ?v.warning_level,
        "the governor reads on-battery and the battery warning level from UPower");
    publish(view, waker, Some(v));
    loop {
        tokio::select! {
            Some(c) = on_battery_changes.next() => {
                v.on_battery = c.get().await.ok();
            }
            Some(c) = warning_changes.next() => {
                v.warning_level = c.get().await.ok().and_then(WarningLevel::from_dbus);
            }
            sig = owners.next() => {
                let Some(sig) = sig else {
                    return Err(zbus::Error::Failure("the bus connection closed".into()));
                };
                let new_owner = sig
                    .args()
                    .ok()
                    .and_then(|a| a.new_owner().as_ref().map(|o| o.to_string()));
                // Gone, or another process took the name: start over.
                if new_owner.as_deref() != Some(owner.as_str()) {
                    return Ok(());
                }
            }
        }
        tracing::debug!(on_battery = ?v.on_battery, warning_level = ?v.warning_level,
            "UPower properties changed");
        publish(view, waker, Some(v));
    }
}
