//! The one-shot subcommands as users run them: `gemmad generate` and `gemmad logits` on
//! the bundled tiny checkpoint, checked against the transformers goldens.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures")
        .join(name)
}

fn gemmad() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemmad"))
}

fn golden(name: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
    let bytes = std::fs::read(fixture("text").join("goldens.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec(), t.dtype())
}

fn golden_ids(name: &str) -> Vec<i64> {
    let (_, d, _) = golden(name);
    d.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_subcommand_writes_npy_matching_goldens() {
    let ids = golden_ids("input_ids");
    let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.npy");
    let st = gemmad()
        .args(["logits", "--model"])
        .arg(fixture("text"))
        .args(["--ids", &ids_arg.join(","), "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let npy = std::fs::read(&out).unwrap();
    assert_eq!(&npy[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0);
    let header = std::str::from_utf8(&npy[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    assert!(
        header.contains(&format!("'shape': ({}, 512)", ids.len())),
        "{header}"
    );
    let got: Vec<f32> = npy[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (_, want, _) = golden("prefill_logits");
    let want: Vec<f32> = want
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got.len(), want.len());
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-3, "{d}");
}

#[test]
fn generate_subcommand_streams_the_engines_output() {
    let run = |seed: &str| {
        let o = gemmad()
            .args(["generate", "--model"])
            .arg(fixture("text"))
            .args([
                "--max-tokens",
                "16",
                "--seed",
                seed,
                "--ignore-eos",
                "--stats",
                "Hello",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(stderr.contains("completion_tokens=16"), "{stderr}");
        o.stdout
    };
    assert_eq!(run("5"), run("5"));
}

#[test]
fn bad_model_and_bad_ids_fail_with_reason() {
    let o = gemmad()
        .args([
            "logits",
            "--model",
            "/nonexistent",
            "--ids",
            "1,2",
            "--out",
            "/tmp/x.npy",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("/nonexistent/config.json"), "{e}");

    let o = gemmad()
        .args(["logits", "--model"])
        .arg(fixture("text"))
        .args(["--ids", "2,99999", "--out", "/tmp/x.npy"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn ple_cache_subcommand_builds_a_cache_that_generate_uses() {
    let dir = tempfile::tempdir().unwrap();
    let o = gemmad()
        .args(["ple-cache", "--model"])
        .arg(fixture("text"))
        .arg("--cache-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // The subcommand's default row type is the one `generate` and the daemon load.
    let default = format!("-{}.gemmaple", gemmad_engine::RowDType::default());
    assert!(files[0].to_string_lossy().ends_with(&default), "{files:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("480 rows"), "{stdout}");
    // generate with that cache dir maps the file instead of rebuilding it.
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&files[0]).unwrap().ino();
    let o = gemmad()
        .args(["generate", "--model"])
        .arg(fixture("text"))
        .args([
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--seed",
            "1",
            "--stats",
            "--cache-dir",
        ])
        .arg(dir.path())
        .arg("Hello")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("completion_tokens=8"));
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().ino(),
        ino,
        "cache reused"
    );
}
