//! The cache directory and the one way derived files get into it and out of it.
//!
//! The daemon runs as root and the directory may be reachable by others (a misconfigured
//! `cache_dir`, a shared /var/cache), so nothing here trusts a name: the directory is
//! opened once (`O_NOFOLLOW`, ownership and mode checked) and every later operation is
//! an `*at` call on that descriptor, so a directory swapped or symlinked afterwards is
//! never followed. A file is written under an unpredictable temporary name created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted file or symlink makes the create fail instead
//! of redirecting the write), synced, renamed over its destination (`renameat` replaces a
//! symlink there rather than following it) and the directory synced. A temporary file
//! dropped before its commit (an error, ENOSPC, a cancel) is unlinked; those of writers
//! that were killed are removed by the next [`CacheDir::open`].
//!
//! Readers open existing files with `O_NOFOLLOW` and trust only regular files owned by
//! this process's user (or root) that nobody else can write; anything else is reported
//! as [`Existing::Untrusted`] and the caller rebuilds it through the writer.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use nix::unistd::{fsync, geteuid, unlinkat, Pid, UnlinkatFlags};

use crate::error::{EngineError, Result};

/// Marks a temporary file's name: `.<dest>.tmp-<pid>-<16 hex digits>`.
const TMP_MARK: &str = ".tmp-";

/// An opened, checked cache directory. Cheap to clone (the descriptor is shared).
#[derive(Clone, Debug)]
pub struct CacheDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    fd: OwnedFd,
}

/// What [`CacheDir::open_existing`] found under a name.
#[derive(Debug)]
pub enum Existing {
    Missing,
    /// Present but not to be trusted (a symlink, not a regular file, someone else's or
    /// writable by others); the reason says which.
    Untrusted(String),
    File(File),
}

