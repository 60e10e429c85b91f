//! Numerical parity of the text decoder with transformers on the committed tiny fixtures
//! (goldens made by tools/make_fixtures.py).

mod common;

use common::*;
use gemmad_engine::internals::{LogitsFor, TextModel};

const TOL: f32 = 1e-3;

#[test]
fn prefill_logits_match_every_position() {
    let g = goldens("text");
    let (_, model) = TextModel::load_dir(&fixture("text")).unwrap();
    let ids = ids(&g["input_ids"]);
    let mut cache = model.new_cache(64);
    let logits = model.forward(&ids, &mut cache, LogitsFor::All).unwrap();
    let want = &g["prefill_logits"].f32s;
    let d = max_abs_diff(&logits, want);
    println!("prefill max |dlogit| = {d:e}");
    assert!(d <= TOL, "prefill max |dlogit| {d}");
}

#[test]
fn decode_steps_match() {
    let g = goldens("text");
    let (cfg, model) = TextModel::load_dir(&fixture("text")).unwrap();
    let ids = ids(&g["input_ids"]);
    let p = g["decode_prompt_len"].i64s[0] as usize;
    let want = &g["decode_logits"];
    let k = want.shape[0];
    let v = cfg.text.vocab_size;
    let mut cache = model.new_cache(64);
    let _ = model
        .forward(&ids[..p], &mut cache, LogitsFor::Last)
        .unwrap();
    let mut worst = 0.0f32;
    for i in 0..k {
        let l = model
            .forward(&ids[p + i..p + i + 1], &mut cache, LogitsFor::Last)
            .unwrap();
        let d = max_abs_diff(&l, &want.f32s[i * v..(i + 1) * v]);
        worst = worst.max(d);
        assert!(d <= TOL, "decode step {i}: max |dlogit| {d}");
    }
    println!("decode max |dlogit| over {k} steps = {worst:e}");
}

#[test]
fn token_by_token_equals_prefill_across_windows() {
    // Every position fed alone (crossing the sliding window several times and the KV-shared
    // layers) must reproduce the one-shot prefill.
    let g = goldens("text");
    let (cfg, model) = TextModel::load_dir(&fixture("text")).unwrap();
    let ids = ids(&g["input_ids"]);
    let v = cfg.text.vocab_size;
    let mut cache = model.new_cache(64);
    for (i, id) in ids.iter().enumerate() {
        let l = model.forward(&[*id], &mut cache, LogitsFor::Last).unwrap();
        let d = max_abs_diff(&l, &g["prefill_logits"].f32s[i * v..(i + 1) * v]);
        assert!(d <= TOL, "position {i}: {d}");
    }
}

#[test]
fn greedy_continuation_is_identical() {
    let g = goldens("text");
    let (_, model) = TextModel::load_dir(&fixture("text")).unwrap();
    let prompt = ids(&g["greedy_prompt"]);
    let want = ids(&g["greedy_output"]);
    let mut cache = model.new_cache(64);
    let mut logits = model.forward(&prompt, &mut cache, LogitsFor::Last).unwrap();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let next = argmax(&logits) as u32;
        got.push(next);
        logits = model.forward(&[next], &mut cache, LogitsFor::Last).unwrap();
    }
    assert_eq!(got, want);
}

#[test]
fn multimodal_layout_loads_text_decoder() {
    // The full checkpoint (model.language_model.*, nested text_config, towers present but
    // not loaded) gives the same logits on text ids below vocab_size_per_layer_input.
    let g = goldens("full");
    let (cfg, model) = TextModel::load_dir(&fixture("full")).unwrap();
    assert_eq!(cfg.layout, gemmad_engine::Layout::Multimodal);
    let ids = ids(&g["text_plain_input_ids"]);
    let mut cache = model.new_cache(64);
    let logits = model.forward(&ids, &mut cache, LogitsFor::All).unwrap();
    let d = max_abs_diff(&logits, &g["text_plain_logits"].f32s);
    assert!(d <= TOL, "full layout max |dlogit| {d}");
}
