//! `slice_export`: writing a MatFormer slice of the tiny fixtures as a checkpoint of its
//! own. The whole model must come out byte for byte; a hand-written slice must keep the
//! first neurons, the kept layers and their per-layer-input blocks, rewrite the config,
//! and load in the engine; bad slices and destinations must be refused with the reason.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::fixture;
use gemmad_engine::matformer::{parse_configs_csv, SliceSpec};
use gemmad_engine::slice_export::{export_slice, find_slice, ExportOptions, ExportReport};
use gemmad_engine::{Engine, LoadOptions};
use serde_json::Value;

/// A tensor of a safetensors file: dtype, shape and bytes.
#[derive(Debug, PartialEq)]
struct Tensor {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Every tensor of a checkpoint folder (one file or shards), by name.
fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        if p.file_name().unwrap() == "goldens.safetensors" {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in st.tensors() {
            let t = Tensor {
                dtype: format!("{:?}", v.dtype()),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            assert!(out.insert(name.clone(), t).is_none(), "{name} twice");
        }
    }
    out
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn export(model: &Path, spec: &SliceSpec, out: &Path) -> ExportReport {
    export_slice(model, spec, out, &ExportOptions::default())
        .unwrap_or_else(|e| panic!("export {}: {e}", spec.name))
}

fn full(model: &Path) -> SliceSpec {
    find_slice(model, None, "full").unwrap()
}

const CSV_HEAD: &str =
    "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n";

/// Writes a slicing file with one row per `(name, widths, skipped)` and returns its path.
fn slicing_file(dir: &Path, rows: &[(&str, &str, &str)]) -> PathBuf {
    let mut csv = CSV_HEAD.to_string();
    for (name, ffn, skip) in rows {
        csv.push_str(&format!("{name},0,0.0,0%,\"{ffn}\",\"{skip}\"\n"));
    }
    let p = dir.join("configs.csv");
    std::fs::write(&p, csv).unwrap();
    p
}

/// The text fixture (6 layers: S S F S S F, widths 128 128 192 192 256 256, the last
/// two KV-shared, reading layers 3 and 2) with layers 1 and 5 skipped: kept 0 2 3 4.
const SMALL: (&str, &str, &str) = ("small", "[1_6 * 4, 5 * 32, 96, 7 * 32]", "[1, 5]");
const SMALL_KEPT: [usize; 4] = [0, 2, 3, 4];
const SMALL_FFN: [usize; 4] = [64, 160, 96, 224];

fn bf16_rows(t: &Tensor) -> Vec<&[u8]> {
    let cols = t.shape[1];
    t.data.chunks_exact(cols * 2).collect()
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

#[test]
fn the_full_slice_is_a_byte_identical_copy() {
    for name in ["text", "full"] {
        let src = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let r = export(&src, &full(&src), &out);
        let (a, b) = (tensors(&src), tensors(&out));
        assert_eq!(a.len(), b.len(), "{name}");
        for (k, t) in &a {
            assert_eq!(Some(t), b.get(k), "{name}: {k}");
        }
        assert_eq!(config(&out), config(&src), "{name}");
        assert_eq!(r.tensors, a.len());
        assert_eq!(
            r.bytes,
            a.values().map(|t| t.data.len() as u64).sum::<u64>()
        );
        assert_eq!(r.weight_files, ["model.safetensors"]);
        for f in &r.copied {
            assert_eq!(
                std::fs::read(src.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{name}: {f}"
            );
        }
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(r.copied.iter().any(|c| c == f), "{name}: {f} not copied");
        }
        if name == "full" {
            assert!(r.copied.iter().any(|c| c == "chat_template.jinja"));
        }
        // Only the destination is left next to it: the temporary folder is gone.
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{name}: {left:?}");
    }
}

#[test]
fn the_full_slice_computes_what_the_source_computes() {
    let src = fixture("text");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    export(&src, &full(&src), &out);
    let opts = || LoadOptions {
        threads: Some(2),
        ..Default::default()
    };
    let ids = [2u32, 10, 20, 30, 40, 50];
    let a = Engine::load(&src, opts()).unwrap().logits(&ids).unwrap();
    let b = Engine::load(&out, opts()).unwrap().logits(&ids).unwrap();
    assert_eq!(a, b);
}

/// Checks the text tensors of a slice of `src` exported to `out` (text prefix `pre`)
/// against the source, given the kept layers and their widths.
fn check_sliced_tensors(src: &Path, out: &Path, pre: &str, kept: &[usize], ffn: &[usize]) {
    let (a, b) = (tensors(src), tensors(out));
    let layers = config_layers(src);
    let p = 16; // hidden_size_per_layer_input of the fixtures
    let mut expected = 0;
    for (name, t) in &a {
        let Some(rest) = name.strip_prefix(&format!("{pre}layers.")) else {
            // Not per-layer: unchanged but for the two per-layer-input tensors.
            let o = &b[name];
            expected += 1;
            assert_eq!(o.dtype, t.dtype, "{name}");
            if name == &format!("{pre}embed_tokens_per_layer.weight") {
                assert_eq!(o.shape, [t.shape[0], kept.len() * p]);
                for (ro, rs) in bf16_rows(o).iter().zip(bf16_rows(t)) {
                    for (new, &old) in kept.iter().enumerate() {
                        assert_eq!(
                            ro[new * p * 2..(new + 1) * p * 2],
                            rs[old * p * 2..(old + 1) * p * 2]
                        );
                    }
                }
            } else if name == &format!("{pre}per_layer_model_projection.weight") {
                assert_eq!(o.shape, [kept.len() * p, t.shape[1]]);
                let (ro, rs) = (bf16_rows(o), bf16_rows(t));
                for (new, &old) in kept.iter().enumerate() {
                    assert_eq!(ro[new * p..(new + 1) * p], rs[old * p..(old + 1) * p]);
                }
            } else {
                assert_eq!(o, t, "{name}");
            }
            continue;
        };
        let (old, rest) = rest.split_once('.').unwrap();
        let old: usize = old.parse().unwrap();
        assert!(old < layers);
        let Some(new) = kept.iter().position(|&k| k == old) else {
            continue;
        };
        expected += 1;
        let o = &b[&format!("{pre}layers.{new}.{rest}")];
        let k = ffn[new];
        match rest {
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => {
                assert_eq!(o.shape, [k, t.shape[1]], "{name}");
                assert_eq!(o.data, t.data[..k * t.shape[1] * 2], "{name}");
            }
            "mlp.down_proj.weight" => {
                assert_eq!(o.shape, [t.shape[0], k], "{name}");
                for (ro, rs) in bf16_rows(o).iter().zip(bf16_rows(t)) {
                    assert_eq!(ro[..], rs[..k * 2], "{name}");
                }
            }
            _ => assert_eq!(o, t, "{name}"),
        }
    }
    assert_eq!(
        b.len(),
        expected,
        "the output holds tensors the slice does not"
    );
}

fn config_layers(dir: &Path) -> usize {
    let c = config(dir);
    let t = c.get("text_config").unwrap_or(&c);
    t["num_hidden_layers"].as_u64().unwrap() as usize
}

/// The sliced keys of a text config object, and the rest of the config.
fn check_sliced_config(src: &Value, out: &Value, kept: &[usize], ffn: &[usize], shared: usize) {
    let (s, o) = match src.get("text_config") {
        Some(t) => (t, &out["text_config"]),
        None => (src, out),
    };
    assert_eq!(o["num_hidden_layers"], kept.len());
    assert_eq!(o["intermediate_size"], serde_json::json!(ffn));
    assert_eq!(o["num_kv_shared_layers"], shared);
    for key in ["layer_types", "activation_sparsity_pattern"] {
        let want: Vec<Value> = kept.iter().map(|&l| s[key][l].clone()).collect();
        assert_eq!(o[key], Value::Array(want), "{key}");
    }
    // Everything else is untouched.
    let sliced = [
        "num_hidden_layers",
        "intermediate_size",
        "num_kv_shared_layers",
        "layer_types",
        "activation_sparsity_pattern",
    ];
    let strip = |v: &Value| {
        let mut v = v.clone();
        let t = match v.get_mut("text_config") {
            Some(_) => v["text_config"].as_object_mut().unwrap(),
            None => v.as_object_mut().unwrap(),
        };
        for k in sliced {
            t.remove(k);
        }
        v
    };
    assert_eq!(strip(src), strip(out));
}

#[test]
fn a_hand_written_slice_keeps_the_first_neurons_and_the_kept_layers() {
    let src = fixture("text");
    let tmp = tempfile::tempdir().unwrap();
    let csv = slicing_file(tmp.path(), &[SMALL]);
    let spec = find_slice(&src, Some(&csv), "small").unwrap();
    assert_eq!(spec.ffn_hidden_dims, SMALL_FFN);
    assert_eq!(spec.layers_skipped, [1, 5]);
    let out = tmp.path().join("nested/small");
    let r = export(&src, &spec, &out);
    assert_eq!((r.slice.as_str(), r.layers), ("small", 4));
    check_sliced_tensors(&src, &out, "model.", &SMALL_KEPT, &SMALL_FFN);
    // One of the two KV-shared layers (5) is skipped.
    check_sliced_config(&config(&src), &config(&out), &SMALL_KEPT, &SMALL_FFN, 1);
    let o = config(&out);
    assert_eq!(
        o["layer_types"],
        serde_json::json!([
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention"
        ])
    );
    assert_eq!(
        o["activation_sparsity_pattern"],
        serde_json::json!([0.95, 0.0, 0.0, 0.0])
    );
    // Layer 4 (now 3) is KV-shared and has no k_proj/v_proj/k_norm: none is invented.
    let t = tensors(&out);
    assert!(t.contains_key("model.layers.2.self_attn.k_proj.weight"));
    assert!(!t.contains_key("model.layers.3.self_attn.k_proj.weight"));
    assert!(!t.keys().any(|k| k.starts_with("model.layers.4.")));
    assert_eq!(r.tensors, t.len());

    // The engine loads it with the slice's shapes and runs it.
    let mut e = Engine::load(
        &out,
        LoadOptions {
            threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(e.config().text.num_hidden_layers, 4);
    assert_eq!(e.config().text.intermediate_size, SMALL_FFN);
    assert_eq!(e.config().text.num_kv_shared_layers, 1);
    let l = e.logits(&[2, 10, 20, 30]).unwrap();
    assert!(!l.is_empty() && l.iter().all(|x| x.is_finite()));
}

#[test]
fn a_slice_of_a_multimodal_checkpoint_slices_the_text_config_only() {
    let src = fixture("full");
    let tmp = tempfile::tempdir().unwrap();
    let csv = slicing_file(tmp.path(), &[SMALL]);
    let spec = find_slice(&src, Some(&csv), "small").unwrap();
    let out = tmp.path().join("out");
    export(&src, &spec, &out);
    check_sliced_tensors(&src, &out, "model.language_model.", &SMALL_KEPT, &SMALL_FFN);
    check_sliced_config(&config(&src), &config(&out), &SMALL_KEPT, &SMALL_FFN, 1);
    Engine::load(
        &out,
        LoadOptions {
            threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn a_large_output_is_sharded_with_an_index() {
    let src = fixture("text");
    let tmp = tempfile::tempdir().unwrap();
    let (one, many) = (tmp.path().join("one"), tmp.path().join("many"));
    let spec = full(&src);
    export(&src, &spec, &one);
    let r = export_slice(
        &src,
        &spec,
        &many,
        &ExportOptions {
            max_shard_bytes: 40_000,
        },
    )
    .unwrap();
    let n = r.weight_files.len();
    assert!(n > 2, "{:?}", r.weight_files);
    assert_eq!(
        r.weight_files[0],
        format!("model-00001-of-{n:05}.safetensors")
    );
    assert_eq!(tensors(&one), tensors(&many));
    let index: Value =
        serde_json::from_slice(&std::fs::read(many.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), r.tensors);
    assert_eq!(index["metadata"]["total_size"], r.bytes);
    for (tensor, file) in wm {
        let f = file.as_str().unwrap();
        let bytes = std::fs::read(many.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensor(tensor).is_ok(), "{tensor} not in {f}");
    }
    for f in &r.weight_files {
        // At most the limit, unless one tensor alone is bigger.
        let bytes = std::fs::read(many.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(data <= 40_000 || st.len() == 1, "{f}: {data} bytes");
    }
    let opts = || LoadOptions {
        threads: Some(2),
        ..Default::default()
    };
    let ids = [2u32, 7, 9];
    let a = Engine::load(&one, opts()).unwrap().logits(&ids).unwrap();
    let b = Engine::load(&many, opts()).unwrap().logits(&ids).unwrap();
    assert_eq!(a, b);
}

#[test]
fn an_unknown_slice_name_lists_the_available_ones() {
    let src = fixture("text");
    let e = find_slice(&src, None, "Config for official E2B Model").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("config.json"), "{msg}");
    assert!(
        msg.contains("no slice named \"Config for official E2B Model\""),
        "{msg}"
    );
    assert!(msg.contains("\"full\""), "{msg}");

    let tmp = tempfile::tempdir().unwrap();
    let csv = slicing_file(
        tmp.path(),
        &[SMALL, ("other", "[64, 64, 64, 64, 64, 64]", "")],
    );
    let msg = find_slice(&src, Some(&csv), "full")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("configs.csv"), "{msg}");
    assert!(msg.contains("\"small\", \"other\""), "{msg}");

    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "name,x\n").unwrap();
    let msg = find_slice(&src, Some(&bad), "small")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bad.csv") && msg.contains("no column"),
        "{msg}"
    );
}

#[test]
fn a_non_empty_destination_is_refused_and_left_alone() {
    let src = fixture("text");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let msg = export_slice(&src, &full(&src), &out, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("out") && msg.contains("not empty"), "{msg}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // A file is refused too; an empty folder is used.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let msg = export_slice(&src, &full(&src), &file, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a folder"), "{msg}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    export(&src, &full(&src), &empty);
    assert!(!is_empty_dir(&empty));
}

#[test]
fn invalid_slices_are_refused_before_anything_is_written() {
    let src = fixture("text");
    let tmp = tempfile::tempdir().unwrap();
    let csv = slicing_file(
        tmp.path(),
        &[
            ("odd width", "[100, 128, 192, 192, 256]", "[5]"),
            ("no kv source", "[128, 128, 192, 256, 256]", "[3]"),
            ("too wide", "[128, 160, 192, 192, 256, 256]", ""),
            ("short", "[128, 128]", ""),
        ],
    );
    for (name, says) in [
        ("odd width", "not a multiple of 32"),
        (
            "no kv source",
            "skips layer 3, whose KV cache layer 4 reads",
        ),
        ("too wide", "is not in 1..=128"),
        ("short", "2 FFN widths for 6 kept layers"),
    ] {
        let spec = find_slice(&src, Some(&csv), name).unwrap();
        let out = tmp.path().join("out");
        let e = export_slice(&src, &spec, &out, &ExportOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(says), "{name}: {msg}");
        assert!(msg.contains(&format!("slice {name:?}")), "{name}: {msg}");
        assert!(msg.contains("config.json"), "{name}: {msg}");
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
    // Nothing but the slicing file was left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Every slice of the MatFormer fixture's slicing file, exported here, is byte for byte
/// what the transformers-side reference export (`exported/<slice>/`, the MatFormer Lab
/// procedure run in Python) holds, its config has the same sliced keys, and the engine
/// loading it computes the logits transformers computes on the reference.
#[test]
fn slices_match_the_reference_exports() {
    let src = fixture("matformer");
    let g = common::goldens("matformer");
    let input = common::ids(&g["input_ids"]);
    let csv = src.join("slices.csv");
    let specs = parse_configs_csv(&std::fs::read_to_string(&csv).unwrap()).unwrap();
    assert!(!specs.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    for spec in &specs {
        let name = &spec.name;
        let reference = src.join("exported").join(name);
        let out = tmp.path().join(name);
        let found = find_slice(&src, Some(&csv), name).unwrap();
        assert_eq!(&found, spec);
        export(&src, spec, &out);
        let (want, got) = (tensors(&reference), tensors(&out));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        for (k, t) in &want {
            assert_eq!(Some(t), got.get(k), "{name}: {k}");
        }
        let (want, got) = (config(&reference), config(&out));
        let text = |c: &Value| c.get("text_config").cloned().unwrap_or_else(|| c.clone());
        let (want, got) = (text(&want), text(&got));
        for key in [
            "num_hidden_layers",
            "intermediate_size",
            "layer_types",
            "activation_sparsity_pattern",
            "num_kv_shared_layers",
        ] {
            assert_eq!(want[key], got[key], "{name}: {key}");
        }
        let mut e = Engine::load(
            &out,
            LoadOptions {
                threads: Some(2),
                max_context: Some(128),
                ..Default::default()
            },
        )
        .unwrap();
        let logits = e.logits(&input).unwrap();
        let golden = &g[&format!("{}_prefill_logits", name.replace('-', "_"))];
        let d = common::max_abs_diff(&logits, &golden.f32s);
        assert!(d <= 1e-3, "{name}: max |Δlogit| {d}");
    }
}
