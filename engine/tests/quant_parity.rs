//! Quantized weights against the transformers goldens on the tiny fixture.
//!
//! The fixture's random weights make a chaotic little model: unscaled q·k over
//! random q/k norms gives peaked attention, and several golden positions have top-1
//! margins of 0.02-0.06 logits, below what any 8-bit rounding of the weights preserves
//! (Q8_0 weight rounding alone moves logits by ~0.1-0.3 here). So Q8_0 must pick the
//! golden top-1 wherever the golden margin exceeds 0.15 logits, and the overall
//! agreement is printed; Q4_0/Q4_K report their deviation.

mod common;

use common::*;
use gemmad_engine::internals::{CacheDir, Checkpoint, LogitsFor, TextModel};
use gemmad_engine::{ModelConfig, QuantType};

/// (max |Δlogit|, top-1 agreements, positions, agreements where the margin > 0.15,
/// positions with margin > 0.15).
fn run(q: QuantType) -> (f32, usize, usize, usize, usize) {
    let dir = fixture("text");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let m = TextModel::load_quant(&cfg, &ckpt, q).unwrap();
    let g = goldens("text");
    let ids = ids(&g["input_ids"]);
    let mut cache = m.new_cache(64);
    let got = m.forward(&ids, &mut cache, LogitsFor::All).unwrap();
    let want = &g["prefill_logits"].f32s;
    let v = cfg.text.vocab_size;
    let same = |i: usize| argmax(&got[i * v..(i + 1) * v]) == argmax(&want[i * v..(i + 1) * v]);
    let margin = |i: usize| {
        let mut s = want[i * v..(i + 1) * v].to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        s[0] - s[1]
    };
    let agree = (0..ids.len()).filter(|&i| same(i)).count();
    let clear: Vec<usize> = (0..ids.len()).filter(|&i| margin(i) > 0.15).collect();
    let clear_agree = clear.iter().filter(|&&i| same(i)).count();
    let d = max_abs_diff(&got, want);
    println!(
        "{q}: max |dlogit| {d:.4}, top-1 agreement {agree}/{}, where margin > 0.15: {clear_agree}/{}",
        ids.len(),
        clear.len()
    );
    (d, agree, ids.len(), clear_agree, clear.len())
}

#[test]
fn f32_storage_is_exact() {
    let (d, agree, n, _, _) = run(QuantType::F32);
    assert!(d <= 1e-3);
    assert_eq!(agree, n);
}

#[test]
fn q8_0_agrees_on_every_clear_top1() {
    let (d, agree, n, clear_agree, clear) = run(QuantType::Q8_0);
    assert!(
        clear >= n / 2,
        "the fixture should have mostly clear positions"
    );
    assert_eq!(clear_agree, clear, "max diff {d}");
    assert!(agree * 10 >= n * 8, "top-1 agreement {agree}/{n}");
    assert!(d > 0.0, "Q8_0 should actually quantize something");
}

#[test]
fn q4_variants_stay_close() {
    for q in [QuantType::Q4_0, QuantType::Q4K] {
        let (d, agree, n, clear_agree, clear) = run(q);
        // 4-bit on this chaotic fixture: report, and require the bulk of clear positions.
        // Chance agreement is 1/512; 4-bit must stay far above it.
        assert!(d.is_finite() && d < 5.0, "{q}: {d}");
        assert!(agree * 8 >= n, "{q}: top-1 {agree}/{n}");
        assert!(
            clear_agree * 4 >= clear,
            "{q}: clear top-1 {clear_agree}/{clear}"
        );
    }
}

#[test]
fn sparse_down_projection_equals_dense() {
    // Layers with Gaussian top-k read only the surviving columns of down_proj (stored
    // transposed). Dropping the transposed copy forces the dense product.
    let dir = fixture("text");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let g = goldens("text");
    let ids = ids(&g["input_ids"]);
    for (q, tol) in [
        (QuantType::F32, 1e-4f32),
        (QuantType::Bf16, 1e-4),
        (QuantType::Q8_0, 0.5),
    ] {
        let sparse = TextModel::load_quant(&cfg, &ckpt, q).unwrap();
        assert!(sparse.layers[0].mlp.down_proj_t.is_some());
        let mut dense = TextModel::load_quant(&cfg, &ckpt, q).unwrap();
        for l in dense.layers.iter_mut() {
            l.mlp.down_proj_t = None;
        }
        let a = sparse
            .forward(&ids, &mut sparse.new_cache(64), LogitsFor::All)
            .unwrap();
        let b = dense
            .forward(&ids, &mut dense.new_cache(64), LogitsFor::All)
            .unwrap();
        let d = max_abs_diff(&a, &b);
        println!("{q}: sparse vs dense max |dlogit| {d:e}");
        assert!(d <= tol, "{q}: {d}");
    }
}

#[test]
fn quantized_weights_cache_is_reused_and_rebuilt_when_bad() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("text").join(f), model_dir.join(f)).unwrap();
    }
    let cache = tmp.path().join("cache");
    let g = goldens("text");
    let ids = ids(&g["input_ids"]);
    let run = || {
        let cfg = ModelConfig::from_dir(&model_dir).unwrap();
        let ckpt = Checkpoint::open(&model_dir).unwrap();
        let dir = CacheDir::open(&cache).unwrap();
        let (m, warning) =
            TextModel::load_full(&cfg, &ckpt, QuantType::Q4_0, None, Some(&dir)).unwrap();
        assert_eq!(warning, None);
        m.forward(&ids, &mut m.new_cache(64), LogitsFor::All)
            .unwrap()
    };
    let file = || {
        let v: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(v.len(), 1, "{v:?}");
        v[0].clone()
    };
    let first = run();
    let path = file();
    let ino = std::fs::metadata(&path).unwrap().ino();
    assert_eq!(run(), first, "mapped store gives the same logits");
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "reused, not rewritten"
    );

    // A flipped data byte: detected, rebuilt, same logits.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let ino = std::fs::metadata(&path).unwrap().ino();
    assert_eq!(run(), first);
    assert_ne!(
        std::fs::metadata(file()).unwrap().ino(),
        ino,
        "corrupt store rebuilt"
    );

    // Truncated: rebuilt.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file())
        .unwrap();
    f.set_len(5000).unwrap();
    assert_eq!(run(), first);
    assert!(std::fs::metadata(file()).unwrap().len() > 5000);

    // Checkpoint changed (config edited): the key changes, rebuilt.
    let ino = std::fs::metadata(file()).unwrap().ino();
    let cfg_path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, format!("{text}\n")).unwrap();
    assert_eq!(run(), first);
    assert_ne!(
        std::fs::metadata(file()).unwrap().ino(),
        ino,
        "stale store rebuilt"
    );
}
