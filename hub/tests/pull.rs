//! `gemmad_hub::pull` against a fake Hub on real sockets (tests/support/fake_hub.rs),
//! serving the bundled tiny checkpoint: the happy path, resume, integrity, the token
//! rules, gated and missing repos, offline mode and re-pulls.

mod support {
    pub mod fake_hub;
}

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gemmad_hub::{pull, Error, Event, PullOptions, Pulled};
use support::fake_hub::{commit_of, fixture_files, FakeHub, Faults, HubFile};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/text");
const REPO: &str = "org/tiny";
const TOKEN: &str = "hf_test_token";

/// The files gemmad takes from the fixture repo.
const WANTED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn hub() -> FakeHub {
    FakeHub::start(REPO, &commit_of(1), fixture_files(Path::new(FIXTURE)))
}

fn opts(h: &FakeHub, store: &Path) -> PullOptions {
    PullOptions {
        repo: REPO.into(),
        revision: "main".into(),
        store: store.to_path_buf(),
        endpoint: h.url.clone(),
        token: Some(TOKEN.into()),
        offline: false,
        retries: 3,
        retry_delay: Duration::from_millis(10),
    }
}

fn run(o: &PullOptions) -> (Result<Pulled, Error>, Vec<String>) {
    let mut events = Vec::new();
    let r = pull(o, &mut |e: &Event<'_>| {
        events.push(format!("{e:?}"));
        ControlFlow::Continue(())
    });
    (r, events)
}

fn assert_installed_as_fixture(dir: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = WANTED.iter().map(|s| s.to_string()).collect();
    want.push(gemmad_hub::MANIFEST.into());
    want.sort();
    assert_eq!(names, want, "exactly the needed files and the manifest");
    for f in WANTED {
        let got = std::fs::read(dir.join(f)).unwrap();
        let orig = std::fs::read(Path::new(FIXTURE).join(f)).unwrap();
        assert!(got == orig, "{f} differs from the fixture");
    }
}

fn no_partials(store: &Path) {
    let partial = store.join(".partial");
    let left: Vec<PathBuf> = std::fs::read_dir(&partial)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|p| p.extension().is_some_and(|e| e == "lock")),
        "left in .partial: {left:?}"
    );
}

