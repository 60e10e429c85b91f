//! The per-peer limit on work before the queue: checking, rendering and tokenizing a
//! request costs CPU and memory on a blocking thread before the queue's own per-peer
//! limit sees it, so one uid may have only `queue.per_peer_preparing` requests there at
//! once; more are refused with a retry hint, as a full queue refuses.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ServiceError;

struct Inner {
    busy: HashMap<String, usize>,
    limit: usize,
    /// Moving average of how long one preparation takes (the retry hint).
    avg: Duration,
}

pub struct Preparing {
    inner: Mutex<Inner>,
}

/// One request being prepared; dropping it frees the slot.
pub struct Permit<'a> {
    gate: &'a Preparing,
    key: String,
    since: Instant,
}

impl Preparing {
    pub fn new(limit: usize) -> Self {
        Preparing {
            inner: Mutex::new(Inner {
                busy: HashMap::new(),
                limit,
                avg: Duration::from_millis(20),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing here panics while holding the lock; a poisoned one is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit;
    }

    /// A slot for one more request of peer `key`, or RESOURCE_EXHAUSTED.
    pub fn enter(&self, key: &str) -> Result<Permit<'_>, ServiceError> {
        let mut g = self.lock();
        let limit = g.limit;
        let retry_after = g
            .avg
            .clamp(Duration::from_millis(10), Duration::from_secs(10));
        let n = g.busy.entry(key.to_string()).or_insert(0);
        if *n >= limit {
            return Err(ServiceError::ResourceExhausted {
                message: format!(
                    "this user already has {limit} requests being checked and tokenized \
                     (queue.per_peer_preparing); retry in about {} ms",
                    retry_after.as_millis()
                ),
                retry_after,
            });
        }
        *n += 1;
        Ok(Permit {
            gate: self,
            key: key.to_string(),
            since: Instant::now(),
        })
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let took = self.since.elapsed();
        let mut g = self.gate.lock();
        if let Some(n) = g.busy.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.busy.remove(&self.key);
            }
        }
        g.avg = (g.avg * 7 + took) / 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_peer_and_frees_on_drop() {
        let p = Preparing::new(2);
        let a1 = p.enter("uid:1").unwrap();
        let _a2 = p.enter("uid:1").unwrap();
        let e = p.enter("uid:1").err().unwrap();
        assert!(
            matches!(&e, ServiceError::ResourceExhausted { retry_after, .. } if !retry_after.is_zero()),
            "{e:?}"
        );
        assert!(e.to_string().contains("queue.per_peer_preparing"), "{e}");
        let _b = p.enter("uid:2").unwrap();
        drop(a1);
        let _a3 = p.enter("uid:1").unwrap();
        p.set_limit(3);
        let _a4 = p.enter("uid:1").unwrap();
        assert!(p.enter("uid:1").is_err());
    }
}