impl CacheDir {
    /// Creates `path` if missing (mode 0755), opens it (refusing a symlink) and checks
    /// that it is owned by this process's user or root and not writable by others unless
    /// sticky. Then removes temporary files left by writers that are gone.
    pub fn open(path: &Path) -> Result<CacheDir> {
        // An existing folder is fine even where nothing can be created (read-only media).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(|e| EngineError::io(path, e))?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty()).map_err(|e| {
            // Linux answers ENOTDIR (O_DIRECTORY) or ELOOP (O_NOFOLLOW) for a symlink.
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if link {
                refuse(
                    path,
                    "is a symbolic link; set cache_dir to the real directory".into(),
                )
            } else {
                EngineError::io(path, e.into())
            }
        })?;
        let st = fstat(&fd).map_err(|e| EngineError::io(path, e.into()))?;
        check_dir(&st).map_err(|reason| refuse(path, reason))?;
        let dir = CacheDir {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                fd,
            }),
        };
        dir.remove_stale_temps();
        Ok(dir)
    }

    /// The directory's path (for messages; operations go through the descriptor).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `name` in this directory, for messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.inner.path.join(name)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// Opens the derived file `name` for reading if it is there and can be trusted.
    pub fn open_existing(&self, name: &str) -> Result<Existing> {
        check_name(self, name)?;
        // O_NONBLOCK: a FIFO planted under the name must not block the open.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(self.fd(), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Existing::Missing),
            Err(Errno::ELOOP) => return Ok(Existing::Untrusted("is a symbolic link".into())),
            Err(e) => return Err(EngineError::io(self.path_of(name), e.into())),
        };
        let st = fstat(&fd).map_err(|e| EngineError::io(self.path_of(name), e.into()))?;
        Ok(match check_file(&st) {
            Ok(()) => Existing::File(File::from(fd)),
            Err(reason) => Existing::Untrusted(reason),
        })
    }

    /// Starts writing the derived file `dest`: a fresh temporary file (read and write,
    /// mode 0644) that [`TempFile::commit`] renames onto `dest`.
    pub fn create_temp(&self, dest: &str) -> Result<(TempFile, File)> {
        self.create_temp_mode(dest, 0o644)
    }

    /// As [`CacheDir::create_temp`], readable only by this user (files that hold what
    /// users sent: the prompt cache).
    pub fn create_private_temp(&self, dest: &str) -> Result<(TempFile, File)> {
        self.create_temp_mode(dest, 0o600)
    }

    fn create_temp_mode(&self, dest: &str, mode: u32) -> Result<(TempFile, File)> {
        check_name(self, dest)?;
        let tmp = format!(
            ".{dest}{TMP_MARK}{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDWR;
        let fd = openat(
            self.fd(),
            tmp.as_str(),
            flags,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| EngineError::io(self.path_of(&tmp), e.into()))?;
        let t = TempFile {
            dir: self.clone(),
            tmp,
            dest: dest.to_string(),
            armed: true,
        };
        Ok((t, File::from(fd)))
    }

    /// Renames `name` to `to` within the directory (moving a corrupt file aside).
    pub fn rename(&self, name: &str, to: &str) -> Result<()> {
        check_name(self, name)?;
        check_name(self, to)?;
        renameat(self.fd(), name, self.fd(), to)
            .map_err(|e| EngineError::io(self.path_of(name), e.into()))
    }

    /// Removes the derived file `name` (one this build cannot use).
    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(self, name)?;
        unlinkat(self.fd(), name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| EngineError::io(self.path_of(name), e.into()))
    }

    /// The names in the directory that start with `prefix` (temporary files excluded).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .names()?
            .into_iter()
            .filter(|n| n.starts_with(prefix) && !n.contains(TMP_MARK))
            .collect())
    }

    /// Every name in the directory (through its descriptor).
    fn names(&self) -> Result<Vec<String>> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut d = Dir::openat(self.fd(), ".", flags, Mode::empty())
            .map_err(|e| EngineError::io(self.path(), e.into()))?;
        Ok(d.iter()
            .filter_map(|e| e.ok())
            .filter_map(|e| entry_name(e.file_name()))
            .collect())
    }

    /// Removes temporary files whose writer process is gone; returns how many.
    fn remove_stale_temps(&self) -> usize {
        let names = match self.names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(cache_dir = %self.path().display(), error = %e,
                    "cannot list the cache directory to remove stale temporary files");
                return 0;
            }
        };
        let stale: Vec<String> = names
            .into_iter()
            .filter(|n| temp_pid(n).is_some_and(|pid| !process_alive(pid)))
            .collect();
        let mut removed = 0;
        for n in stale {
            match unlinkat(self.fd(), n.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %self.path_of(&n).display(),
                        "removed the temporary file of an interrupted write");
                }
                Err(e) => tracing::warn!(path = %self.path_of(&n).display(), error = %e,
                    "cannot remove the temporary file of an interrupted write"),
            }
        }
        removed
    }
}

/// A derived file being written under a temporary name, renamed into place by
/// [`TempFile::commit`]. Dropped uncommitted (an error, a cancel), it unlinks the
/// temporary file, so a failed write leaves nothing behind.
#[derive(Debug)]
pub struct TempFile {
    dir: CacheDir,
    tmp: String,
    dest: String,
    armed: bool,
}

impl TempFile {
    /// The temporary file's path (for errors about writing it).
    pub fn path(&self) -> PathBuf {
        self.dir.path_of(&self.tmp)
    }

    /// Syncs and closes `file` (the one [`CacheDir::create_temp`] returned), renames it
    /// onto the destination and syncs the directory, so that the new name survives a
    /// crash.
    pub fn commit(mut self, file: File) -> Result<()> {
        file.sync_all()
            .map_err(|e| EngineError::io(self.path(), e))?;
        drop(file);
        let d = self.dir.fd();
        renameat(d, self.tmp.as_str(), d, self.dest.as_str())
            .map_err(|e| EngineError::io(self.dir.path_of(&self.dest), e.into()))?;
        self.armed = false;
        // The file is complete under its name either way; a crash before the directory
        // reaches the disk only costs a rebuild, so this is not worth failing the write.
        if let Err(e) = fsync(d) {
            tracing::warn!(cache_dir = %self.dir.path().display(), error = %e,
                "cannot sync the cache directory after a rename");
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = unlinkat(self.dir.fd(), self.tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                tracing::warn!(path = %self.path().display(), error = %e,
                    "cannot remove the temporary file of a failed write");
            }
        }
    }
}

