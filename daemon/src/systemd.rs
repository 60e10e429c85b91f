//! The service-manager protocol: readiness, status, reload and stop notifications, the
//! watchdog kept alive by the engine thread's progress, start-up timeout extensions,
//! socket-activated listeners, and whether stderr is the journal. Every call is a no-op
//! when systemd did not start the daemon.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

/// One message to the service manager; failures are logged, never fatal (the service
/// runs the same without a manager listening).
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// Whether a service manager listens (`$NOTIFY_SOCKET`).
pub fn managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// The model is loaded and every listener serves.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A reload (SIGHUP) begins; [`ready`] ends it.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading settings"),
    ];
    match NotifyState::monotonic_usec_now() {
        Ok(m) => states.push(m),
        Err(e) => tracing::debug!(error = %e, "cannot read CLOCK_MONOTONIC"),
    }
    notify(&states);
}

pub fn stopping(why: &str) {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status(&format!("stopping ({why})")),
    ]);
}

/// Asks for `by` more time before the start-up timeout (a long first start: quantizing,
/// building the PLE cache).
pub fn extend_timeout(by: Duration, status: &str) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    notify(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(status),
    ]);
}

/// The watchdog timeout, when the manager set one for this process.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings the watchdog every half timeout while `progress` moves (the engine thread
/// bumps it at every prefill chunk and decode step, and every second while idle): a
/// wedged engine stops the pings and systemd restarts the service.
pub async fn watchdog(timeout: Duration, progress: Arc<AtomicU64>) {
    let period = timeout / 2;
    let mut last = progress.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    notify(&[NotifyState::Watchdog]);
    let mut stalled = false;
    loop {
        tick.tick().await;
        let now = progress.load(Ordering::Relaxed);
        if now != last {
            if stalled {
                tracing::info!("the engine thread moves again; watchdog pings resume");
                stalled = false;
            }
            last = now;
            notify(&[NotifyState::Watchdog]);
        } else if !stalled {
            stalled = true;
            tracing::error!(
                stalled_for_ms = period.as_millis() as u64,
                "the engine thread shows no progress; watchdog pings withheld"
            );
        }
    }
}

/// A listening socket the service manager passed (socket activation).
pub struct Activated {
    pub fd: OwnedFd,
    /// `FileDescriptorName=` of its socket unit.
    pub name: String,
}

/// Takes the sockets of `$LISTEN_FDS` (when `$LISTEN_PID` is this process) and removes
/// the variables. Call before any thread starts: it edits the environment.
pub fn take_listeners() -> std::io::Result<Vec<Activated>> {
    // SAFETY: called from `serve::run` before the runtime or any other thread starts.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }?;
    Ok(fds
        .map(|(fd, name)| Activated {
            // SAFETY: the manager passed these descriptors to this process, which takes
            // each exactly once, here.
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            name,
        })
        .collect())
}

/// Whether stderr is the journal's stream (`$JOURNAL_STREAM` names its device and inode),
/// so logs can go to the journal with their fields.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        // The widths of dev_t and ino_t differ between targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}
