//! One `poll(2)` over everything that can wake the governor before its next poll: the
//! PSI trigger, the cgroup's `memory.events` watch, and a [`Waker`] other threads use
//! (the daemon's UPower reader). A source that fails for good is dropped with a warning
//! and the others go on.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::cgroup_events::{CgroupEventWatch, EventCounts};
use super::psi::PsiTrigger;

/// What woke a [`Watches::wait`]; all `false`/`None`: the timeout passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// The PSI trigger fired.
    pub psi: bool,
    /// `memory.events` counters rose, by this much.
    pub cgroup: Option<EventCounts>,
    /// A [`Waker`] was called.
    pub waker: bool,
}

impl Woken {
    /// Whether anything woke the wait.
    pub fn any(&self) -> bool {
        self.psi || self.cgroup.is_some() || self.waker
    }

    /// For logs: `psi`, `cgroup`, `waker`, joined by `+`; `timer` for none.
    pub fn name(&self) -> String {
        let mut v = Vec::new();
        if self.psi {
            v.push("psi");
        }
        if self.cgroup.is_some() {
            v.push("cgroup");
        }
        if self.waker {
            v.push("waker");
        }
        if v.is_empty() {
            "timer".into()
        } else {
            v.join("+")
        }
    }
}

/// Wakes a [`Watches::wait`] from another thread or task. Cheap to clone; never blocks.
#[derive(Clone, Debug)]
pub struct Waker(Arc<UnixStream>);

impl Waker {
    /// Wakes the wait (or the next one, when none is in progress).
    pub fn wake(&self) {
        // A full socket buffer already holds a wakeup; any other error means the waiting
        // side is gone, and then nobody needs waking.
        let _ = (&*self.0).write(&[1]);
    }
}

/// The governor's early-wake sources.
#[derive(Debug)]
pub struct Watches {
    psi: Option<PsiTrigger>,
    cgroup: Option<CgroupEventWatch>,
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
}

impl Watches {
    /// Waits on `psi` and `cgroup` (either may be absent) and on its [`Waker`]s. Fails
    /// only when the process is out of fds for the waker's socket pair.
    pub fn new(psi: Option<PsiTrigger>, cgroup: Option<CgroupEventWatch>) -> io::Result<Watches> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Watches {
            psi,
            cgroup,
            wake_rx: rx,
            wake_tx: Arc::new(tx),
        })
    }

    /// A handle that wakes [`Watches::wait`].
    pub fn waker(&self) -> Waker {
        Waker(self.wake_tx.clone())
    }

    /// The PSI trigger waited on, if any (it is dropped once it fails).
    pub fn psi(&self) -> Option<&PsiTrigger> {
        self.psi.as_ref()
    }

    /// The cgroup watch waited on, if any (it is dropped once it fails).
    pub fn cgroup(&self) -> Option<&CgroupEventWatch> {
        self.cgroup.as_ref()
    }

    /// Waits up to `timeout` for any source; returns at the first wakeup with everything
    /// that was ready then. Events that do not count (a `memory.events` change with no
    /// counter up, another file of the cgroup) are consumed and the wait goes on.
    pub fn wait(&mut self, timeout: Duration) -> Woken {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let (ready, revents) = self.poll_once(left);
            if !ready {
                return Woken::default();
            }
            let woken = self.take(revents);
            if woken.any() || left.is_zero() {
                return woken;
            }
        }
    }

    /// One `poll(2)`; `(false, _)` on timeout. Revents: psi, cgroup, waker.
    fn poll_once(&self, left: Duration) -> (bool, [PollFlags; 3]) {
        let none = PollFlags::empty();
        let mut fds = Vec::with_capacity(3);
        let mut slots = Vec::with_capacity(3);
        if let Some(t) = &self.psi {
            fds.push(PollFd::new(t.as_fd(), t.poll_flags()));
            slots.push(0);
        }
        if let Some(w) = &self.cgroup {
            fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
            slots.push(1);
        }
        fds.push(PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN));
        slots.push(2);
        let mut revents = [none; 3];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) => return (false, revents),
            Ok(_) => {}
            // A signal: the caller's loop waits again.
            Err(Errno::EINTR) => return (true, revents),
            Err(e) => {
                // Cannot happen with valid fds; do not spin: wait out the time.
                tracing::warn!(error = %e, "governor poll failed; sleeping instead");
                std::thread::sleep(left.min(Duration::from_millis(100)));
                return (false, revents);
            }
        }
        for (fd, slot) in fds.iter().zip(slots) {
            revents[slot] = fd.revents().unwrap_or(none);
        }
        (true, revents)
    }

    /// Consumes what `poll` reported.
    fn take(&mut self, [psi, cgroup, waker]: [PollFlags; 3]) -> Woken {
        let mut woken = Woken::default();
        if !psi.is_empty() {
            if let Some(t) = &self.psi {
                match t.handle(psi) {
                    Ok(fired) => woken.psi = fired,
                    Err(e) => {
                        tracing::warn!(path = %t.path().display(), error = %e,
                            "memory pressure watch failed; the governor no longer waits on it");
                        self.psi = None;
                    }
                }
            }
        }
        if !cgroup.is_empty() {
            if let Some(w) = &mut self.cgroup {
                match w.check() {
                    Ok(rise) => woken.cgroup = rise,
                    Err(e) => {
                        tracing::warn!(path = %w.path().display(), error = %e,
                            "cgroup memory.events watch failed; the governor no longer waits on it");
                        self.cgroup = None;
                    }
                }
            }
        }
        if !waker.is_empty() {
            let mut buf = [0u8; 64];
            // Drain every pending wakeup: one wait answers them all.
            while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
            woken.waker = true;
        }
        woken
    }
}

