//! gemmactl against a real `gemmad serve` on a temporary socket (the tiny fixture model).
//! gemmad is found next to gemmactl in the target folder; `cargo test --workspace` builds
//! both. Without it these tests skip, unless GEMMAD_REQUIRE_TEST_DATA is set (CI).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const GEMMACTL: &str = env!("CARGO_BIN_EXE_gemmactl");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/text");

fn gemmad() -> Option<PathBuf> {
    let p = Path::new(GEMMACTL).with_file_name("gemmad");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("GEMMAD_REQUIRE_TEST_DATA").is_none(),
        "{} is missing: build it (cargo build -p gemmad)",
        p.display()
    );
    eprintln!("skipped: {} not built", p.display());
    None
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(bin: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gemmad.sock");
        let cfg = dir.path().join("gemmad.toml");
        std::fs::write(&cfg, "[model]\nthreads = 1\n").unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--model", FIXTURE, "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(&socket)
            .env("GEMMAD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "gemmad exited at start"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "gemmad did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(GEMMACTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_streams_the_same_text_as_json_and_as_the_in_process_tool() {
    let Some(bin) = gemmad() else { return };
    let d = Daemon::start(&bin);
    let out = d.ctl(&["generate", "--seed", "1", "--max-tokens", "24", "hi"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let streamed = text(&out.stdout);

    let out = d.ctl(&[
        "generate",
        "--seed",
        "1",
        "--max-tokens",
        "24",
        "--json",
        "hi",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(format!("{}\n", v["text"].as_str().unwrap()), streamed);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        v["token_ids"].as_array().unwrap().len()
    );
    assert_eq!(v["timings"]["active_slice"], "full");

    // The in-process one-shot tool prints the same for the same seed.
    let local = Command::new(&bin)
        .args([
            "generate",
            "--model",
            FIXTURE,
            "--seed",
            "1",
            "--max-tokens",
            "24",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(local.status.success());
    assert_eq!(text(&local.stdout), streamed);
}

#[test]
fn status_health_tokenize_slices_and_errors() {
    let Some(bin) = gemmad() else { return };
    let d = Daemon::start(&bin);
    let out = d.ctl(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"]["vocab_size"], 512);
    assert!(v["memory"]["process_rss"].as_u64().unwrap() > 0);
    assert_eq!(v["queue"]["running"], false);

    let out = d.ctl(&["health"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "SERVING");

    let out = d.ctl(&["tokenize", "--json", "hello world"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert!(!ids.is_empty());
    let out = d.ctl(&["detokenize", &ids.join(",")]);
    assert_eq!(text(&out.stdout).trim_end(), "hello world");

    let out = d.ctl(&["slices"]);
    assert!(text(&out.stdout).contains("full"));

    // Bad input: a clear message and a failure exit status.
    let out = d.ctl(&["generate", "--temperature=-1", "hi"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid request: sampling: temperature"),
        "{}",
        text(&out.stderr)
    );
    let img = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(img.path(), b"\x89PNG\r\n\x1a\n0000").unwrap();
    let out = d.ctl(&[
        "generate",
        "--image",
        img.path().to_str().unwrap(),
        "what is it?",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not available"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_missing_socket_says_how_to_check_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nope.sock");
    let out = Command::new(GEMMACTL)
        .args(["status"])
        .env("GEMMAD_SOCKET", &sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("is gemmad running? try `systemctl status gemmad`"),
        "{err}"
    );
    assert!(err.contains(sock.to_str().unwrap()), "{err}");
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = Command::new(GEMMACTL)
        .arg("--socket")
        .arg(&sock)
        .arg("health")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not accepting connections"),
        "{}",
        text(&out.stderr)
    );
}
