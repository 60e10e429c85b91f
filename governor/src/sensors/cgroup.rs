//! The service's memory cgroup: where it is (from `/proc/self/cgroup`) and what it says
//! (usage, limits, limit and OOM events), for the unified hierarchy (v2) and the legacy
//! v1 memory controller.

use std::path::{Component, Path, PathBuf};

use super::files::{flat_key, read_parsed, read_str};

/// Which memory controller interface a cgroup directory speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Unified hierarchy: `memory.current`, `memory.max`, `memory.high`, `memory.events`.
    V2,
    /// Legacy memory controller: `memory.usage_in_bytes`, `memory.limit_in_bytes`,
    /// `memory.failcnt`, `memory.oom_control`.
    V1,
}

/// A memory cgroup directory and its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub dir: PathBuf,
    pub version: CgroupVersion,
}

/// What the cgroup reports; see `Readings` for the meaning of each field.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CgroupReading {
    pub current: Option<u64>,
    pub max: Option<u64>,
    pub high: Option<u64>,
    pub high_events: Option<u64>,
    pub oom_events: Option<u64>,
}

/// v1 reports "no limit" as `PAGE_COUNTER_MAX` rounded to pages (9223372036854771712
/// with 4 KiB pages, a little less with 16/64 KiB pages); no real limit comes near 2^62.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

impl Cgroup {
    /// The cgroup at `dir`, given by configuration. The interface is told by its files:
    /// `cgroup.controllers` exists only on cgroup2, `memory.usage_in_bytes` only on v1.
    /// A directory that shows neither (not there yet) is taken as v2, the modern default.
    pub fn at(dir: PathBuf) -> Cgroup {
        let version = if !dir.join("cgroup.controllers").exists()
            && dir.join("memory.usage_in_bytes").exists()
        {
            CgroupVersion::V1
        } else {
            CgroupVersion::V2
        };
        Cgroup { dir, version }
    }

    /// The calling process's memory cgroup, from `<procfs>/self/cgroup`:
    /// - the v2 line `0::/path`, when cgroup2 is mounted at `<sysfs>/fs/cgroup` (a pure
    ///   unified layout, told by `cgroup.controllers` there) and no v1 memory controller
    ///   claims memory instead;
    /// - else the v1 line `N:...memory...:/path` under `<sysfs>/fs/cgroup/memory` (legacy
    ///   and hybrid layouts; in the hybrid one the unified tree at `fs/cgroup/unified`
    ///   carries no memory controller, so it has nothing to read).
    ///
    /// `None` when neither applies (no cgroup filesystem, a foreign layout).
    pub fn discover(procfs_root: &Path, sysfs_root: &Path) -> Option<Cgroup> {
        let text = read_str(&procfs_root.join("self/cgroup"))?;
        let (v2, v1_memory) = parse_proc_cgroup(&text);
        let cgroup_fs = sysfs_root.join("fs/cgroup");
        let unified_root = cgroup_fs.join("cgroup.controllers");
        if let Some(path) = &v2 {
            if unified_root.exists() {
                let has_memory = read_str(&unified_root)
                    .is_some_and(|c| c.split_whitespace().any(|c| c == "memory"));
                if has_memory || v1_memory.is_none() {
                    let dir = join_cgroup(&cgroup_fs, path)?;
                    return Some(Cgroup {
                        dir,
                        version: CgroupVersion::V2,
                    });
                }
            }
        }
        let v1_root = cgroup_fs.join("memory");
        match v1_memory {
            Some(path) if v1_root.is_dir() => Some(Cgroup {
                dir: join_cgroup(&v1_root, &path)?,
                version: CgroupVersion::V1,
            }),
            _ => None,
        }
    }

    pub(crate) fn read(&self) -> CgroupReading {
        match self.version {
            CgroupVersion::V2 => self.read_v2(),
            CgroupVersion::V1 => self.read_v1(),
        }
    }

    fn read_v2(&self) -> CgroupReading {
        let d = &self.dir;
        let events = read_str(&d.join("memory.events"));
        let events = events.as_deref();
        CgroupReading {
            current: read_parsed(&d.join("memory.current")),
            max: read_v2_limit(&d.join("memory.max")),
            high: read_v2_limit(&d.join("memory.high")),
            // `high` counts throttling above memory.high, `max` reclaim forced at
            // memory.max: either is "the cgroup hit its ceiling". Summed, because a cgroup
            // with only memory.max set never counts `high` events.
            high_events: events.and_then(|t| {
                let (h, m) = (flat_key(t, "high"), flat_key(t, "max"));
                (h.is_some() || m.is_some()).then(|| h.unwrap_or(0).saturating_add(m.unwrap_or(0)))
            }),
            // `oom`: the OOM killer was invoked (an allocation was about to fail);
            // `oom_kill`: it killed (4.13+; also kills by the global OOM killer). Summed,
            // so a rise of either is an event.
            oom_events: events.and_then(|t| {
                let (o, k) = (flat_key(t, "oom"), flat_key(t, "oom_kill"));
                (o.is_some() || k.is_some()).then(|| o.unwrap_or(0).saturating_add(k.unwrap_or(0)))
            }),
        }
    }

