//! Wakes the governor when the service's cgroup2 `memory.events` counters rise. The
//! kernel (kernfs) reports a change of those counters as `IN_MODIFY`, on the file and on
//! its directory with the file's name; a write or a rename into place in a fake tree
//! does too. The directory is watched rather than the file so that a file replaced by
//! a rename (how tests and tools update files atomically) stays watched.
//!
//! Only v2 has `memory.events`; v1's nearest (`cgroup.event_control` eventfds) is not
//! used.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::cgroup::{Cgroup, CgroupVersion};
use super::files::{flat_key, read_str};

const EVENTS_FILE: &str = "memory.events";

/// `memory.events` counters that mean the cgroup ran into its limits: `high` (throttled
/// over `memory.high`), `max` (reclaim forced at `memory.max`), `oom` (the OOM killer
/// ran), `oom_kill` (it killed). As a rise: how much each went up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

impl EventCounts {
    /// Whether any counter is non-zero.
    pub fn any(&self) -> bool {
        self.high + self.max + self.oom + self.oom_kill > 0
    }
}

/// An inotify watch on a cgroup2 directory for changes of its `memory.events`.
#[derive(Debug)]
pub struct CgroupEventWatch {
    inotify: Inotify,
    path: PathBuf,
    /// The last counters read, in [`EventCounts`] order; `None` until a value was read.
    last: [Option<u64>; 4],
}

impl CgroupEventWatch {
    /// Watches `memory.events` of `cgroup`, which must be v2 (`InvalidInput` otherwise).
    /// The counters read now are the baseline. Errors name the directory: it is missing
    /// (`NotFound`), or inotify is unavailable or out of watches (`ENOSPC`:
    /// `fs.inotify.max_user_watches`).
    pub fn new(cgroup: &Cgroup) -> io::Result<CgroupEventWatch> {
        if cgroup.version != CgroupVersion::V2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: a v1 memory cgroup has no memory.events to watch",
                    cgroup.dir.display()
                ),
            ));
        }
        let named = |what: &str, e: Errno| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{what} {}: {e}", cgroup.dir.display()),
            )
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| named("inotify for", e))?;
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        inotify
            .add_watch(&cgroup.dir, mask)
            .map_err(|e| named("cannot watch", e))?;
        let path = cgroup.dir.join(EVENTS_FILE);
        let mut w = CgroupEventWatch {
            inotify,
            path,
            last: [None; 4],
        };
        w.rise();
        Ok(w)
    }

    /// The watched `memory.events`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After the fd polled readable (or any time: it does not block): takes the pending
    /// inotify events and, when one concerns `memory.events`, reads the counters.
    /// `Ok(Some(rise))`: at least one counter went up since the last read. A counter that
    /// went down (the cgroup was recreated) is a new baseline, not an event; a file that
    /// cannot be read or parsed (caught mid-write) keeps the old baseline. An error means
    /// the watch is gone for good (the cgroup was removed): stop polling it.
    pub fn check(&mut self) -> io::Result<Option<EventCounts>> {
        let mut touched = false;
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("reading the inotify watch of {}: {e}", self.path.display()),
                    ))
                }
            };
            if events.is_empty() {
                break;
            }
            for ev in events {
                let gone = AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_IGNORED;
                if ev.mask.intersects(gone) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "{} is gone (the cgroup was removed or moved)",
                            self.path.parent().unwrap_or(&self.path).display()
                        ),
                    ));
                }
                // An overflowed queue lost events: read the file to be safe.
                touched |= ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                    || ev.name.as_deref() == Some(OsStr::new(EVENTS_FILE));
            }
        }
        Ok(if touched { self.rise() } else { None })
    }

    /// Reads the counters; what rose since the last read, if anything.
    fn rise(&mut self) -> Option<EventCounts> {
        let text = read_str(&self.path)?;
        let now = ["high", "max", "oom", "oom_kill"].map(|k| flat_key(&text, k));
        let mut up = [0u64; 4];
        for ((last, now), up) in self.last.iter_mut().zip(now).zip(&mut up) {
            let Some(n) = now else { continue };
            if let Some(l) = *last {
                *up = n.saturating_sub(l);
            }
            *last = Some(n);
        }
        let rise = EventCounts {
            high: up[0],
            max: up[1],
            oom: up[2],
            oom_kill: up[3],
        };
        rise.any().then_some(rise)
    }
}

