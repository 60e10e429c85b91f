//! MatFormer slices of one loaded checkpoint against transformers: the tiny E4B-like
//! fixture (15 layers, 4 sliding : 1 full, 10 KV-shared, sparse first layers) run as
//! each slice of `slices.csv` must give the logits transformers gives on the checkpoint
//! the MatFormer Lab procedure exports for that slice. Also: switching at runtime, a
//! forced switch in the middle of a generation, refusals, and pages given back.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gemmad_engine::internals::{Checkpoint, LogitsFor, TextModel};
use gemmad_engine::matformer::parse_configs_csv;
use gemmad_engine::*;

const SLICES: [&str; 3] = ["e2b-like", "layer-mix", "skip-one"];

fn slices_csv() -> PathBuf {
    fixture("matformer").join("slices.csv")
}

fn load(quant: QuantType, slice: Option<&str>) -> Engine {
    Engine::load(
        &fixture("matformer"),
        LoadOptions {
            threads: Some(2),
            max_context: Some(128),
            quant,
            matformer_config: Some(slices_csv()),
            slice: slice.map(str::to_string),
            ..Default::default()
        },
    )
    .unwrap()
}

fn golden_key(slice: &str, what: &str) -> String {
    format!("{}_{what}_logits", slice.replace('-', "_"))
}

#[test]
fn every_slice_matches_its_exported_checkpoint_in_f32_and_bf16() {
    let g = goldens("matformer");
    let ids = ids(&g["input_ids"]);
    for quant in [QuantType::F32, QuantType::Bf16] {
        for slice in ["full"].into_iter().chain(SLICES) {
            let mut e = load(quant, Some(slice));
            assert_eq!(e.active_slice(), slice);
            let got = e.logits(&ids).unwrap();
            let want = &g[&golden_key(slice, "prefill")].f32s;
            let d = max_abs_diff(&got, want);
            println!("{quant} {slice}: prefill max |Δlogit| {d:.2e}");
            assert!(d <= 1e-3, "{quant} {slice}: max |Δlogit| {d}");
        }
    }
}

#[test]
fn decode_on_a_slice_matches_the_exported_checkpoint() {
    let g = goldens("matformer");
    let ids = ids(&g["input_ids"]);
    let p = g["decode_prompt_len"].i64s[0] as usize;
    let dir = fixture("matformer");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let m = TextModel::load_quant(&cfg, &ckpt, QuantType::F32).unwrap();
    let specs = parse_configs_csv(&std::fs::read_to_string(slices_csv()).unwrap()).unwrap();
    let v = cfg.text.vocab_size;
    for slice in SLICES {
        let spec = specs.iter().find(|s| s.name == slice).unwrap();
        let plan = m.plan_slice(spec).unwrap();
        let mut state = m.new_cache(64);
        let mut logits = Vec::new();
        m.forward_slice_into(&ids[..p], &mut state, LogitsFor::Last, &mut logits, &plan)
            .unwrap();
        let want = &g[&golden_key(slice, "decode")].f32s;
        let mut worst = 0f32;
        for i in 0..want.len() / v {
            m.forward_slice_into(
                &ids[p + i..p + i + 1],
                &mut state,
                LogitsFor::Last,
                &mut logits,
                &plan,
            )
            .unwrap();
            let d = max_abs_diff(&logits, &want[i * v..(i + 1) * v]);
            worst = worst.max(d);
            assert!(d <= 1e-3, "{slice} decode step {i}: max |Δlogit| {d}");
        }
        println!("f32 {slice}: decode max |Δlogit| {worst:.2e}");
    }
}

/// Q8_0 weights keep the golden top-1 wherever the golden margin is clear (see
/// quant_parity.rs for why unclear positions are not held to it). Fifteen chaotic
/// random layers move Q8_0 logits by up to ~0.66 here, so "clear" is a margin over
/// 0.7 logits.
const CONFIDENT: f32 = 0.7;