    fn read_v1(&self) -> CgroupReading {
        let d = &self.dir;
        CgroupReading {
            current: read_parsed(&d.join("memory.usage_in_bytes")),
            max: read_parsed::<u64>(&d.join("memory.limit_in_bytes"))
                .filter(|&v| v < V1_UNLIMITED_FROM),
            // v1 has no throttle limit: soft_limit_in_bytes only steers global reclaim.
            high: None,
            // Times usage hit the limit: v1's nearest to v2's high/max events.
            high_events: read_parsed(&d.join("memory.failcnt")),
            oom_events: read_str(&d.join("memory.oom_control"))
                .and_then(|t| flat_key(&t, "oom_kill")),
        }
    }
}

/// `memory.max`/`memory.high`: bytes, or the literal `max` for no limit (`None`).
fn read_v2_limit(path: &Path) -> Option<u64> {
    read_parsed(path)
}

/// The v2 path (line `0::/path`) and the v1 memory controller's path (a line whose
/// controller list contains `memory`) of a `/proc/<pid>/cgroup` file.
fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        // A cgroup removed under a zombie reads "/path (deleted)".
        let path = path.strip_suffix(" (deleted)").unwrap_or(path).to_string();
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    (v2, v1)
}

/// `mount` + the cgroup path. The path is absolute relative to the hierarchy's root, so
/// it is joined component by component; `..` (a cgroup outside our namespace) has no
/// directory under our mount and yields `None`.
fn join_cgroup(mount: &Path, cgroup_path: &str) -> Option<PathBuf> {
    let mut dir = mount.to_path_buf();
    for c in Path::new(cgroup_path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => dir.push(name),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::super::files::testutil::put;
    use super::*;

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            (Some("/".into()), Some("/process_api/abc".into()))
        );
        let unified = "0::/system.slice/gemmad.service\n";
        assert_eq!(
            parse_proc_cgroup(unified),
            (Some("/system.slice/gemmad.service".into()), None)
        );
        let merged = "5:cpuacct,memory,cpu:/x\n";
        assert_eq!(parse_proc_cgroup(merged), (None, Some("/x".into())));
        assert_eq!(
            parse_proc_cgroup("0::/gone (deleted)\n"),
            (Some("/gone".into()), None)
        );
        // `name=memory` is a named hierarchy, not the memory controller.
        assert_eq!(
            parse_proc_cgroup("3:name=memory:/y\ngarbage\n"),
            (None, None)
        );
    }

    #[test]
    fn join_refuses_escapes() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(join_cgroup(m, "/"), Some(m.to_path_buf()));
        assert_eq!(join_cgroup(m, "/a/b"), Some(m.join("a/b")));
        assert_eq!(join_cgroup(m, "/../../a"), None);
    }

    /// A pure cgroup2 machine: discovery from `self/cgroup`, limits, "max", events.
    #[test]
    fn v2_discovery_and_reading() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        put(&proc, "self/cgroup", "0::/system.slice/gemmad.service\n");
        put(
            &sys,
            "fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory pids\n",
        );
        let svc = "fs/cgroup/system.slice/gemmad.service";
        put(&sys, &format!("{svc}/memory.current"), "123456789\n");
        put(&sys, &format!("{svc}/memory.max"), "4294967296\n");
        put(&sys, &format!("{svc}/memory.high"), "max\n");
        put(
            &sys,
            &format!("{svc}/memory.events"),
            "low 0\nhigh 5\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
        );

        let cg = Cgroup::discover(&proc, &sys).expect("v2 cgroup");
        assert_eq!(
            cg,
            Cgroup {
                dir: sys.join(svc),
                version: CgroupVersion::V2
            }
        );
        assert_eq!(
            cg.read(),
            CgroupReading {
                current: Some(123456789),
                max: Some(4 << 30),
                high: None,
                high_events: Some(7),
                oom_events: Some(2),
            }
        );
    }

    /// The root cgroup (inside a cgroup namespace everything is `0::/`) has no memory
    /// files: every reading is `None`, not an error.
    #[test]
    fn v2_root_has_no_memory_files() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        put(&proc, "self/cgroup", "0::/\n");
        put(&sys, "fs/cgroup/cgroup.controllers", "memory\n");
        let cg = Cgroup::discover(&proc, &sys).expect("v2 cgroup");
        assert_eq!(cg.dir, sys.join("fs/cgroup"));
        assert_eq!(cg.read(), CgroupReading::default());
    }

    #[test]
    fn v2_garbage_and_old_kernel_events() {
        let t = tempfile::tempdir().unwrap();
        put(t.path(), "memory.current", "lots\n");
        put(t.path(), "memory.max", "\n");
        put(t.path(), "memory.high", "1073741824\n");
        // Before 4.13: no oom_kill line; only `max` counted (no memory.high set).
        put(t.path(), "memory.events", "low 0\nmax 3\noom 2\n");
        let cg = Cgroup {
            dir: t.path().to_path_buf(),
            version: CgroupVersion::V2,
        };
        assert_eq!(
            cg.read(),
            CgroupReading {
                current: None,
                max: None,
                high: Some(1 << 30),
                high_events: Some(3),
                oom_events: Some(2)
            }
        );
        put(t.path(), "memory.events", "garbage\n");
        assert_eq!(cg.read().high_events, None);
        assert_eq!(cg.read().oom_events, None);
    }

    /// A hybrid machine like the test host: cgroup2 mounted at `fs/cgroup/unified` with no
    /// memory controller, v1 memory at `fs/cgroup/memory`.
    #[test]
    fn v1_discovery_on_hybrid_layout() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        put(
            &proc,
            "self/cgroup",
            "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
        );
        put(&sys, "fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
        let dir = "fs/cgroup/memory/process_api/abc";
        put(&sys, &format!("{dir}/memory.usage_in_bytes"), "3117056\n");
        put(
            &sys,
            &format!("{dir}/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        put(&sys, &format!("{dir}/memory.failcnt"), "4\n");
        put(
            &sys,
            &format!("{dir}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        );

        let cg = Cgroup::discover(&proc, &sys).expect("v1 cgroup");
        assert_eq!(
            cg,
            Cgroup {
                dir: sys.join(dir),
                version: CgroupVersion::V1
            }
        );
        assert_eq!(
            cg.read(),
            CgroupReading {
                current: Some(3117056),
                max: None,
                high: None,
                high_events: Some(4),
                oom_events: Some(1)
            }
        );

        // A real limit is reported; 64 KiB-page "unlimited" is still unlimited.
        put(
            &sys,
            &format!("{dir}/memory.limit_in_bytes"),
            "2147483648\n",
        );
        assert_eq!(cg.read().max, Some(2 << 30));
        put(
            &sys,
            &format!("{dir}/memory.limit_in_bytes"),
            "9223372036854710272\n",
        );
        assert_eq!(cg.read().max, None);
        // Kernels before 4.13 have no oom_kill line.
        put(
            &sys,
            &format!("{dir}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        );
        assert_eq!(cg.read().oom_events, None);
    }

    /// A unified mount at `fs/cgroup` whose root lacks the memory controller while v1
    /// memory is mounted: v1 wins, because v2 has nothing to read.
    #[test]
    fn v1_wins_when_unified_root_lacks_memory() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        put(&proc, "self/cgroup", "4:memory:/m\n0::/u\n");
        put(&sys, "fs/cgroup/cgroup.controllers", "cpu io\n");
        put(&sys, "fs/cgroup/memory/m/memory.usage_in_bytes", "1\n");
        assert_eq!(
            Cgroup::discover(&proc, &sys).map(|c| c.version),
            Some(CgroupVersion::V1)
        );
    }

    #[test]
    fn discovery_without_cgroups() {
        let t = tempfile::tempdir().unwrap();
        let (proc, sys) = (t.path().join("proc"), t.path().join("sys"));
        // No self/cgroup at all.
        assert_eq!(Cgroup::discover(&proc, &sys), None);
        // A v2 line but no cgroup filesystem mounted.
        put(&proc, "self/cgroup", "0::/a\n");
        assert_eq!(Cgroup::discover(&proc, &sys), None);
        // A v1 memory line but no memory hierarchy mounted.
        put(&proc, "self/cgroup", "4:memory:/a\n");
        assert_eq!(Cgroup::discover(&proc, &sys), None);
        put(&proc, "self/cgroup", "garbage\n\n");
        assert_eq!(Cgroup::discover(&proc, &sys), None);
    }

    #[test]
    fn configured_dir_version_is_told_by_its_files() {
        let t = tempfile::tempdir().unwrap();
        put(t.path(), "v1/memory.usage_in_bytes", "1\n");
        put(t.path(), "v2/cgroup.controllers", "memory\n");
        assert_eq!(Cgroup::at(t.path().join("v1")).version, CgroupVersion::V1);
        assert_eq!(Cgroup::at(t.path().join("v2")).version, CgroupVersion::V2);
        assert_eq!(
            Cgroup::at(t.path().join("missing")).version,
            CgroupVersion::V2
        );
    }
}