fn refuse(path: &Path, reason: String) -> EngineError {
    EngineError::CacheDir {
        path: path.to_path_buf(),
        reason,
    }
}

/// One plain name in the directory: no separators, not `.` or `..`, not empty.
fn check_name(dir: &CacheDir, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(refuse(
            dir.path(),
            format!("`{name}` is not a plain file name"),
        ));
    }
    Ok(())
}

fn owner_ok(uid: u32) -> bool {
    uid == 0 || uid == geteuid().as_raw()
}

fn check_dir(st: &FileStat) -> std::result::Result<(), String> {
    let mode = st.st_mode;
    if !owner_ok(st.st_uid) {
        return Err(format!(
            "is owned by uid {}, not by this process's uid {} or root",
            st.st_uid,
            geteuid()
        ));
    }
    // Others who may create and rename entries could swap a file between our check and
    // our use; the sticky bit stops them from touching entries they do not own.
    if mode & 0o022 != 0 && mode & Mode::S_ISVTX.bits() == 0 {
        return Err(format!(
            "is writable by group or others without the sticky bit (mode {:o}); \
             make it 0755 or tighter",
            mode & 0o7777
        ));
    }
    Ok(())
}

fn check_file(st: &FileStat) -> std::result::Result<(), String> {
    let mode = st.st_mode;
    if mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err("is not a regular file".into());
    }
    if !owner_ok(st.st_uid) {
        return Err(format!(
            "is owned by uid {}, not by this process's uid {} or root",
            st.st_uid,
            geteuid()
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "is writable by group or others (mode {:o})",
            mode & 0o7777
        ));
    }
    Ok(())
}

fn entry_name(n: &CStr) -> Option<String> {
    n.to_str().ok().map(str::to_string)
}

