//! Connection bookkeeping for every front end: how many connections each uid has open,
//! the per-uid and total caps, the counters Status shows, and the rate limit on the log
//! lines a flood of refused or over-cap connections would otherwise write.
//!
//! A front end asks [`Connections::open`] when it accepts a connection (after the access
//! policy said yes) and keeps the returned [`ConnectionGuard`] for as long as the
//! connection lives: dropping it, however the connection ends, frees the slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::types::{ConnectionSnapshot, Peer};

/// How often one uid's refusals (or one kind of accept failure) may write a log line.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The caps in force (`[server]` max_connections_per_uid, max_connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub per_uid: usize,
    pub total: usize,
}

/// Why a connection was closed at accept, for the log and its rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The access policy does not allow the peer.
    Access,
    /// The peer's uid already has `per_uid` connections open.
    PerUid,
    /// `total` connections are open.
    Total,
}

/// Open connections by uid (TCP peers have none and count only in `total`).
#[derive(Default)]
struct Open {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    over_limit: AtomicU64,
    accept_errors: AtomicU64,
}

/// The connections of every front end together.
pub struct Connections {
    limits: ConnectionLimits,
    open: Mutex<Open>,
    counters: Counters,
    log: Mutex<LogLimiter<LogKey>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LogKey {
    Refused(Refusal, Option<u32>),
    AcceptFailed(std::io::ErrorKind),
}

/// Locks `m` even if a thread panicked while holding it: every update under these locks
/// is a single arithmetic step or map insert, so the data is never half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            open: Mutex::new(Open::default()),
            counters: Counters::default(),
            log: Mutex::new(LogLimiter::new(LOG_WINDOW)),
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Takes a slot for an accepted connection of `peer` (whom the access policy
    /// allows), or refuses it when its uid or the whole service is at its cap (counted
    /// and logged, rate-limited; the caller closes the connection).
    pub fn open(self: &Arc<Self>, peer: &Peer) -> Option<ConnectionGuard> {
        let over = {
            let mut open = lock(&self.open);
            let mine = peer
                .uid
                .map_or(0, |u| open.per_uid.get(&u).copied().unwrap_or(0));
            if peer.uid.is_some() && mine >= self.limits.per_uid {
                Some(Refusal::PerUid)
            } else if open.total >= self.limits.total {
                Some(Refusal::Total)
            } else {
                if let Some(u) = peer.uid {
                    *open.per_uid.entry(u).or_insert(0) += 1;
                }
                open.total += 1;
                None
            }
        };
        if let Some(why) = over {
            self.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            self.log_refusal(why, peer);
            return None;
        }
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionGuard {
            conns: self.clone(),
            uid: peer.uid,
        })
    }

    /// Notes a connection the access policy refused (the caller closes it).
    pub fn refused(&self, peer: &Peer) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        self.log_refusal(Refusal::Access, peer);
    }

    /// Notes a failed accept (`EMFILE`, `ECONNABORTED`, ...), logged rate-limited.
    pub fn accept_failed(&self, e: &std::io::Error, via: &'static str) {
        self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
        let hit = lock(&self.log).hit(LogKey::AcceptFailed(e.kind()), Instant::now());
        if let Some(suppressed) = hit {
            tracing::warn!(via, error = %e, suppressed, "cannot accept a connection; backing off");
        }
    }

    fn log_refusal(&self, why: Refusal, peer: &Peer) {
        let Some(suppressed) = lock(&self.log).hit(LogKey::Refused(why, peer.uid), Instant::now())
        else {
            return;
        };
        let l = self.limits;
        match why {
            Refusal::Access => tracing::warn!(
                peer = %peer, via = peer.via, suppressed,
                "connection refused by the access policy ([access] in the config); closed"
            ),
            Refusal::PerUid => tracing::warn!(
                peer = %peer, via = peer.via, limit = l.per_uid, suppressed,
                "connection closed: this uid is at its connection limit \
                 (server.max_connections_per_uid)"
            ),
            Refusal::Total => tracing::warn!(
                peer = %peer, via = peer.via, limit = l.total, suppressed,
                "connection closed: the service is at its connection limit \
                 (server.max_connections)"
            ),
        }
    }

    /// Logs the counts of lines held back whose window has passed with no new line to
    /// carry them (call every [`LOG_WINDOW`] or so).
    pub fn flush_log(&self) {
        for (key, n) in lock(&self.log).flush(Instant::now()) {
            match key {
                LogKey::Refused(why, uid) => tracing::warn!(
                    uid, reason = ?why, suppressed = n,
                    "more connections closed at accept (log lines suppressed)"
                ),
                LogKey::AcceptFailed(kind) => tracing::warn!(
                    error = %kind, suppressed = n,
                    "more failed accepts (log lines suppressed)"
                ),
            }
        }
    }

    pub fn snapshot(&self) -> ConnectionSnapshot {
        let c = &self.counters;
        ConnectionSnapshot {
            open: lock(&self.open).total,
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            over_limit: c.over_limit.load(Ordering::Relaxed),
            accept_errors: c.accept_errors.load(Ordering::Relaxed),
            max_per_uid: self.limits.per_uid,
            max_total: self.limits.total,
        }
    }

    /// Open connections of `uid`.
    #[cfg(test)]
    pub fn open_of(&self, uid: u32) -> usize {
        lock(&self.open).per_uid.get(&uid).copied().unwrap_or(0)
    }
}

