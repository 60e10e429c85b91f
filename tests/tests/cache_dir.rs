//! `gemmad serve` with a cache directory it cannot write: a read-only and a full tmpfs
//! (mounted here, so these tests need root; without it they skip, and fail under
//! GEMMAD_REQUIRE_TEST_DATA=1). The daemon must start, answer exactly as a daemon without
//! a cache directory, say why in Status and in its log, and leave no temporary file.
//! Valid files in a read-only directory are still used.

use std::path::{Path, PathBuf};
use std::process::Command;

use gemmad_client::{pb, user_prompt, Client};
use gemmad_e2e::Daemon;

/// A tmpfs mounted on a fresh temporary folder, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` (`mount -o`); `Err` says why it could not.
    fn mount(options: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("gemmad-e2e-cache.")
            .tempdir()
            .map_err(|e| format!("temporary folder: {e}"))?;
        mount(&["-t", "tmpfs", "-o", options, "gemmad-e2e"], dir.path())?;
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        mount(&["-o", &format!("remount,{options}")], self.path()).expect("remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(self.dir.path()).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}", self.dir.path().display());
        }
    }
}

fn mount(args: &[&str], on: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(on)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount {args:?} {} failed: {}",
            on.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The tmpfs, or `None` after [`gemmad_e2e::skip`] when mounting is not possible here.
fn tmpfs(options: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(options) {
        Ok(t) => Some(t),
        Err(why) => {
            gemmad_e2e::skip(&format!("needs a tmpfs mount (root): {why}"));
            None
        }
    }
}

fn start(cache_dir: Option<&Path>) -> Daemon {
    let cache = cache_dir.map_or(String::new(), |d| {
        format!("cache_dir = \"{}\"\n", d.display())
    });
    Daemon::start(&format!("[model]\nthreads = 1\n{cache}")).expect("starting gemmad")
}

/// Greedy output of a fixed prompt.
async fn greedy(c: &mut Client) -> (String, Vec<u32>) {
    let mut r = user_prompt("Write a poem about the sea.");
    r.sampling = Some(pb::Sampling {
        temperature: Some(0.0),
        ..Default::default()
    });
    r.max_tokens = 24;
    let g = c.generate_text(r).await.expect("generate");
    (g.text, g.token_ids)
}

/// What a daemon without a cache directory answers.
async fn reference() -> (String, Vec<u32>) {
    let mut d = start(None);
    let mut c = d.client().await.unwrap();
    let out = greedy(&mut c).await;
    assert!(c.status().await.unwrap().warnings.is_empty());
    drop(c);
    d.stop().unwrap();
    out
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Starts a daemon on `cache`, which it cannot fully write, and checks that it serves
/// like `want`, warns (`reason` in Status and in the log) and leaves no temporary file.
async fn serves_degraded(cache: &Path, reason: &str, want: &(String, Vec<u32>)) -> Daemon {
    let d = start(Some(cache));
    let mut c = d.client().await.unwrap();
    assert_eq!(
        &greedy(&mut c).await,
        want,
        "same output as without cache_dir"
    );
    let warnings = c.status().await.unwrap().warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(reason) && w.contains(cache.to_str().unwrap())),
        "no warning naming {reason:?} and the folder: {warnings:?}"
    );
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(reason)),
        "log has no warning about {reason:?}:\n{log}"
    );
    let temps: Vec<_> = entries(cache)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    d
}

#[tokio::test]
async fn read_only_cache_dir_serves_from_the_checkpoint_with_a_warning() {
    let Some(fs) = tmpfs("ro,size=1m,mode=0755") else {
        return;
    };
    let want = reference().await;
    let mut d = serves_degraded(fs.path(), "Read-only file system", &want).await;
    assert!(entries(fs.path()).is_empty());
    // gemmactl status shows it too.
    let out = d.gemmactl().unwrap().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("warning") && l.contains("Read-only file system")),
        "{text}"
    );
    d.stop().unwrap();
}

#[tokio::test]
async fn full_cache_dir_serves_from_the_checkpoint_with_a_warning() {
    // 64 KiB: less than the fixture's PLE cache (92 KiB of rows), so its write hits ENOSPC.
    let Some(fs) = tmpfs("size=64k,mode=0755") else {
        return;
    };
    let want = reference().await;
    let mut d = serves_degraded(fs.path(), "No space left on device", &want).await;
    // What is there is complete (the weights store fits); the partial PLE file is gone.
    for p in entries(fs.path()) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("weights-"), "{name}");
    }
    d.stop().unwrap();
}

#[tokio::test]
async fn valid_cache_files_in_a_read_only_dir_are_used() {
    let Some(fs) = tmpfs("size=4m,mode=0755") else {
        return;
    };
    let mut d = start(Some(fs.path()));
    let mut c = d.client().await.unwrap();
    let first = greedy(&mut c).await;
    assert!(c.status().await.unwrap().warnings.is_empty());
    drop(c);
    d.stop().unwrap();
    let built = entries(fs.path());
    assert_eq!(
        built.len(),
        2,
        "the PLE cache and the weights store: {built:?}"
    );

    fs.remount("ro");
    let mut d = start(Some(fs.path()));
    let mut c = d.client().await.unwrap();
    assert_eq!(greedy(&mut c).await, first);
    let s = c.status().await.unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let log = d.log();
    for used in [
        "PLE cache valid",
        "mapping quantized weights from the cache",
    ] {
        assert!(log.contains(used), "{used:?} not in the log:\n{log}");
    }
    drop(c);
    d.stop().unwrap();
}
