//! Who is calling, and whether they may. Every Unix connection's peer credentials are read
//! once, at accept, with SO_PEERCRED; the decision is attached to the connection and
//! checked by a layer in front of every service (health and reflection included).

use std::collections::HashSet;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group};

/// The credentials of a connection's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerId {
    /// A local process: SO_PEERCRED uid/gid/pid plus its supplementary groups (from
    /// /proc/<pid>/status, best effort).
    Local {
        uid: u32,
        gid: u32,
        pid: i32,
        groups: Vec<u32>,
    },
    /// A TCP peer (only when `server.tcp_listen` is set): no credentials.
    Tcp(std::net::SocketAddr),
    /// SO_PEERCRED failed.
    Unknown,
}

impl PeerId {
    /// The key of per-peer queue limits.
    pub fn queue_key(&self) -> String {
        match self {
            PeerId::Local { uid, .. } => format!("uid:{uid}"),
            PeerId::Tcp(a) => format!("tcp:{}", a.ip()),
            PeerId::Unknown => "unknown".into(),
        }
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerId::Local { uid, gid, pid, .. } => write!(f, "uid={uid} gid={gid} pid={pid}"),
            PeerId::Tcp(a) => write!(f, "tcp {a}"),
            PeerId::Unknown => write!(f, "unknown peer"),
        }
    }
}

/// What the connection layer attaches to every request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: PeerId,
    pub allowed: bool,
}

/// Reads SO_PEERCRED of a connected Unix socket.
pub fn peer_of(sock: &impl AsFd) -> PeerId {
    match getsockopt(sock, PeerCredentials) {
        Ok(c) => {
            let pid = c.pid();
            PeerId::Local {
                uid: c.uid(),
                gid: c.gid(),
                pid,
                groups: supplementary_groups(pid),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials (SO_PEERCRED)");
            PeerId::Unknown
        }
    }
}

/// The `Groups:` line of /proc/<pid>/status; empty when unreadable (the process may have
/// exited already; the primary gid from SO_PEERCRED still counts).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The allowed uids and gids, resolved from the config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub uids: HashSet<u32>,
    pub gids: HashSet<u32>,
}

impl Policy {
    /// From `[access]`: unset `allowed_uids` means root; unset `allowed_groups` means the
    /// socket's group.
    pub fn from_config(
        access: &crate::config::AccessSection,
        socket_gid: u32,
    ) -> anyhow::Result<Policy> {
        let uids = access
            .allowed_uids
            .clone()
            .unwrap_or_else(|| vec![0])
            .into_iter()
            .collect();
        let gids = match &access.allowed_groups {
            None => [socket_gid].into_iter().collect(),
            Some(gs) => gs
                .iter()
                .map(|g| resolve_group(g))
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Policy { uids, gids })
    }

    /// The decision for one peer. TCP peers are allowed (enabling TCP is the opt-in);
    /// peers whose credentials could not be read are refused.
    pub fn allows(&self, peer: &PeerId) -> bool {
        match peer {
            PeerId::Local {
                uid, gid, groups, ..
            } => {
                self.uids.contains(uid)
                    || self.gids.contains(gid)
                    || groups.iter().any(|g| self.gids.contains(g))
            }
            PeerId::Tcp(_) => true,
            PeerId::Unknown => false,
        }
    }
}

/// A group name or numeric gid.
pub fn resolve_group(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match Group::from_name(g) {
        Ok(Some(grp)) => Ok(grp.gid.as_raw()),
        Ok(None) => anyhow::bail!("group {g:?} does not exist"),
        Err(e) => anyhow::bail!("cannot look up group {g:?}: {e}"),
    }
}

/// The daemon's own effective gid.
pub fn own_gid() -> u32 {
    Gid::effective().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessSection;

    fn local(uid: u32, gid: u32, groups: &[u32]) -> PeerId {
        PeerId::Local {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn default_policy_is_root_and_socket_group() {
        let p = Policy::from_config(&AccessSection::default(), 990).unwrap();
        assert!(p.allows(&local(0, 0, &[])));
        assert!(p.allows(&local(1000, 990, &[])), "primary group");
        assert!(
            p.allows(&local(1000, 1000, &[4, 990])),
            "supplementary group"
        );
        assert!(!p.allows(&local(1000, 1000, &[4, 27])));
        assert!(!p.allows(&PeerId::Unknown));
        assert!(p.allows(&PeerId::Tcp("127.0.0.1:1".parse().unwrap())));
    }

    #[test]
    fn explicit_lists_replace_the_defaults() {
        let a = AccessSection {
            allowed_uids: Some(vec![1000]),
            allowed_groups: Some(vec!["4242".into()]),
        };
        let p = Policy::from_config(&a, 990).unwrap();
        assert!(
            !p.allows(&local(0, 0, &[0])),
            "root is not implicitly allowed"
        );
        assert!(p.allows(&local(1000, 1000, &[])));
        assert!(p.allows(&local(1001, 1001, &[4242])));
        assert!(!p.allows(&local(1001, 990, &[])));
        let bad = AccessSection {
            allowed_uids: None,
            allowed_groups: Some(vec!["no-such-group-gemmad-test".into()]),
        };
        assert!(Policy::from_config(&bad, 0).is_err());
    }

    #[test]
    fn reads_real_peer_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        match peer_of(&a) {
            PeerId::Local { uid, pid, .. } => {
                assert_eq!(uid, nix::unistd::Uid::effective().as_raw());
                assert_eq!(pid, std::process::id() as i32);
            }
            other => panic!("expected local credentials, got {other:?}"),
        }
    }
}
