//! Who is calling over the bus: each caller's credentials, asked of the bus once per
//! connection (`GetConnectionCredentials` on the message's sender), and the requests it
//! has running, cancelled when it leaves the bus.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use zbus::names::UniqueName;

use super::convert::Error;
use crate::core::types::Peer;

#[derive(Default)]
struct Caller {
    peer: Option<Peer>,
    /// Running requests by id, with the notifier that cancels each.
    requests: HashMap<u64, Arc<Notify>>,
}

/// The callers of the D-Bus front end, by unique bus name.
#[derive(Default)]
pub struct Callers {
    inner: Mutex<HashMap<String, Caller>>,
}

impl Callers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Caller>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credentials of `sender`, from the cache or the bus. Unique names are never
    /// reused, so an entry stays right until the caller leaves.
    pub async fn peer(
        &self,
        conn: &zbus::Connection,
        sender: &UniqueName<'_>,
    ) -> Result<Peer, Error> {
        if let Some(p) = self
            .lock()
            .get(sender.as_str())
            .and_then(|c| c.peer.clone())
        {
            return Ok(p);
        }
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let creds = dbus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(|e| {
                Error::PermissionDenied(format!(
                    "cannot read the credentials of {sender} from the bus: {e}"
                ))
            })?;
        let Some(uid) = creds.unix_user_id() else {
            return Err(Error::PermissionDenied(format!(
                "the bus reports no uid for {sender}"
            )));
        };
        let pid = creds.process_id().and_then(|p| i32::try_from(p).ok());
        let gids = match creds.unix_group_ids() {
            Some(g) => g.clone(),
            // Older buses omit the groups: the process's own, as the socket reads them.
            None => match pid {
                Some(p) => proc_gids(p),
                None => Vec::new(),
            },
        };
        let peer = Peer {
            uid: Some(uid),
            gids,
            pid,
            tcp: None,
            via: "dbus",
        };
        self.lock().entry(sender.to_string()).or_default().peer = Some(peer.clone());
        Ok(peer)
    }

    /// Records a running request of `sender`; `false` when the caller has left the bus
    /// since its credentials were read (the request must be cancelled at once).
    pub fn add_request(&self, sender: &str, id: u64, cancel: Arc<Notify>) -> bool {
        match self.lock().get_mut(sender) {
            Some(c) => {
                c.requests.insert(id, cancel);
                true
            }
            None => false,
        }
    }

    pub fn remove_request(&self, sender: &str, id: u64) {
        if let Some(c) = self.lock().get_mut(sender) {
            c.requests.remove(&id);
        }
    }

    /// `name` left the bus: forget it and cancel its requests. Returns how many.
    pub fn gone(&self, name: &str) -> usize {
        let Some(c) = self.lock().remove(name) else {
            return 0;
        };
        for n in c.requests.values() {
            n.notify_one();
        }
        c.requests.len()
    }

    /// Running requests, for the front end's log and tests.
    pub fn running(&self) -> usize {
        self.lock().values().map(|c| c.requests.len()).sum()
    }
}

/// The primary and supplementary gids of a process, from /proc/<pid>/status.
fn proc_gids(pid: i32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let mut gids: Vec<u32> = Vec::new();
    for l in s.lines() {
        if let Some(g) = l.strip_prefix("Gid:") {
            gids.extend(
                g.split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u32>().ok()),
            );
        }
    }
    for l in s.lines() {
        if let Some(g) = l.strip_prefix("Groups:") {
            let primary = gids.first().copied();
            gids.extend(
                g.split_whitespace()
                    .filter_map(|x| x.parse::<u32>().ok())
                    .filter(|&x| Some(x) != primary),
            );
        }
    }
    gids
}