#[test]
fn happy_path_installs_the_needed_files_and_keeps_the_token_off_the_cdn() {
    let h = hub();
    h.set_faults(Faults {
        gated_token: Some(TOKEN.into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let (r, events) = run(&opts(&h, store.path()));
    let p = r.expect("pull");
    assert_eq!(p.dir, store.path().join("org/tiny"));
    assert!(!p.already_installed);
    assert_installed_as_fixture(&p.dir);
    no_partials(store.path());

    let m = gemmad_hub::install::read_manifest(&p.dir).unwrap();
    assert_eq!(m.commit, commit_of(1));
    assert_eq!(m.repo, REPO);
    let st = m
        .files
        .iter()
        .find(|f| f.name == "model.safetensors")
        .unwrap();
    assert_eq!(
        st.sha256,
        support::fake_hub::sha256_hex(
            &std::fs::read(Path::new(FIXTURE).join("model.safetensors")).unwrap()
        )
    );
    let total: u64 = m.files.iter().map(|f| f.size).sum();
    assert_eq!(p.downloaded, total);
    assert!(events.iter().any(|e| e.starts_with("Resolved")));
    assert!(events
        .iter()
        .any(|e| e.contains("FileDone") && e.contains("model.safetensors")));

    let log = h.log();
    assert!(
        h.leaks().is_empty(),
        "token sent to the CDN: {:?}",
        h.leaks()
    );
    let cdn: Vec<_> = log.iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(
        cdn.len(),
        1,
        "model.safetensors fetched from the CDN once: {log:?}"
    );
    for l in log.iter().filter(|l| l.origin == "hub") {
        assert_eq!(
            l.authorization.as_deref(),
            Some("Bearer hf_test_token"),
            "{l:?}"
        );
    }
    // Files by commit, never by branch; identity encoding; nothing unwanted fetched.
    for l in log.iter().filter(|l| l.path.contains("/resolve/")) {
        assert!(l.path.contains(&commit_of(1)), "{l:?}");
    }
    assert!(log
        .iter()
        .all(|l| l.accept_encoding.as_deref() == Some("identity")));
    assert!(!log
        .iter()
        .any(|l| l.path.contains("README") || l.path.contains("onnx")));
}

#[test]
fn a_dropped_connection_resumes_with_range() {
    let h = hub();
    h.set_faults(Faults {
        drop_once: Some("model.safetensors".into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let (r, events) = run(&opts(&h, store.path()));
    let p = r.expect("pull after a drop");
    assert_installed_as_fixture(&p.dir);
    let cdn: Vec<_> = h.log().into_iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[0].range, None);
    let from: u64 = cdn[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("second request resumes with a Range: {:?}", cdn[1]));
    assert!(from > 0, "resumed from byte {from}");
    assert_eq!(cdn[1].status, 206);
    assert!(events.iter().any(|e| e.starts_with("Retrying")));
}

#[test]
fn a_range_answered_with_200_restarts_from_zero() {
    let h = hub();
    h.set_faults(Faults {
        drop_once: Some("model.safetensors".into()),
        ignore_range: true,
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let p = run(&opts(&h, store.path())).0.expect("pull");
    assert_installed_as_fixture(&p.dir);
    let cdn: Vec<_> = h.log().into_iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert!(cdn[1].range.is_some() && cdn[1].status == 200, "{cdn:?}");
}

#[test]
fn a_part_left_by_an_earlier_run_is_resumed() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let work = store.path().join(".partial/org--tiny").join(commit_of(1));
    std::fs::create_dir_all(&work).unwrap();
    let orig = std::fs::read(Path::new(FIXTURE).join("model.safetensors")).unwrap();
    std::fs::write(work.join("model.safetensors.part"), &orig[..1000]).unwrap();
    let p = run(&opts(&h, store.path())).0.expect("pull");
    assert_installed_as_fixture(&p.dir);
    let cdn: Vec<_> = h.log().into_iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(cdn.len(), 1);
    assert_eq!(cdn[0].range.as_deref(), Some("bytes=1000-"));
    assert_eq!(
        p.downloaded as usize,
        p.manifest
            .files
            .iter()
            .map(|f| f.size as usize)
            .sum::<usize>()
            - 1000
    );
}

#[test]
fn a_wrong_checksum_fails_and_installs_nothing() {
    let h = hub();
    h.set_faults(Faults {
        corrupt: Some("model.safetensors".into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let e = run(&opts(&h, store.path()))
        .0
        .expect_err("corrupt download");
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    assert!(
        e.to_string().contains("model.safetensors: sha256 mismatch"),
        "{e}"
    );
    assert!(!store.path().join("org/tiny").exists());
    let part = store
        .path()
        .join(".partial/org--tiny")
        .join(commit_of(1))
        .join("model.safetensors.part");
    assert!(!part.exists(), "the bad part is deleted");
}

#[test]
fn a_corrupt_git_file_fails_its_blob_id() {
    let h = hub();
    h.set_faults(Faults {
        corrupt: Some("tokenizer.json".into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let e = run(&opts(&h, store.path()))
        .0
        .expect_err("corrupt download");
    assert!(
        e.to_string()
            .contains("tokenizer.json: git blob sha1 mismatch"),
        "{e}"
    );
    assert!(!store.path().join("org/tiny").exists());
}

#[test]
fn gated_repo_without_or_with_a_bad_token_explains_the_licence_step() {
    let h = hub();
    h.set_faults(Faults {
        gated_token: Some("hf_other".into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let mut o = opts(&h, store.path());
    o.token = None;
    let e = run(&o).0.expect_err("401");
    let m = e.to_string();
    assert!(matches!(e, Error::Gated { status: 401, .. }), "{m}");
    for want in [
        "gated",
        "https://huggingface.co/org/tiny",
        "accept the Gemma licence",
        "HF_TOKEN",
        "No token was found",
        "Please log in",
    ] {
        assert!(m.contains(want), "{want:?} in {m}");
    }
    let e = run(&opts(&h, store.path())).0.expect_err("403");
    let m = e.to_string();
    assert!(matches!(e, Error::Gated { status: 403, .. }), "{m}");
    assert!(m.contains("A token was sent"), "{m}");
    assert_eq!(h.log().len(), 2, "no retries of a 401/403");
    assert!(!store.path().join("org/tiny").exists());
}

#[test]
fn missing_repo_and_revision_are_not_found() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let mut o = opts(&h, store.path());
    o.repo = "org/missing".into();
    let e = run(&o).0.expect_err("404");
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("repo org/missing"), "{e}");
    let mut o = opts(&h, store.path());
    o.revision = "no-such-branch".into();
    let e = run(&o).0.expect_err("404");
    assert!(
        e.to_string()
            .contains("revision \"no-such-branch\" of org/tiny"),
        "{e}"
    );
    let mut o = opts(&h, store.path());
    o.repo = "../etc".into();
    assert!(matches!(run(&o).0, Err(Error::BadRepoId(_))));
}

#[test]
fn relative_307_is_followed_with_the_token() {
    let h = hub();
    h.set_faults(Faults {
        gated_token: Some(TOKEN.into()),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let mut o = opts(&h, store.path());
    o.repo = "ORG/tiny".into();
    let p = run(&o).0.expect("pull through the rename redirect");
    assert_installed_as_fixture(&p.dir);
    let log = h.log();
    assert!(log
        .iter()
        .any(|l| l.status == 307 && l.path.starts_with("/ORG/tiny/resolve/")));
    let followed: Vec<_> = log
        .iter()
        .filter(|l| l.origin == "hub" && l.path.starts_with("/org/tiny/resolve/"))
        .collect();
    assert!(!followed.is_empty());
    assert!(followed
        .iter()
        .all(|l| l.authorization.is_some() && l.status != 401));
    assert!(h.leaks().is_empty());
}

#[test]
fn server_errors_are_retried() {
    let h = hub();
    h.set_faults(Faults {
        fail_api_once: Some(503),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    run(&opts(&h, store.path())).0.expect("pull after a 503");
    let api: Vec<_> = h
        .log()
        .into_iter()
        .filter(|l| l.path.starts_with("/api/"))
        .collect();
    assert_eq!(
        api.iter().map(|l| l.status).collect::<Vec<_>>(),
        vec![503, 200]
    );
}

#[test]
fn an_answer_without_the_commit_header_is_not_a_hub() {
    let h = hub();
    h.set_faults(Faults {
        no_commit_header: true,
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let e = run(&opts(&h, store.path()))
        .0
        .expect_err("no X-Repo-Commit");
    assert!(e.to_string().contains("X-Repo-Commit"), "{e}");
}

#[test]
fn offline_touches_no_network() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let mut o = opts(&h, store.path());
    o.offline = true;
    let e = run(&o).0.expect_err("offline, not installed");
    assert!(matches!(e, Error::Offline { .. }), "{e}");
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    assert!(h.log().is_empty());
    run(&opts(&h, store.path())).0.expect("online pull");
    h.clear_log();
    let p = run(&o).0.expect("offline, installed");
    assert!(p.already_installed);
    assert!(h.log().is_empty(), "{:?}", h.log());
}

#[test]
fn a_second_pull_is_a_no_op_and_a_new_commit_replaces_the_install() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let o = opts(&h, store.path());
    run(&o).0.expect("first pull");
    h.clear_log();
    let p = run(&o).0.expect("second pull");
    assert!(p.already_installed);
    assert_eq!(p.downloaded, 0);
    assert!(
        h.log().iter().all(|l| l.path.starts_with("/api/")),
        "{:?}",
        h.log()
    );

    // The repo moves on: a new commit with a changed config.
    let mut files = fixture_files(Path::new(FIXTURE));
    let cfg = files.iter_mut().find(|f| f.name == "config.json").unwrap();
    cfg.bytes.extend_from_slice(b"\n");
    let new_cfg = cfg.bytes.clone();
    files.push(HubFile {
        name: "chat_template.jinja".into(),
        bytes: b"{{ messages }}".to_vec(),
        lfs: false,
    });
    h.publish(&commit_of(2), files);
    let p = run(&o).0.expect("pull of the new commit");
    assert!(!p.already_installed);
    assert_eq!(p.manifest.commit, commit_of(2));
    assert_eq!(std::fs::read(p.dir.join("config.json")).unwrap(), new_cfg);
    assert!(p.dir.join("chat_template.jinja").is_file());
    assert_eq!(
        gemmad_hub::install::read_manifest(&p.dir).unwrap().commit,
        commit_of(2)
    );
    no_partials(store.path());
    // Nothing but the install under org/.
    let org: Vec<_> = std::fs::read_dir(store.path().join("org"))
        .unwrap()
        .collect();
    assert_eq!(org.len(), 1);
}

#[test]
fn a_folder_not_installed_by_pull_is_not_replaced() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let mine = store.path().join("org/tiny");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let e = run(&opts(&h, store.path())).0.expect_err("refuses");
    assert!(
        e.to_string().contains("not installed by `gemmad pull`"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn cancelling_keeps_the_part_for_the_next_run() {
    let h = hub();
    let store = tempfile::tempdir().unwrap();
    let o = opts(&h, store.path());
    let e = pull(&o, &mut |e: &Event<'_>| match e {
        Event::Bytes { name, .. } if *name == "model.safetensors" => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .expect_err("cancelled");
    assert!(matches!(e, Error::Cancelled(_)), "{e}");
    let part = store
        .path()
        .join(".partial/org--tiny")
        .join(commit_of(1))
        .join("model.safetensors.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0);
    h.clear_log();
    let p = run(&o).0.expect("resumed pull");
    assert_installed_as_fixture(&p.dir);
    let cdn: Vec<_> = h.log().into_iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(cdn[0].range, Some(format!("bytes={kept}-")));
}