/// The writer's pid of a temporary file's name: `.<dest>.tmp-<pid>-<hex>`, or the
/// `<dest>.tmp-<pid>` of earlier versions.
fn temp_pid(name: &str) -> Option<u32> {
    let (dest, rest) = name.rsplit_once(TMP_MARK)?;
    let (pid, random) = match rest.split_once('-') {
        Some((pid, r)) if dest.len() > 1 && dest.starts_with('.') => (pid, Some(r)),
        Some(_) => return None,
        None if !dest.is_empty() => (rest, None),
        None => return None,
    };
    if random.is_some_and(|r| r.len() != 16 || !r.bytes().all(|b| b.is_ascii_hexdigit())) {
        return None;
    }
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether `pid` names a live process (one we may not signal is alive too).
fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(Pid::from_raw(raw), None),
        Err(Errno::ESRCH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn write(dir: &CacheDir, name: &str, data: &[u8]) {
        let (t, mut f) = dir.create_temp(name).unwrap();
        f.write_all(data).unwrap();
        t.commit(f).unwrap();
    }

    /// A pid that is not running: a child that has been waited for.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!process_alive(pid));
        pid
    }

    #[test]
    fn commit_renames_into_place_and_drop_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/cache");
        let dir = CacheDir::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o755);
        // A killed write (dropped before its commit) leaves no file.
        let (t, mut f) = dir.create_temp("out.bin").unwrap();
        f.write_all(b"partial").unwrap();
        assert_eq!(names(&path).len(), 1, "the temp file exists while writing");
        assert!(names(&path)[0].starts_with(".out.bin.tmp-"));
        drop(f);
        drop(t);
        assert!(names(&path).is_empty(), "{:?}", names(&path));
        write(&dir, "out.bin", b"x");
        assert_eq!(std::fs::read(path.join("out.bin")).unwrap(), b"x");
        assert_eq!(names(&path), ["out.bin"]);
        let md = std::fs::metadata(path.join("out.bin")).unwrap();
        assert_eq!(md.mode() & 0o022, 0, "not writable by others");
        match dir.open_existing("out.bin").unwrap() {
            Existing::File(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            dir.open_existing("absent").unwrap(),
            Existing::Missing
        ));
        assert!(dir.create_temp("../escape").is_err());
        assert!(dir.open_existing("a/b").is_err());
    }

    #[test]
    fn temp_names_are_unpredictable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open(tmp.path()).unwrap();
        let (a, _fa) = dir.create_temp("x").unwrap();
        let (b, _fb) = dir.create_temp("x").unwrap();
        assert_ne!(a.path(), b.path());
        let n = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(temp_pid(&n), Some(std::process::id()), "{n}");
    }

    #[test]
    fn a_planted_symlink_at_the_destination_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = tmp.path().join("cache");
        let dir = CacheDir::open(&path).unwrap();
        std::os::unix::fs::symlink(&victim, path.join("out.bin")).unwrap();
        // Readers do not follow it either.
        match dir.open_existing("out.bin").unwrap() {
            Existing::Untrusted(r) => assert!(r.contains("symbolic link"), "{r}"),
            other => panic!("{other:?}"),
        }
        write(&dir, "out.bin", b"derived");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let md = std::fs::symlink_metadata(path.join("out.bin")).unwrap();
        assert!(md.file_type().is_file(), "{md:?}");
        assert_eq!(std::fs::read(path.join("out.bin")).unwrap(), b"derived");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cache");
        std::fs::create_dir(&path).unwrap();
        for mode in [0o777, 0o775, 0o757] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = CacheDir::open(&path).unwrap_err().to_string();
            assert!(e.contains("writable by group or others"), "{mode:o}: {e}");
        }
        // Sticky (like /tmp): others cannot rename or remove our entries.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777)).unwrap();
        CacheDir::open(&path).unwrap();
        // A symlink to a good directory is refused too: the checked folder must be the one
        // used.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = CacheDir::open(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn temps_of_dead_writers_are_removed_at_open_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path();
        let dead = dead_pid();
        let live = std::process::id();
        let stale = format!(".w.bin.tmp-{dead}-0123456789abcdef");
        let legacy = format!("w.bin.tmp-{dead}");
        let running = format!(".w.bin.tmp-{live}-fedcba9876543210");
        let unrelated = format!("notes.tmp-{dead}-x");
        for n in [&stale, &legacy, &running, &unrelated] {
            std::fs::write(path.join(n), b"t").unwrap();
        }
        let _dir = CacheDir::open(path).unwrap();
        let mut want = vec![running.clone(), unrelated.clone()];
        want.sort();
        assert_eq!(names(path), want);
    }

    #[test]
    fn files_of_another_user_or_writable_by_others_are_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CacheDir::open(tmp.path()).unwrap();
        write(&dir, "theirs", b"x");
        write(&dir, "open", b"x");
        let theirs = tmp.path().join("theirs");
        match std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)) {
            Ok(()) => match dir.open_existing("theirs").unwrap() {
                Existing::Untrusted(r) => assert!(r.contains("uid 4242"), "{r}"),
                other => panic!("{other:?}"),
            },
            // Only root may give a file away.
            Err(e) if std::env::var("GEMMAD_REQUIRE_TEST_DATA").as_deref() != Ok("1") => {
                eprintln!("skipped the ownership case: chown: {e} (not root)")
            }
            Err(e) => panic!("chown needs root ({e}); GEMMAD_REQUIRE_TEST_DATA=1"),
        }
        let open = tmp.path().join("open");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        match dir.open_existing("open").unwrap() {
            Existing::Untrusted(r) => assert!(r.contains("writable"), "{r}"),
            other => panic!("{other:?}"),
        }
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        match dir.open_existing("sub").unwrap() {
            Existing::Untrusted(r) => assert!(r.contains("regular"), "{r}"),
            other => panic!("{other:?}"),
        }
        // The writer replaces an untrusted file with its own.
        write(&dir, "theirs", b"mine");
        assert!(matches!(
            dir.open_existing("theirs").unwrap(),
            Existing::File(_)
        ));
    }

    #[test]
    fn temp_names_parse() {
        assert_eq!(temp_pid(".a.tmp-12-0123456789abcdef"), Some(12));
        assert_eq!(temp_pid("a.tmp-12"), Some(12));
        assert_eq!(temp_pid(".a.tmp-12-short"), None);
        assert_eq!(temp_pid("a.tmp-12-0123456789abcdef"), None);
        assert_eq!(temp_pid(".tmp-12"), None);
        assert_eq!(temp_pid(".a.tmp-x-0123456789abcdef"), None);
        assert!(!process_alive(0));
        assert!(process_alive(std::process::id()));
    }
}
