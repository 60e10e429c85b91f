//! MatFormer slices through a real `gemmad serve` (the tiny E4B-like fixture and its
//! slicing file): ListSlices, SetSlice over gRPC and gemmactl, the per-request size,
//! each giving what the engine gives in-process on that slice.

use std::path::{Path, PathBuf};

use gemmad_client::{pb, user_prompt};
use gemmad_e2e::Daemon;

fn fixture() -> PathBuf {
    PathBuf::from(gemmad_e2e::MATFORMER_FIXTURE)
}

fn start() -> Daemon {
    let csv = fixture().join("slices.csv");
    Daemon::builder()
        .model(fixture())
        .config(format!(
            "[model]\nthreads = 1\nmax_context = 4096\nmatformer_config = {:?}\nslice = \"layer-mix\"\n[limits]\nmax_tokens = 3000\n",
            csv.display().to_string()
        ))
        .log_level("info")
        .start()
        .expect("starting gemmad")
}

fn seeded(prompt: &str, size: &str) -> pb::GenerateRequest {
    let mut r = user_prompt(prompt);
    r.sampling = Some(pb::Sampling {
        seed: Some(3),
        ..Default::default()
    });
    r.max_tokens = 16;
    r.ignore_eos = true;
    r.size = size.into();
    r
}

