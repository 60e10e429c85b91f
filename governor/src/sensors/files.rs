//! Small readers for procfs/sysfs/cgroupfs attribute files. Every failure (missing file,
//! I/O error, bad UTF-8, empty content, unparsable value) is `None`: the callers treat a
//! source they cannot read as absent, never as an error.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Attribute files are tiny (meminfo is ~1.5 KiB); a cap keeps a misconfigured root
/// (pointing at a log or a device) from reading megabytes every tick.
const MAX_ATTR_BYTES: u64 = 64 * 1024;

/// The file's content, trimmed; `None` when unreadable or empty.
pub(crate) fn read_str(path: &Path) -> Option<String> {
    // O_NONBLOCK: a FIFO planted in a fake tree must not hang the governor loop; it has
    // no effect on regular files and sysfs/procfs attributes.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut buf = String::new();
    file.take(MAX_ATTR_BYTES).read_to_string(&mut buf).ok()?;
    let trimmed = buf.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// The file's content parsed as one value (`u64`, `i64`, `f64`, ...).
pub(crate) fn read_parsed<T: FromStr>(path: &Path) -> Option<T> {
    read_str(path)?.parse().ok()
}

/// Entries of `dir` whose file name starts with `prefix`, sorted by name so that results
/// (and ties between equal readings) are stable; empty when `dir` is unreadable.
pub(crate) fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with(prefix).then(|| (name, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The value of `key` in a flat-keyed file (`key value` per line: `memory.events`,
/// `memory.oom_control`).
pub(crate) fn flat_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builds fake procfs/sysfs trees for the parser tests.

    use std::fs;
    use std::path::Path;

    /// Writes `content` to `root/rel`, creating the parent directories.
    pub(crate) fn put(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("a file path has a parent")).expect("mkdir");
        fs::write(&p, content).expect("write fake file");
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::put;
    use super::*;

    #[test]
    fn read_str_trims_and_rejects_empty_or_missing() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "a", "  42\n");
        put(d.path(), "empty", "\n \n");
        assert_eq!(read_str(&d.path().join("a")).as_deref(), Some("42"));
        assert_eq!(read_str(&d.path().join("empty")), None);
        assert_eq!(read_str(&d.path().join("missing")), None);
        // A directory is not an attribute.
        assert_eq!(read_str(d.path()), None);
    }

    #[test]
    fn read_parsed_rejects_garbage_and_bad_utf8() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "n", "-274000\n");
        put(d.path(), "g", "12abc\n");
        fs::write(d.path().join("bin"), [0xff, 0xfe, b'1']).unwrap();
        assert_eq!(read_parsed::<i64>(&d.path().join("n")), Some(-274000));
        assert_eq!(read_parsed::<u64>(&d.path().join("n")), None);
        assert_eq!(read_parsed::<u64>(&d.path().join("g")), None);
        assert_eq!(read_parsed::<u64>(&d.path().join("bin")), None);
    }

    #[test]
    fn flat_key_finds_exact_keys_only() {
        let t = "low 0\nhigh 7\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(flat_key(t, "high"), Some(7));
        assert_eq!(flat_key(t, "oom"), Some(1));
        assert_eq!(flat_key(t, "oom_group_kill"), Some(0));
        assert_eq!(flat_key(t, "om"), None);
        assert_eq!(flat_key("high x\n", "high"), None);
    }

    #[test]
    fn entries_are_filtered_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "thermal_zone1/temp", "1");
        put(d.path(), "thermal_zone0/temp", "1");
        put(d.path(), "cooling_device0/type", "Fan");
        let names: Vec<String> = entries_with_prefix(d.path(), "thermal_zone")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["thermal_zone0", "thermal_zone1"]);
        assert!(entries_with_prefix(&d.path().join("none"), "x").is_empty());
    }
}