/// Runs [`Connections::flush_log`] every [`LOG_WINDOW`], forever (spawn it).
pub async fn flush_log_every_window(conns: Arc<Connections>) {
    let mut tick = tokio::time::interval(LOG_WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        conns.flush_log();
    }
}

/// One open connection's slot; dropping it frees the slot.
pub struct ConnectionGuard {
    conns: Arc<Connections>,
    uid: Option<u32>,
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("uid", &self.uid)
            .finish()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = lock(&self.conns.open);
        open.total = open.total.saturating_sub(1);
        if let Some(u) = self.uid {
            if let Some(n) = open.per_uid.get_mut(&u) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.per_uid.remove(&u);
                }
            }
        }
    }
}

/// At most one log line per key per window. An event inside the window is counted
/// instead; the next line of that key says how many were held back, and [`flush`]
/// reports counts whose window passed with no new line to carry them.
///
/// [`flush`]: LogLimiter::flush
#[derive(Debug)]
pub struct LogLimiter<K> {
    window: Duration,
    keys: HashMap<K, Slot>,
}

#[derive(Debug)]
struct Slot {
    last_line: Instant,
    suppressed: u64,
}

impl<K: Eq + Hash + Clone> LogLimiter<K> {
    pub fn new(window: Duration) -> Self {
        LogLimiter {
            window,
            keys: HashMap::new(),
        }
    }

    /// `Some(n)`: write a line now, mentioning the `n` events held back since the last
    /// one; `None`: this event is held back.
    pub fn hit(&mut self, key: K, now: Instant) -> Option<u64> {
        match self.keys.get_mut(&key) {
            Some(s) if now.saturating_duration_since(s.last_line) < self.window => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let n = std::mem::take(&mut s.suppressed);
                s.last_line = now;
                Some(n)
            }
            None => {
                self.keys.insert(
                    key,
                    Slot {
                        last_line: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// The held-back counts of keys whose window has passed; those keys are forgotten
    /// (so the map holds only keys seen in the last window).
    pub fn flush(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut out = Vec::new();
        self.keys.retain(|k, s| {
            if now.saturating_duration_since(s.last_line) < self.window {
                return true;
            }
            if s.suppressed > 0 {
                out.push((k.clone(), s.suppressed));
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(u: u32) -> Peer {
        Peer {
            uid: Some(u),
            gids: vec![u],
            pid: Some(1),
            tcp: None,
            via: "test",
        }
    }

    #[test]
    fn per_uid_and_total_caps_and_slots_come_back_on_drop() {
        let c = Connections::new(ConnectionLimits {
            per_uid: 2,
            total: 3,
        });
        let a1 = c.open(&uid(1)).expect("first of uid 1");
        let a2 = c.open(&uid(1)).expect("second of uid 1");
        assert!(c.open(&uid(1)).is_none(), "third of uid 1 is over its cap");
        let b1 = c.open(&uid(2)).expect("uid 2 has its own cap");
        assert!(c.open(&uid(3)).is_none(), "the total cap");
        let tcp = Peer {
            tcp: Some("127.0.0.1:1".parse().unwrap()),
            ..Peer::unknown("test")
        };
        assert!(c.open(&tcp).is_none(), "TCP peers count in the total");
        let s = c.snapshot();
        assert_eq!((s.open, s.accepted, s.over_limit), (3, 3, 3));
        assert_eq!(c.open_of(1), 2);
        drop(a1);
        assert_eq!(c.open_of(1), 1);
        let a3 = c.open(&uid(1)).expect("a slot of uid 1 came back");
        drop((a2, a3, b1));
        assert_eq!(c.snapshot().open, 0);
        assert_eq!(c.open_of(1), 0);
        let t = c.open(&tcp).expect("TCP peers have no per-uid cap");
        assert_eq!(c.snapshot().open, 1);
        drop(t);
        assert_eq!(c.snapshot().open, 0);
    }

    #[test]
    fn refusals_and_accept_errors_are_counted() {
        let c = Connections::new(ConnectionLimits {
            per_uid: 1,
            total: 1,
        });
        for _ in 0..300 {
            c.refused(&uid(65534));
        }
        let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        c.accept_failed(&emfile, "test");
        let s = c.snapshot();
        assert_eq!((s.refused, s.accept_errors, s.open), (300, 1, 0));
    }

    #[test]
    fn log_limiter_writes_one_line_per_key_per_window_then_the_count() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut l = LogLimiter::new(w);
        assert_eq!(l.hit(1, t0), Some(0), "the first event is logged");
        for i in 0..299 {
            assert_eq!(l.hit(1, t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.hit(2, t0), Some(0), "another key has its own window");
        assert!(
            l.flush(t0 + Duration::from_secs(5)).is_empty(),
            "window open"
        );
        // The next event after the window carries the count.
        assert_eq!(l.hit(1, t0 + w), Some(299));
        assert_eq!(l.hit(1, t0 + w), None);
        // With no further event, flush reports what was held back and forgets the key.
        let mut f = l.flush(t0 + 2 * w);
        f.sort();
        assert_eq!(f, vec![(1, 1)]);
        assert!(l.keys.is_empty(), "keys past their window are forgotten");
        assert_eq!(l.hit(1, t0 + 2 * w), Some(0));
    }
}
