//! gemmactl against a real `gemmad serve` on a temporary socket (the tiny fixture model),
//! started by the shared harness (`gemmad_e2e`, tests/src/lib.rs), which also finds (and,
//! under cargo, builds) both binaries: these tests never skip.

use std::process::{Command, Output};

use gemmad_e2e::{Daemon, FIXTURE};

fn gemmactl() -> std::path::PathBuf {
    gemmad_e2e::gemmactl().expect("the gemmactl binary")
}

fn start() -> Daemon {
    Daemon::builder()
        .config("[model]\nthreads = 1\n")
        .log_level("warn")
        .start()
        .expect("starting gemmad")
}

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    d.gemmactl()
        .expect("the gemmactl binary")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_streams_the_same_text_as_json_and_as_the_in_process_tool() {
    let d = start();
    let out = ctl(&d, &["generate", "--seed", "1", "--max-tokens", "24", "hi"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let streamed = text(&out.stdout);

    let out = ctl(
        &d,
        &[
            "generate",
            "--seed",
            "1",
            "--max-tokens",
            "24",
            "--json",
            "hi",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(format!("{}\n", v["text"].as_str().unwrap()), streamed);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        v["token_ids"].as_array().unwrap().len()
    );
    // The slice that ran is the one `slices` marks active.
    let out = ctl(&d, &["slices", "--json"]);
    let slices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let active = slices
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["active"] == true);
    assert_eq!(
        Some(&v["timings"]["active_slice"]),
        active.map(|s| &s["name"])
    );

    // The in-process one-shot tool prints the same for the same seed.
    let local = Command::new(gemmad_e2e::gemmad().unwrap())
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
    let d = start();
    let out = ctl(&d, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = &st;
    assert_eq!(v["model"]["vocab_size"], 512);
    assert!(v["memory"]["process_rss"].as_u64().unwrap() > 0);
    assert_eq!(v["queue"]["running"], false);

    let out = ctl(&d, &["health"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "SERVING");

    let out = ctl(&d, &["tokenize", "--json", "hello world"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert!(!ids.is_empty());
    let out = ctl(&d, &["detokenize", &ids.join(",")]);
    assert_eq!(text(&out.stdout).trim_end(), "hello world");

    // The slice that ran is the one `slices` marks active.
    let out = ctl(&d, &["slices", "--json"]);
    let slices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let active: Vec<_> = slices
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["active"] == true)
        .collect();
    assert_eq!(active.len(), 1, "{slices}");
    assert_eq!(st["active_slice"], active[0]["name"]);
    assert!(active[0]["params"].as_u64().unwrap() > 0, "{slices}");

    // Bad input: a clear message and a failure exit status.
    let out = ctl(&d, &["generate", "--temperature=-1", "hi"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid request: sampling: temperature"),
        "{}",
        text(&out.stderr)
    );
    let img = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(img.path(), b"\x89PNG\r\n\x1a\n0000").unwrap();
    let out = ctl(
        &d,
        &[
            "generate",
            "--image",
            img.path().to_str().unwrap(),
            "what is it?",
        ],
    );
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
    let out = Command::new(gemmactl())
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
    let out = Command::new(gemmactl())
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

/// An admin loads and unloads a tower with gemmactl; Status shows it with its bytes.
#[test]
fn load_and_unload_a_tower_show_in_status() {
    let d = Daemon::builder()
        .model(std::path::Path::new(FIXTURE).with_file_name("full"))
        .config("[model]\nthreads = 1\n")
        .log_level("warn")
        .start()
        .expect("starting gemmad");
    let vision = |d: &Daemon| {
        let out = ctl(d, &["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["towers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["modality"] == "vision")
            .cloned()
            .unwrap()
    };
    let t = vision(&d);
    assert_eq!(
        (t["available"].as_bool(), t["loaded"].as_bool()),
        (Some(true), Some(false)),
        "{t}"
    );
    assert_eq!(t["bytes"], 0, "{t}");

    let out = ctl(&d, &["load", "vision", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let loaded: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(loaded["loaded"], true, "{loaded}");
    let t = vision(&d);
    assert_eq!(t["loaded"], true, "{t}");
    assert!(t["bytes"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["bytes"], loaded["bytes"]);
    let out = ctl(&d, &["status"]);
    assert!(
        text(&out.stdout).contains("tower    vision loaded ("),
        "{}",
        text(&out.stdout)
    );

    let out = ctl(&d, &["unload", "vision"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("vision not loaded"),
        "{}",
        text(&out.stdout)
    );
    let t = vision(&d);
    assert_eq!(
        (t["loaded"].as_bool(), t["bytes"].as_u64()),
        (Some(false), Some(0)),
        "{t}"
    );

    // A modality gemmactl does not know: a usage error before anything is sent.
    let out = ctl(&d, &["load", "smell"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown modality"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn chat_answers_its_commands_and_ends_at_end_of_input() {
    let d = start();
    let mut child = d
        .gemmactl()
        .expect("the gemmactl binary")
        .args(["chat", "--seed", "1", "--max-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // No /quit: the end of input (Ctrl-D) ends the chat.
        stdin.write_all(b"/help\n/bogus\nhello\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("/reset   forget the conversation"), "{err}");
    assert!(err.contains("unknown command /bogus"), "{err}");
    // One answer (for "hello"): the commands were not sent to the model.
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn shutdown_stops_the_daemon_and_removes_its_socket() {
    let mut d = start();
    let out = ctl(&d, &["shutdown"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exit = d.wait_exit().await.unwrap();
    assert!(exit.success(), "{exit:?}; log:\n{}", d.log());
    assert!(!d.socket().exists(), "socket left behind");
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definitions() {
    let bin = gemmactl();
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["cache-prompt", "set-slice", "max-tokens"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&bin)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("gemmactl-generate.1")).unwrap();
    assert!(page.contains(".TH gemmactl-generate 1"), "{page}");
    assert!(page.contains("RNG seed"), "{page}");
    let gemmad = gemmad_e2e::gemmad().unwrap();
    let out = Command::new(&gemmad)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("export-slice"));
    let out = Command::new(&gemmad)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("gemmad-serve.1")).unwrap();
    assert!(
        page.contains("/run/gemmad/gemmad.sock"),
        "serve's defaults: {page}"
    );
}
