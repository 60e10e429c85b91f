//! The few /proc figures the benchmark reports: this process's memory (VmHWM, VmRSS,
//! RssAnon, RssFile), CPU time of this process and of the whole machine (to tell how much
//! other processes ran during a measurement), and page-cache residency of files (mincore).

use std::path::Path;

use anyhow::{Context, Result};

/// Memory figures of `/proc/self/status`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStatus {
    pub vm_hwm: u64,
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    /// File-backed memory mapped with 2 MiB pages (`FilePmdMapped`, smaps_rollup only).
    pub file_pmd: u64,
    /// Anonymous memory on transparent huge pages (`AnonHugePages`, smaps_rollup only).
    pub anon_huge: u64,
}

/// Parses the `kB` lines of a `/proc/<pid>/status` or `/proc/<pid>/smaps_rollup` text.
pub fn parse_status(text: &str) -> MemStatus {
    let mut m = MemStatus::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kb = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        let Some(kb) = kb else { continue };
        let b = kb * 1024;
        match key {
            "VmHWM" => m.vm_hwm = b,
            "VmRSS" => m.vm_rss = b,
            "RssAnon" => m.rss_anon = b,
            "RssFile" => m.rss_file = b,
            "FilePmdMapped" => m.file_pmd = b,
            "AnonHugePages" => m.anon_huge = b,
            _ => {}
        }
    }
    m
}

pub fn mem_status() -> Result<MemStatus> {
    let t = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    Ok(parse_status(&t))
}

/// This process's memory on 2 MiB pages, from `/proc/self/smaps_rollup`: decode streams
/// the weights, and on 4 KiB pages it streams them markedly slower.
pub fn huge_pages() -> Result<MemStatus> {
    let t = std::fs::read_to_string("/proc/self/smaps_rollup")
        .context("read /proc/self/smaps_rollup")?;
    Ok(parse_status(&t))
}

/// Clock ticks per second of /proc CPU counters.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// Machine-wide CPU ticks from the `cpu` line of /proc/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq (guest time is already inside user/nice).
    pub busy: u64,
    pub idle: u64,
    pub iowait: u64,
    /// Time the hypervisor gave to someone else.
    pub steal: u64,
}

pub fn parse_proc_stat(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: g(0) + g(1) + g(2) + g(5) + g(6),
        idle: g(3),
        iowait: g(4),
        steal: g(7),
    })
}

/// utime + stime + cutime + cstime (children that were waited for, e.g. the bandwidth
/// probe) of a `/proc/<pid>/stat` text. The command name may hold spaces and parentheses,
/// so fields are counted after the last `)`.
pub fn parse_self_stat(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); utime is field 14.
    let g = |field: usize| f.get(field - 3).and_then(|x| x.parse::<u64>().ok());
    Some(g(14)? + g(15)? + g(16)? + g(17)?)
}

/// A snapshot of CPU counters; the difference of two tells who used the CPUs.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    pub machine: MachineTicks,
    pub own: u64,
    pub at: std::time::Instant,
}

impl CpuSnapshot {
    pub fn now() -> Result<Self> {
        let s = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let machine = parse_proc_stat(&s).context("parse /proc/stat")?;
        let me = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
        let own = parse_self_stat(&me).context("parse /proc/self/stat")?;
        Ok(CpuSnapshot {
            machine,
            own,
            at: std::time::Instant::now(),
        })
    }

    /// CPU use between `self` (earlier) and `later`.
    pub fn until(&self, later: &CpuSnapshot) -> CpuUse {
        let hz = clk_tck();
        let busy = later.machine.busy.saturating_sub(self.machine.busy) as f64 / hz;
        let own = later.own.saturating_sub(self.own) as f64 / hz;
        CpuUse {
            wall_s: later.at.duration_since(self.at).as_secs_f64(),
            own_cpu_s: own,
            others_cpu_s: (busy - own).max(0.0),
            steal_s: later.machine.steal.saturating_sub(self.machine.steal) as f64 / hz,
            iowait_s: later.machine.iowait.saturating_sub(self.machine.iowait) as f64 / hz,
        }
    }
}

/// CPU time used during a window, in CPU-seconds. Tick granularity is 10 ms per CPU, so
/// figures below ~0.05 s are noise.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub wall_s: f64,
    pub own_cpu_s: f64,
    pub others_cpu_s: f64,
    pub steal_s: f64,
    pub iowait_s: f64,
}

impl CpuUse {
    /// Share of the machine's CPU capacity other processes (and the hypervisor) took.
    pub fn others_share(&self, ncpu: usize) -> f64 {
        if self.wall_s <= 0.0 {
            return 0.0;
        }
        (self.others_cpu_s + self.steal_s) / (self.wall_s * ncpu.max(1) as f64)
    }
}

/// Bytes of `path` currently in the page cache, and the file's size.
pub fn resident_bytes(path: &Path) -> Result<(u64, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok((0, 0));
    }
    // SAFETY: read-only mapping of a file we only inspect with mincore.
    let map =
        unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("map {}", path.display()))?;
    Ok((resident_in(&map)? as u64, len))
}

/// Bytes of a file-backed (or anonymous) mapped region that are resident, by mincore over
/// the pages it touches (counted whole pages, capped at the slice length).
pub fn resident_in(s: &[u8]) -> Result<usize> {
    if s.is_empty() {
        return Ok(0);
    }
    let page = page_size();
    let addr = s.as_ptr() as usize;
    let start = addr / page * page;
    let len = addr + s.len() - start;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: [start, start + len) lies within pages of a live mapping that `s` borrows;
    // `vec` has one byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mincore");
    }
    let resident = vec.iter().filter(|&&b| b & 1 != 0).count() * page;
    Ok(resident.min(s.len()))
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// Transparent huge page mode (`always`, `madvise`, `never`) from sysfs.
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let a = s.find('[')?;
    let b = s[a..].find(']')?;
    Some(s[a + 1..a + b].to_string())
}

pub fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let t = "Name:\tbench\nVmPeak:\t  100 kB\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n\
                 RssAnon:\t  512 kB\nRssFile:\t  500 kB\nThreads:\t3\n";
        let m = parse_status(t);
        assert_eq!(m.vm_hwm, 2048 * 1024);
        assert_eq!(m.vm_rss, 1024 * 1024);
        assert_eq!(m.rss_anon, 512 * 1024);
        assert_eq!(m.rss_file, 500 * 1024);
        let rollup = "Rss:\t  4096 kB\nAnonHugePages:\t  2048 kB\nFilePmdMapped:\t  8192 kB\n";
        let h = parse_status(rollup);
        assert_eq!((h.file_pmd, h.anon_huge), (8192 * 1024, 2048 * 1024));
    }

    #[test]
    fn proc_stat_and_self_stat() {
        let s = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 50 2 25 500 10 1 1 3 0 0\n";
        let m = parse_proc_stat(s).unwrap();
        assert_eq!(m.busy, 100 + 5 + 50 + 3 + 2);
        assert_eq!(m.idle, 1000);
        assert_eq!(m.iowait, 20);
        assert_eq!(m.steal, 7);
        let me = "1234 (my (odd) name) R 1 2 3 4 5 6 7 8 9 10 11 22 33 44 20 0 1 0";
        assert_eq!(parse_self_stat(me), Some(11 + 22 + 33 + 44));
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_self_stat(&real).is_some());
    }
}
