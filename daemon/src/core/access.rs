//! Who may call, for every front end: the access policy (allowed uids and groups from
//! `[access]`) and the reading of a Unix peer's credentials (SO_PEERCRED plus its
//! supplementary groups) into a [`Peer`].

use std::collections::HashSet;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group};

use super::types::Peer;

/// Reads SO_PEERCRED of a connected Unix socket, and the peer's supplementary groups
/// as the kernel recorded them at connect (SO_PEERGROUPS).
pub fn peer_of(sock: &impl AsFd, via: &'static str) -> Peer {
    match getsockopt(sock, PeerCredentials) {
        Ok(c) => match peer_groups(sock) {
            Some(groups) => {
                let gid = c.gid();
                let mut gids = vec![gid];
                gids.extend(groups.into_iter().filter(|&g| g != gid));
                Peer {
                    uid: Some(c.uid()),
                    gids,
                    pid: Some(c.pid()),
                    tcp: None,
                    via,
                }
            }
            // Kernels before 4.13: the groups from /proc (hidden by ProtectProc=invisible).
            None => local_peer(c.uid(), c.gid(), Some(c.pid()), via),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials (SO_PEERCRED)");
            Peer::unknown(via)
        }
    }
}

/// The peer's supplementary groups from SO_PEERGROUPS (Linux 4.13+); `None` when the
/// kernel does not have it. Reads the socket, not /proc, so it works where /proc hides
/// other users' processes (systemd's `ProtectProc=invisible`).
fn peer_groups(sock: &impl AsFd) -> Option<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable gid_t slots, and `len` is its
        // size; the kernel writes at most that many bytes and reports how many.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            // Too small: the kernel said how much it needs.
            Some(libc::ERANGE) if n > groups.len() && n <= 65536 => groups.resize(n, 0),
            _ => return None,
        }
    }
}

/// A local peer from its uid, primary gid and pid; the supplementary groups are read
/// from /proc.
pub fn local_peer(uid: u32, gid: u32, pid: Option<i32>, via: &'static str) -> Peer {
    let mut gids = vec![gid];
    if let Some(p) = pid {
        gids.extend(supplementary_groups(p).into_iter().filter(|&g| g != gid));
    }
    Peer {
        uid: Some(uid),
        gids,
        pid,
        tcp: None,
        via,
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
    /// Groups whose members may administer (pin the governor); uid 0 and gemmad's own
    /// uid always may.
    pub admin_gids: HashSet<u32>,
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
        let admin_gids = access
            .admin_groups
            .iter()
            .map(|g| resolve_group(g))
            .collect::<anyhow::Result<_>>()?;
        Ok(Policy {
            uids,
            gids,
            admin_gids,
        })
    }

    /// Whether `peer` may administer: uid 0, gemmad's own uid, or a member of an admin
    /// group. Peers without credentials (TCP) never may.
    pub fn is_admin(&self, peer: &Peer) -> bool {
        match peer.uid {
            Some(uid) => {
                uid == 0
                    || uid == nix::unistd::Uid::effective().as_raw()
                    || peer.gids.iter().any(|g| self.admin_gids.contains(g))
            }
            None => false,
        }
    }

    /// The decision for one peer. TCP peers are allowed (enabling TCP is the opt-in);
    /// peers whose credentials could not be read are refused.
    pub fn allows(&self, peer: &Peer) -> bool {
        match (peer.uid, peer.tcp) {
            (Some(uid), _) => {
                self.uids.contains(&uid) || peer.gids.iter().any(|g| self.gids.contains(g))
            }
            (None, Some(_)) => true,
            (None, None) => false,
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

    fn local(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        let mut gids = vec![gid];
        gids.extend_from_slice(groups);
        Peer {
            uid: Some(uid),
            gids,
            pid: Some(1),
            tcp: None,
            via: "test",
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
        assert!(!p.allows(&Peer::unknown("test")));
        let tcp = Peer {
            tcp: Some("127.0.0.1:1".parse().unwrap()),
            ..Peer::unknown("test")
        };
        assert!(p.allows(&tcp));
    }

    #[test]
    fn explicit_lists_replace_the_defaults() {
        let a = AccessSection {
            allowed_uids: Some(vec![1000]),
            allowed_groups: Some(vec!["4242".into()]),
            admin_groups: vec!["4343".into()],
        };
        let p = Policy::from_config(&a, 990).unwrap();
        assert!(p.is_admin(&local(0, 0, &[])));
        assert!(p.is_admin(&local(7, 7, &[4343])));
        assert!(!p.is_admin(&local(7, 7, &[4242])) || nix::unistd::Uid::effective().as_raw() == 7);
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
            admin_groups: Vec::new(),
        };
        assert!(Policy::from_config(&bad, 0).is_err());
    }

    #[test]
    fn reads_real_peer_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = peer_of(&a, "test");
        assert_eq!(p.uid, Some(nix::unistd::Uid::effective().as_raw()));
        assert_eq!(p.pid, Some(std::process::id() as i32));
        assert_eq!(
            p.gids.first(),
            Some(&nix::unistd::Gid::effective().as_raw())
        );
    }

    #[test]
    fn supplementary_groups_come_from_the_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(&a).expect("SO_PEERGROUPS (Linux 4.13+)");
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        want.dedup();
        assert_eq!(got, want);
    }
}
