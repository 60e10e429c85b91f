//! `gemmad pull` and `gemmactl pull` end to end, against a fake Hugging Face Hub on
//! local sockets (the hub crate's, hub/tests/support/fake_hub.rs) serving the bundled
//! tiny checkpoint as a gated repo: pull into a store, serve it by repo id, generate
//! through the daemon; pull through the daemon (admins); the gated error through both.

#[path = "../../hub/tests/support/fake_hub.rs"]
mod fake_hub;

use std::path::Path;
use std::process::{Command, Output};

use fake_hub::{commit_of, fixture_files, FakeHub, Faults};
use gemmad_e2e::{Daemon, FIXTURE};

const TOKEN: &str = "hf_e2e_token";

fn gated_hub() -> FakeHub {
    let h = FakeHub::start("org/tiny", &commit_of(7), fixture_files(Path::new(FIXTURE)));
    h.set_faults(Faults {
        gated_token: Some(TOKEN.into()),
        ..Faults::default()
    });
    h
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `gemmad` with only this test's Hub settings (no token file of the machine's).
fn gemmad(hf_home: &Path) -> Command {
    let mut c = Command::new(gemmad_e2e::gemmad().expect("the gemmad binary"));
    c.env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("GEMMAD_MODEL_STORE");
    c
}

fn same_as_fixture(dir: &Path) {
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let got = std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            got == std::fs::read(Path::new(FIXTURE).join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn pull_then_serve_by_repo_id_and_generate() {
    let h = gated_hub();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let hf_home = tmp.path().join("hf");

    // Gated without a token: the licence step, and nothing installed.
    let out = gemmad(&hf_home)
        .args(["pull", "org/tiny", "--store"])
        .arg(&store)
        .env("HF_ENDPOINT", &h.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("accept the Gemma licence"), "{err}");
    assert!(err.contains("HF_TOKEN"), "{err}");
    assert!(!store.join("org/tiny").exists());

    // With the token in the Hub's token file ($HF_HOME/token).
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), format!("{TOKEN}\n")).unwrap();
    let out = gemmad(&hf_home)
        .args(["pull", "org/tiny", "--store"])
        .arg(&store)
        .env("HF_ENDPOINT", &h.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("installed org/tiny at {}", commit_of(7))),
        "{said}"
    );
    assert!(said.contains("gemmad serve --model org/tiny"), "{said}");
    // Not a terminal: plain lines, one per verified file.
    assert!(
        text(&out.stderr).contains("model.safetensors: verified"),
        "{}",
        text(&out.stderr)
    );
    same_as_fixture(&store.join("org/tiny"));
    assert!(
        h.leaks().is_empty(),
        "token sent to the CDN: {:?}",
        h.leaks()
    );

    // A second pull is a no-op.
    h.clear_log();
    let out = gemmad(&hf_home)
        .args(["pull", "org/tiny", "--store"])
        .arg(&store)
        .env("HF_ENDPOINT", &h.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("already installed"));
    assert!(h.log().iter().all(|l| l.path.starts_with("/api/")));

    // The in-process tool resolves the repo id through GEMMAD_MODEL_STORE.
    let out = gemmad(&hf_home)
        .env("GEMMAD_MODEL_STORE", &store)
        .args([
            "generate",
            "--model",
            "org/tiny",
            "--seed",
            "1",
            "--max-tokens",
            "8",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let local = text(&out.stdout);

    // The service, started on the repo id, answers a generation with the same text.
    let d = Daemon::builder()
        .model("org/tiny")
        .config("[model]\nthreads = 1\n")
        .env("GEMMAD_MODEL_STORE", &store)
        .log_level("warn")
        .start()
        .expect("gemmad serve --model org/tiny");
    let out = d
        .gemmactl()
        .unwrap()
        .args(["generate", "--seed", "1", "--max-tokens", "8", "hi"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), local);
    let out = d
        .gemmactl()
        .unwrap()
        .args(["status", "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = st["model"]["dir"].as_str().unwrap_or_default().to_string();
    assert!(dir.ends_with("store/org/tiny"), "{st}");
}

#[test]
fn a_repo_id_not_in_the_store_says_to_pull_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = gemmad(tmp.path())
        .env("GEMMAD_MODEL_STORE", tmp.path())
        .args([
            "serve",
            "--model",
            "org/absent",
            "--dbus",
            "off",
            "--socket",
        ])
        .arg(tmp.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("gemmad pull org/absent"), "{err}");
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
}

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    d.gemmactl().unwrap().args(args).output().unwrap()
}

#[test]
fn gemmactl_pull_through_the_daemon() {
    let h = gated_hub();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("daemon-store");
    let hf_home = tmp.path().join("hf");
    let d = Daemon::builder()
        .config(format!(
            "[model]\nthreads = 1\nstore = \"{}\"\n",
            store.display()
        ))
        .env("HF_ENDPOINT", &h.url)
        .env("HF_HOME", &hf_home)
        .env("HF_TOKEN", TOKEN)
        .log_level("info")
        .start()
        .expect("starting gemmad");
    let out = ctl(&d, &["pull", "org/tiny"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    let said = text(&out.stdout);
    let dir = store.join("org/tiny");
    assert!(
        said.contains(&format!(
            "installed org/tiny at {} in {}",
            commit_of(7),
            dir.display()
        )),
        "{said}"
    );
    assert!(
        text(&out.stderr).contains("model.safetensors: verified"),
        "{}",
        text(&out.stderr)
    );
    same_as_fixture(&dir);
    assert!(h.leaks().is_empty());
    assert!(d.log().contains("pull done"), "{}", d.log());

    // Again: nothing to do.
    let out = ctl(&d, &["pull", "org/tiny"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("already installed"));

    // Errors arrive as statuses with the hub's explanation.
    let out = ctl(&d, &["pull", "org/missing"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("org/missing"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl(&d, &["pull", "not-a-repo"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a Hugging Face repo id"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn gemmactl_pull_of_a_gated_repo_without_a_daemon_token_explains() {
    let h = gated_hub();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(format!(
            "[model]\nthreads = 1\nstore = \"{}\"\n",
            tmp.path().join("store").display()
        ))
        .env("HF_ENDPOINT", &h.url)
        .env("HF_HOME", tmp.path().join("hf"))
        .env("HF_TOKEN", "")
        .log_level("warn")
        .start()
        .expect("starting gemmad");
    let out = ctl(&d, &["pull", "org/tiny"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("accept the Gemma licence"), "{err}");
    assert!(!tmp.path().join("store/org/tiny").exists());
}
