//! The cache directory on the committed fixture: what is planted in it is rebuilt, never
//! followed or used, and a directory that cannot be used costs the derived files, not
//! the load. (Read-only and full directories: the daemon's tests/tests/cache_dir.rs.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use gemmad_engine::internals::EngineInternals;
use gemmad_engine::*;

fn opts(cache: Option<&Path>) -> LoadOptions {
    LoadOptions {
        cache_dir: cache.map(Path::to_path_buf),
        threads: Some(2),
        max_context: Some(64),
        ..Default::default()
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn planted_symlinks_are_replaced_by_built_files_and_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("text");
    // Valid derived files of this very checkpoint, elsewhere: what a link could lead to.
    let theirs = tmp.path().join("theirs");
    drop(Engine::load(&model, opts(Some(&theirs))).unwrap());
    let files = names(&theirs);
    let find = |p: &str| files.iter().find(|n| n.starts_with(p)).unwrap().clone();
    let (ple, weights) = (find("ple-"), find("weights-"));
    assert_eq!(files.len(), 2, "{files:?}");
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|n| std::fs::read(theirs.join(n)).unwrap())
        .collect();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::symlink(theirs.join(&ple), cache.join(&ple)).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join(&weights)).unwrap();
    let e = Engine::load(&model, opts(Some(&cache))).unwrap();
    assert!(e.state().warnings.is_empty(), "{:?}", e.state().warnings);
    assert!(e.ple_cache().is_some());
    for n in [&ple, &weights] {
        let md = std::fs::symlink_metadata(cache.join(n)).unwrap();
        assert!(md.file_type().is_file(), "{n}: {md:?}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for (n, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(theirs.join(n)).unwrap(), b, "{n} changed");
    }
    assert_eq!(names(&cache), files, "no temporary files left");
}

#[test]
fn a_cache_dir_others_can_write_is_not_used_and_the_load_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let model = fixture("text");
    let ids = ids(&goldens("text")["input_ids"]);
    let mut plain = Engine::load(&model, opts(None)).unwrap();
    let mut e = Engine::load(&model, opts(Some(&cache))).unwrap();
    let w = e.state().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    for want in [
        cache.to_str().unwrap(),
        "writable by group or others",
        "serving without the PLE cache",
    ] {
        assert!(w[0].contains(want), "{want:?} not in {:?}", w[0]);
    }
    assert!(e.ple_cache().is_none());
    assert_eq!(e.logits(&ids).unwrap(), plain.logits(&ids).unwrap());
    assert!(names(&cache).is_empty(), "{:?}", names(&cache));
    assert!(plain.state().warnings.is_empty());
}