impl AsFd for CgroupEventWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::super::files::testutil::put;
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    fn v2(dir: &Path) -> Cgroup {
        Cgroup {
            dir: dir.to_path_buf(),
            version: CgroupVersion::V2,
        }
    }

    fn events(high: u64, max: u64, oom: u64, oom_kill: u64) -> String {
        format!("low 9\nhigh {high}\nmax {max}\noom {oom}\noom_kill {oom_kill}\noom_group_kill 0\n")
    }

    /// Replaces the file the way tools do it atomically: write aside, rename into place.
    fn replace(dir: &Path, text: &str) {
        put(dir, "memory.events.tmp", text);
        std::fs::rename(dir.join("memory.events.tmp"), dir.join(EVENTS_FILE)).unwrap();
    }

    /// Whether the watch's fd is readable within `ms`.
    fn readable(w: &CgroupEventWatch, ms: u16) -> bool {
        let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
    }

    #[test]
    fn rises_wake_and_are_reported() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        put(d, EVENTS_FILE, &events(1, 0, 0, 0));
        let mut w = CgroupEventWatch::new(&v2(d)).unwrap();
        assert_eq!(w.path(), d.join(EVENTS_FILE));
        assert!(!readable(&w, 0), "nothing happened yet");
        assert_eq!(w.check().unwrap(), None);

        // Written in place (as kernfs changes it): a rise of `high`.
        put(d, EVENTS_FILE, &events(3, 0, 0, 0));
        assert!(readable(&w, 1000));
        assert_eq!(
            w.check().unwrap(),
            Some(EventCounts {
                high: 2,
                ..EventCounts::default()
            })
        );
        assert!(!readable(&w, 0), "the events were consumed");

        // Renamed into place: `max`, `oom` and `oom_kill` count too.
        replace(d, &events(3, 1, 1, 1));
        assert!(readable(&w, 1000));
        assert_eq!(
            w.check().unwrap(),
            Some(EventCounts {
                high: 0,
                max: 1,
                oom: 1,
                oom_kill: 1
            })
        );
    }

    #[test]
    fn other_files_low_and_decreases_are_no_rise() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        put(d, EVENTS_FILE, &events(5, 5, 5, 5));
        let mut w = CgroupEventWatch::new(&v2(d)).unwrap();
        // Another file of the cgroup changes: woken, but nothing to report.
        put(d, "cgroup.events", "populated 1\n");
        assert!(readable(&w, 1000));
        assert_eq!(w.check().unwrap(), None);
        // `low` is no limit hit.
        put(
            d,
            EVENTS_FILE,
            &events(5, 5, 5, 5).replace("low 9", "low 10"),
        );
        assert_eq!(w.check().unwrap(), None);
        // Counters went down (a new cgroup): a new baseline, no event; then a rise from it.
        put(d, EVENTS_FILE, &events(0, 0, 0, 0));
        assert_eq!(w.check().unwrap(), None);
        put(d, EVENTS_FILE, &events(1, 0, 0, 0));
        assert_eq!(w.check().unwrap().map(|r| r.high), Some(1));
        // Garbage or an empty file (caught mid-write) keeps the baseline.
        put(d, EVENTS_FILE, "");
        assert_eq!(w.check().unwrap(), None);
        put(d, EVENTS_FILE, "high lots\n");
        assert_eq!(w.check().unwrap(), None);
        put(d, EVENTS_FILE, &events(2, 0, 0, 0));
        assert_eq!(w.check().unwrap().map(|r| r.high), Some(1));
    }

    /// A file that appears later starts the baseline then (no rise for its first counts).
    #[test]
    fn file_created_later() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut w = CgroupEventWatch::new(&v2(d)).unwrap();
        put(d, EVENTS_FILE, &events(4, 0, 0, 0));
        assert!(readable(&w, 1000));
        assert_eq!(w.check().unwrap(), None);
        put(d, EVENTS_FILE, &events(5, 0, 0, 0));
        assert_eq!(w.check().unwrap().map(|r| r.high), Some(1));
    }

    #[test]
    fn removed_cgroup_ends_the_watch() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("svc");
        put(&d, EVENTS_FILE, &events(0, 0, 0, 0));
        let mut w = CgroupEventWatch::new(&v2(&d)).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert!(readable(&w, 1000));
        let e = w.check().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("svc is gone"), "{e}");
    }

    #[test]
    fn refuses_v1_and_missing_dirs() {
        let t = tempfile::tempdir().unwrap();
        let v1 = Cgroup {
            dir: t.path().to_path_buf(),
            version: CgroupVersion::V1,
        };
        let e = CgroupEventWatch::new(&v1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = CgroupEventWatch::new(&v2(&t.path().join("none"))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("none"), "{e}");
    }
}