#[test]
fn q8_0_slices_keep_the_confident_top1() {
    let g = goldens("matformer");
    let ids = ids(&g["input_ids"]);
    let v = 512;
    let mut confident = 0;
    for slice in ["full"].into_iter().chain(SLICES) {
        let mut e = load(QuantType::Q8_0, Some(slice));
        let got = e.logits(&ids).unwrap();
        let want = &g[&golden_key(slice, "prefill")].f32s;
        let mut clear = 0;
        for i in 0..ids.len() {
            let w = &want[i * v..(i + 1) * v];
            let mut s = w.to_vec();
            s.sort_by(|a, b| b.total_cmp(a));
            if s[0] - s[1] > CONFIDENT {
                clear += 1;
                assert_eq!(
                    argmax(&got[i * v..(i + 1) * v]),
                    argmax(w),
                    "{slice}: q8_0 top-1 differs at position {i} (golden margin {})",
                    s[0] - s[1]
                );
            }
        }
        let agree = (0..ids.len())
            .filter(|&i| argmax(&got[i * v..(i + 1) * v]) == argmax(&want[i * v..(i + 1) * v]))
            .count();
        println!(
            "q8_0 {slice}: max |Δlogit| {:.3}, top-1 agreement {agree}/{}, {clear} confident positions",
            max_abs_diff(&got, want),
            ids.len()
        );
        confident += clear;
        assert!(
            agree * 10 >= ids.len() * 7,
            "{slice}: top-1 agreement {agree}/{}",
            ids.len()
        );
    }
    assert!(
        confident >= 6,
        "only {confident} confident positions in all"
    );
}

#[test]
fn slices_switch_at_runtime_without_reloading() {
    let g = goldens("matformer");
    let ids = ids(&g["input_ids"]);
    let mut e = load(QuantType::Bf16, None);
    assert_eq!(e.active_slice(), "full");
    let listed = e.slices();
    let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["full", "e2b-like", "layer-mix", "skip-one"]);
    assert!(listed[0].active && listed.iter().filter(|s| s.active).count() == 1);
    // The E2B-like slice runs 10 of 15 layers at half width: far fewer parameters.
    assert_eq!(listed[1].layers, 10);
    assert!(listed[1].params < listed[0].params * 2 / 3);
    assert_eq!(listed[3].ffn_widths.len(), 14);
    for slice in ["skip-one", "e2b-like", "full", "layer-mix", "full"] {
        e.control(&Control::SetSlice {
            name: slice.into(),
            force: false,
        })
        .unwrap();
        assert_eq!(e.state().slice, slice);
        let got = e.logits(&ids).unwrap();
        let d = max_abs_diff(&got, &g[&golden_key(slice, "prefill")].f32s);
        assert!(d <= 1e-3, "after switching to {slice}: max |Δlogit| {d}");
    }
    let err = e
        .control(&Control::SetSlice {
            name: "e9b".into(),
            force: false,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("e9b") && err.contains("e2b-like"), "{err}");
}

fn greedy(prompt: &[u32], n: usize, slice: Option<&str>) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Ids(prompt.to_vec()));
    r.sampling.temperature = 0.0;
    r.max_tokens = n;
    r.ignore_eos = true;
    r.slice = slice.map(str::to_string);
    r
}

/// A forced switch mid-generation re-prefills the tokens so far on the new slice and
/// continues; an unforced one waits for the request's end.
#[test]
fn a_forced_switch_mid_generation_reprefills_and_continues() {
    let g = goldens("matformer");
    let prompt = &ids(&g["input_ids"])[..12];
    let mut e = load(QuantType::Bf16, None);
    let mut gen = e.start(&greedy(prompt, 8, None)).unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        match e.step(&mut gen).unwrap() {
            Step::Token { id, .. } => out.push(id),
            Step::Done { .. } => panic!("ended early"),
        }
    }
    let unforced = e.control(&Control::SetSlice {
        name: "skip-one".into(),
        force: false,
    });
    assert!(
        unforced.is_err(),
        "an unforced switch must wait for the request"
    );
    e.control(&Control::SetSlice {
        name: "skip-one".into(),
        force: true,
    })
    .unwrap();
    let output = loop {
        match e.step(&mut gen).unwrap() {
            Step::Token { id, .. } => out.push(id),
            Step::Done { output, .. } => break output,
        }
    };
    assert_eq!(out.len(), 8);
    assert_eq!(output.slice, "skip-one");
    assert_eq!(output.timings.reprefills, 1);
    // What it should have produced: the first 3 tokens from the full model, the rest
    // greedy on the slice from the prompt and those 3 tokens.
    let mut reference = load(QuantType::Bf16, None);
    let full = reference
        .generate(&greedy(prompt, 3, None), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out[..3], full.token_ids[..]);
    let mut history = prompt.to_vec();
    history.extend_from_slice(&out[..3]);
    let rest = reference
        .generate(&greedy(&history, 5, Some("skip-one")), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out[3..], rest.token_ids[..]);
    // The request-level slice ran without changing the engine's own.
    assert_eq!(reference.active_slice(), "full");
    assert_eq!(rest.slice, "skip-one");
}

