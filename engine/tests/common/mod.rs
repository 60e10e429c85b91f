//! Shared helpers for the engine's integration tests: fixture paths and golden tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Once;

/// A committed fixture's folder. Every test reaches the engine through one, so this is
/// where the kernel tier and packing of a manual run (`GEMMAD_ISA=avx2 cargo test`,
/// `GEMMAD_PACK=0`) are applied, before any kernel runs.
pub fn fixture(name: &str) -> PathBuf {
    static KERNELS: Once = Once::new();
    KERNELS.call_once(gemmad_engine::internals::configure_kernels_from_env);
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A golden tensor widened to f64-friendly forms.
pub struct Golden {
    pub shape: Vec<usize>,
    pub f32s: Vec<f32>,
    pub i64s: Vec<i64>,
}

pub fn goldens(dir: &str) -> HashMap<String, Golden> {
    let bytes = std::fs::read(fixture(dir).join("goldens.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let (f32s, i64s) = match view.dtype() {
            safetensors::Dtype::F32 => (
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            safetensors::Dtype::I64 => (
                vec![],
                d.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => panic!("unexpected golden dtype {other:?} for {name}"),
        };
        out.insert(
            name,
            Golden {
                shape: view.shape().to_vec(),
                f32s,
                i64s,
            },
        );
    }
    out
}

pub fn ids(g: &Golden) -> Vec<u32> {
    g.i64s.iter().map(|&v| v as u32).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