/// The engine in-process on `slice`, same request.
fn in_process(prompt: &str, slice: &str) -> Vec<u32> {
    let mut e = gemmad_engine::Engine::load(
        &fixture(),
        gemmad_engine::LoadOptions {
            threads: Some(1),
            max_context: Some(4096),
            matformer_config: Some(fixture().join("slices.csv")),
            slice: Some(slice.into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut req = gemmad_engine::GenerateRequest::new(gemmad_engine::Prompt::Chat(vec![
        gemmad_engine::ChatMessage::text("user", prompt),
    ]));
    req.sampling.seed = Some(3);
    req.max_tokens = 16;
    req.ignore_eos = true;
    e.generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .token_ids
}

#[tokio::test]
async fn slices_are_listed_switched_and_chosen_per_request() {
    let d = start();
    let mut c = d.client().await.unwrap();
    let slices = c.list_slices().await.unwrap();
    let names: Vec<&str> = slices.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["full", "e2b-like", "layer-mix", "skip-one"]);
    let active: Vec<&str> = slices
        .iter()
        .filter(|s| s.active)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(active, ["layer-mix"], "model.slice sets the slice at start");
    assert_eq!(slices[1].layers, 10);
    assert!(slices[1].params < slices[0].params);

    // The configured slice runs by default; a request may name another.
    for (size, runs) in [
        ("", "layer-mix"),
        ("auto", "layer-mix"),
        ("skip-one", "skip-one"),
    ] {
        let got = c.generate_text(seeded("hi", size)).await.unwrap();
        assert_eq!(got.started.unwrap().active_slice, runs);
        assert_eq!(got.finished.unwrap().timings.unwrap().active_slice, runs);
        assert_eq!(got.token_ids, in_process("hi", runs), "size {size:?}");
    }
    // A request's own size does not change the default.
    let st = c.status().await.unwrap();
    assert_eq!(st.active_slice, "layer-mix");

    let s = c.set_slice("e2b-like", false).await.unwrap();
    assert_eq!(
        (s.name.as_str(), s.active, s.layers),
        ("e2b-like", true, 10)
    );
    let got = c.generate_text(seeded("hi", "")).await.unwrap();
    assert_eq!(got.token_ids, in_process("hi", "e2b-like"));
    assert_eq!(c.status().await.unwrap().active_slice, "e2b-like");

    let err = c.set_slice("e9b", false).await.unwrap_err().to_string();
    assert!(err.contains("e9b") && err.contains("skip-one"), "{err}");
    let err = c
        .generate_text(seeded("hi", "e9b"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("e9b") && err.contains("layer-mix"), "{err}");

    // gemmactl's view of the same.
    let out = d
        .gemmactl()
        .unwrap()
        .args(["set-slice", "full"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("active slice: full"));
    let out = d.gemmactl().unwrap().args(["slices"]).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with('*') && l.contains("full")),
        "{listing}"
    );
    // The daemon kept serving through all of it.
    let got = c.generate_text(seeded("hi", "")).await.unwrap();
    assert_eq!(got.token_ids, in_process("hi", "full"));

    // A reload that changes model.slice switches (the rest of [model] waits for a restart).
    let cfg = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        cfg.replace("slice = \"layer-mix\"", "slice = \"skip-one\""),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    let t0 = std::time::Instant::now();
    while c.status().await.unwrap().active_slice != "skip-one" {
        assert!(t0.elapsed() < gemmad_e2e::HANG, "{}", d.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !d.log().contains("take effect at the next start"),
        "{}",
        d.log()
    );
}

/// A forced switch while a long generation streams: the stream goes on (re-prefilled on
/// the new slice) and reports the new slice at its end.
#[tokio::test]
async fn a_forced_switch_applies_to_the_running_generation() {
    let d = start();
    let mut c = d.client().await.unwrap();
    let mut req = seeded("Tell me a story.", "");
    req.max_tokens = 3000;
    let mut stream = c.generate(req).await.unwrap();
    let mut ctl = d.client().await.unwrap();
    let mut tokens = 0;
    let mut switched = false;
    let mut finished = None;
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event {
            Some(pb::generate_response::Event::Delta(dl)) => {
                tokens += dl.token_ids.len();
                if tokens >= 4 && !switched {
                    let s = ctl.set_slice("e2b-like", true).await.unwrap();
                    assert_eq!(s.name, "e2b-like");
                    switched = true;
                }
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let f = finished.expect("the stream finished");
    assert!(switched);
    assert_eq!(f.usage.unwrap().completion_tokens, 3000);
    assert_eq!(f.timings.unwrap().active_slice, "e2b-like");
    assert!(
        d.log().contains("re-prefilled on the new slice"),
        "{}",
        d.log()
    );
}

/// The f32 data of a .npy file as `gemmad logits` writes it (C order, little-endian).
fn npy_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let header = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `gemmad logits --slice` on the big checkpoint and `gemmad logits` on what
/// `gemmad export-slice` wrote for that slice give the same logits as the engine
/// in-process (which the engine's tests hold to transformers' goldens).
#[test]
fn the_command_line_tools_run_and_export_slices() {
    let gemmad = gemmad_e2e::gemmad().expect("the gemmad binary");
    let tmp = tempfile::tempdir().unwrap();
    let csv = fixture().join("slices.csv");
    let ids = [2u32, 105, 2364 % 512, 107, 490, 17, 33, 250, 106, 9];
    let ids_arg: Vec<String> = ids.iter().map(u32::to_string).collect();
    let ids_arg = ids_arg.join(",");
    let mut e = gemmad_engine::Engine::load(
        &fixture(),
        gemmad_engine::LoadOptions {
            threads: Some(1),
            matformer_config: Some(csv.clone()),
            slice: Some("skip-one".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let want = e.logits(&ids).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&gemmad)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let big = tmp.path().join("big.npy");
    run(&[
        "logits",
        "--model",
        fixture().to_str().unwrap(),
        "--matformer-config",
        csv.to_str().unwrap(),
        "--slice",
        "skip-one",
        "--ids",
        &ids_arg,
        "--out",
        big.to_str().unwrap(),
    ]);
    assert_eq!(npy_f32(&big), want);
    let out_dir = tmp.path().join("skip-one");
    let said = run(&[
        "export-slice",
        "--model",
        fixture().to_str().unwrap(),
        "--matformer-config",
        csv.to_str().unwrap(),
        "--slice",
        "skip-one",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(said.contains("14 layers"), "{said}");
    let small = tmp.path().join("small.npy");
    run(&[
        "logits",
        "--model",
        out_dir.to_str().unwrap(),
        "--ids",
        &ids_arg,
        "--out",
        small.to_str().unwrap(),
    ]);
    assert_eq!(npy_f32(&small), want);
}