/// `poll` takes whole milliseconds; round up so a short timeout does not become a busy
/// zero-timeout poll.
fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_micros().div_ceil(1000);
    u32::try_from(ms)
        .ok()
        .and_then(|ms| PollTimeout::try_from(ms).ok())
        .unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::cgroup::{Cgroup, CgroupVersion};
    use super::super::files::testutil::put;
    use super::*;

    fn events(high: u64) -> String {
        format!("low 0\nhigh {high}\nmax 0\noom 0\noom_kill 0\n")
    }

    #[test]
    fn timeout_then_waker() {
        let mut w = Watches::new(None, None).unwrap();
        assert_eq!(w.wait(Duration::from_millis(20)), Woken::default());
        assert_eq!(Woken::default().name(), "timer");
        let waker = w.waker();
        // Several wakes before the wait are one wakeup, and drained.
        waker.wake();
        waker.clone().wake();
        let got = w.wait(Duration::from_secs(60));
        assert_eq!((got.waker, got.name().as_str()), (true, "waker"));
        assert_eq!(w.wait(Duration::ZERO), Woken::default());
        // From another thread, while waiting: the wait returns long before its timeout
        // (60 s here; the test harness would report a hang).
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        assert!(w.wait(Duration::from_secs(60)).waker);
        t.join().unwrap();
    }

    /// A `high` rise wakes the wait; a change that raises nothing does not end it.
    #[test]
    fn cgroup_rise_wakes() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        put(d, "memory.events", &events(0));
        let cg = Cgroup {
            dir: d.to_path_buf(),
            version: CgroupVersion::V2,
        };
        let mut w = Watches::new(None, Some(CgroupEventWatch::new(&cg).unwrap())).unwrap();
        assert!(w.cgroup().is_some() && w.psi().is_none());
        put(d, "memory.events", &events(0).replace("low 0", "low 1"));
        assert_eq!(w.wait(Duration::from_millis(30)), Woken::default());
        let dir = d.to_path_buf();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            put(&dir, "memory.events", &events(2));
        });
        let got = w.wait(Duration::from_secs(60));
        writer.join().unwrap();
        assert_eq!(got.cgroup.map(|c| c.high), Some(2));
        assert_eq!(got.name(), "cgroup");
        // The cgroup goes away: the watch is dropped, the waker still works.
        std::fs::remove_dir_all(d).unwrap();
        assert_eq!(w.wait(Duration::from_millis(100)), Woken::default());
        assert!(w.cgroup().is_none());
        w.waker().wake();
        assert!(w.wait(Duration::from_secs(60)).waker);
    }

    /// A trigger "armed" on a regular file (a fake procfs) never fires: regular files do
    /// not report POLLPRI.
    #[test]
    fn psi_on_a_regular_file_never_fires() {
        let t = tempfile::tempdir().unwrap();
        put(
            t.path(),
            "memory",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        let trig =
            PsiTrigger::register(t.path().join("memory"), "some", 200_000, 2_000_000).unwrap();
        let mut w = Watches::new(Some(trig), None).unwrap();
        assert_eq!(w.wait(Duration::from_millis(30)), Woken::default());
        assert!(w.psi().is_some());
    }
}
