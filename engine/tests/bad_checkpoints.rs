//! Broken and unusual checkpoint folders: each broken one fails with an error that names
//! the file and the tensor or field; each legitimate variant (shards, extra k/v tensors on
//! KV-shared layers) loads and gives the same logits.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gemmad_engine::internals::{LogitsFor, TextModel};
use gemmad_engine::{Engine, LoadOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<T> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| T {
            name: n,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn write_tensors(path: &Path, ts: &[T]) {
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the text fixture in a temp dir.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(fixture("text")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    let e = Engine::load(dir, LoadOptions::default()).unwrap_err();
    e.to_string()
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 1000).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("tensor `model."), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn truncated_header_is_reported() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(100).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let mut ts = read_tensors(&f);
    ts.retain(|t| t.name != "model.layers.3.mlp.down_proj.weight");
    write_tensors(&f, &ts);
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.3.mlp.down_proj.weight") && e.contains("missing"),
        "{e}"
    );
    assert!(e.contains(dir.to_str().unwrap()), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let mut ts = read_tensors(&f);
    let t = ts
        .iter_mut()
        .find(|t| t.name == "model.layers.2.self_attn.q_proj.weight")
        .unwrap();
    t.shape = vec![t.shape[1], t.shape[0]]; // [128, 64] stored as [64, 128]
    write_tensors(&f, &ts);
    let e = load_err(&dir);
    assert!(e.contains("model.layers.2.self_attn.q_proj.weight"), "{e}");
    assert!(e.contains("[64, 128]") && e.contains("[128, 64]"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let mut ts = read_tensors(&f);
    let t = ts
        .iter_mut()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    t.dtype = Dtype::I16;
    write_tensors(&f, &ts);
    let e = load_err(&dir);
    assert!(e.contains("model.norm.weight") && e.contains("I16"), "{e}");
}

#[test]
fn config_missing_fields_are_named() {
    for field in [
        "hidden_size",
        "num_hidden_layers",
        "head_dim",
        "laurel_rank",
        "vocab_size",
    ] {
        let (_t, dir) = copy_fixture();
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove(field);
        std::fs::write(&p, v.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains(field),
            "{field}: {e}"
        );
    }
}

/// A context length in a config file is never allocated as is, and a thread count is
/// bounded: out of range they are errors that say which value.
#[test]
fn absurd_contexts_and_thread_counts_are_refused_not_allocated() {
    let (_t, dir) = copy_fixture();
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["max_position_embeddings"] = (1u64 << 40).into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("max_position_embeddings") && e.contains("config.json"),
        "{e}"
    );
    let err = Engine::load(
        &fixture("text"),
        LoadOptions {
            threads: Some(100_000),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("more than 1024"), "{err}");
}

#[test]
fn config_not_json_and_missing_files() {
    let (_t, dir) = copy_fixture();
    std::fs::write(dir.join("config.json"), "{ nope").unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );

    let (_t2, dir2) = copy_fixture();
    std::fs::remove_file(dir2.join("model.safetensors")).unwrap();
    let e = load_err(&dir2);
    assert!(e.contains("no model*.safetensors"), "{e}");

    let e = load_err(Path::new("/nonexistent/gemma"));
    assert!(e.contains("/nonexistent/gemma/config.json"), "{e}");
}

#[test]
fn broken_tokenizer_is_an_error_not_a_panic() {
    let (_t, dir) = copy_fixture();
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 5}").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
}

fn logits_of(dir: &Path) -> Vec<f32> {
    let g = goldens("text");
    let (_, m) = TextModel::load_dir(dir).unwrap();
    let mut cache = m.new_cache(64);
    m.forward(&ids(&g["input_ids"]), &mut cache, LogitsFor::All)
        .unwrap()
}

#[test]
fn kv_shared_layers_may_carry_unused_kv_weights() {
    // Released checkpoints store k_proj/v_proj/k_norm for KV-shared layers; transformers 5
    // drops them. Both must load, and the extra weights must not be used.
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let mut ts = read_tensors(&f);
    for l in [4, 5] {
        for (suffix, shape) in [
            ("k_proj.weight", vec![64, 64]),
            ("v_proj.weight", vec![64, 64]),
            ("k_norm.weight", vec![32]),
        ] {
            let n: usize = shape.iter().product();
            // Garbage values: if they were used, logits would change.
            let data: Vec<u8> = (0..n)
                .flat_map(|i| half::bf16::from_f32(((i % 7) as f32) - 3.0).to_le_bytes())
                .collect();
            ts.push(T {
                name: format!("model.layers.{l}.self_attn.{suffix}"),
                dtype: Dtype::BF16,
                shape,
                data,
            });
        }
    }
    write_tensors(&f, &ts);
    let d = max_abs_diff(&logits_of(&dir), &goldens("text")["prefill_logits"].f32s);
    assert!(d <= 1e-3, "{d}");
}

#[test]
fn sharded_checkpoint_with_index_loads() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let ts = read_tensors(&f);
    std::fs::remove_file(&f).unwrap();
    let (a, b): (Vec<T>, Vec<T>) = ts
        .into_iter()
        .partition(|t| t.name.contains("layers.0") || t.name.contains("embed"));
    write_tensors(&dir.join("model-00001-of-00002.safetensors"), &a);
    write_tensors(&dir.join("model-00002-of-00002.safetensors"), &b);
    let mut map = serde_json::Map::new();
    for t in &a {
        map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in &b {
        map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let d = max_abs_diff(&logits_of(&dir), &goldens("text")["prefill_logits"].f32s);
    assert!(d <= 1e-3, "{d}");

    // A shard the index names but that lacks the tensor: named error.
    let mut ts2 = read_tensors(&dir.join("model-00002-of-00002.safetensors"));
    ts2.retain(|t| t.name != "model.norm.weight");
    write_tensors(&dir.join("model-00002-of-00002.safetensors"), &ts2);
    let e = load_err(&dir);
    assert!(
        e.contains("model.norm.weight") && e.contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn f32_checkpoint_loads_and_matches() {
    let (_t, dir) = copy_fixture();
    let f = dir.join("model.safetensors");
    let ts: Vec<T> = read_tensors(&f)
        .into_iter()
        .map(|t| {
            let data = t
                .data
                .chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            T {
                dtype: Dtype::F32,
                data,
                ..t
            }
        })
        .collect();
    write_tensors(&f, &ts);
    let d = max_abs_diff(&logits_of(&dir), &goldens("text")["prefill_logits"].f32s);
    assert!(d <= 1e-3, "{d}");
}