fn write_csv(dir: &Path, rows: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("slices.csv");
    std::fs::write(
        &p,
        format!(
            "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n{rows}"
        ),
    )
    .unwrap();
    p
}

#[test]
fn slicing_files_that_do_not_fit_are_refused_with_the_reason() {
    let tmp = std::env::temp_dir().join(format!("gemmad-matformer-{}", std::process::id()));
    let widths = |w: &str, n: usize| format!("\"[{}]\"", vec![w; n].join(", "));
    let cases = [
        (
            format!("odd,15,0,-,{},[]\n", widths("100", 15)),
            "not a multiple of 32",
        ),
        (
            format!("wide,15,0,-,{},[]\n", widths("512", 15)),
            "the checkpoint's width",
        ),
        (
            format!("kvsrc,14,0,-,{},[4]\n", widths("128", 14)),
            "KV cache",
        ),
        (
            format!("short,15,0,-,{},[]\n", widths("128", 3)),
            "3 FFN widths for 15 kept layers",
        ),
        (
            format!("full,15,0,-,{},[]\n", widths("128", 15)),
            "may not be named",
        ),
    ];
    for (i, (row, want)) in cases.iter().enumerate() {
        let csv = write_csv(&tmp.join(i.to_string()), row);
        let err = Engine::load(
            &fixture("matformer"),
            LoadOptions {
                threads: Some(1),
                max_context: Some(64),
                matformer_config: Some(csv.clone()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(want) && err.contains(&csv.display().to_string()),
            "{row}: {err}"
        );
    }
    let err = Engine::load(
        &fixture("matformer"),
        LoadOptions {
            threads: Some(1),
            max_context: Some(64),
            slice: Some("e2b-like".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("e2b-like") && err.contains("full"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Resident bytes of this process's mappings of `file` (from /proc/self/smaps).
fn mapped_rss(file: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = file.canonicalize().unwrap().display().to_string();
    let mut in_it = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let header =
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if header {
            in_it = line.ends_with(&name);
        } else if in_it {
            if let Some(v) = line.strip_prefix("Rss:") {
                kb += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    kb * 1024
}

/// Switching down gives the pages of the skipped layers and of the dropped FFN neurons
/// back (the weights are the checkpoint's own bf16 pages here); switching up faults
/// them in again and still gives the golden logits.
#[test]
fn switching_down_gives_pages_back() {
    let g = goldens("matformer");
    let ids = ids(&g["input_ids"]);
    // A private copy: other tests in this process map the fixture too.
    let dir = std::env::temp_dir().join(format!("gemmad-matformer-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("matformer").join(f), dir.join(f)).unwrap();
    }
    let file = dir.join("model.safetensors");
    let mut e = Engine::load(
        &dir,
        LoadOptions {
            threads: Some(2),
            max_context: Some(128),
            matformer_config: Some(slices_csv()),
            ..Default::default()
        },
    )
    .unwrap();
    e.logits(&ids).unwrap();
    let full = mapped_rss(&file);
    e.control(&Control::SetSlice {
        name: "e2b-like".into(),
        force: false,
    })
    .unwrap();
    // The pages go on a background thread.
    let mut small = mapped_rss(&file);
    for _ in 0..300 {
        if small + full / 3 < full {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        small = mapped_rss(&file);
    }
    e.logits(&ids).unwrap();
    let after_run = mapped_rss(&file);
    println!(
        "checkpoint pages mapped: full {full} B, e2b-like {small} B, after a run {after_run} B"
    );
    assert!(full > 0);
    // Skipped layers 5-9 and half of every FFN: well over a tenth of the file's pages.
    assert!(
        small + full / 10 < full,
        "full {full}, after switching down {small}"
    );
    assert!(
        after_run + full / 10 < full,
        "running the slice read pages it does not use"
    );
    e.control(&Control::SetSlice {
        name: "full".into(),
        force: false,
    })
    .unwrap();
    let got = e.logits(&ids).unwrap();
    assert!(max_abs_diff(&got, &g["full_prefill_logits"].f32s) <= 1e-3);
    let regrown = mapped_rss(&file);
    println!("after switching back up and running: {regrown} B");
    assert!(
        regrown > small + full / 10,
        "full {full}, back up {regrown}"
    );
}
