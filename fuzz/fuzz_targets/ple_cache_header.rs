//! The PLE cache file as the engine opens it, checked against the text fixture's model:
//! the input is the header page (zero-padded to a page; its checksum is recomputed so
//! the fuzzer gets past it) followed by the file's body, zero-filled up to the size the
//! header declares (at most 1 MiB), with the key the header carries and the sections'
//! checksums recomputed where its extents allow.
#![no_main]

use std::sync::OnceLock;

use gemmad_engine::internals::parse::{self, xxh64, PLE_HEADER_BYTES};
use gemmad_engine::internals::{CacheDir, DType};
use gemmad_engine::{RowDType, TextConfig};
use libfuzzer_sys::fuzz_target;

static CONFIG: &[u8] = include_bytes!("../../engine/tests/fixtures/text/config.json");

fn config() -> &'static TextConfig {
    static C: OnceLock<TextConfig> = OnceLock::new();
    C.get_or_init(|| {
        parse::model_config(CONFIG, None)
            .expect("fixture config")
            .text
    })
}

/// An empty directory of this process's: where a corrupt row's file would be moved aside.
fn dir() -> &'static CacheDir {
    static D: OnceLock<CacheDir> = OnceLock::new();
    D.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("gemmad-fuzz-ple-{}", std::process::id()));
        CacheDir::open(&p).expect("a scratch cache directory")
    })
}

fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let h = PLE_HEADER_BYTES;
    let mut file = data.to_vec();
    if file.len() < h {
        file.resize(h, 0);
    }
    let declared = rd64(&file, 88);
    if declared > file.len() as u64 && declared <= 1 << 20 {
        file.resize(declared as usize, 0);
    }
    // The pad and checksum-table sections' checksums, where the header's extents allow.
    for (off_at, len_at, sum_at) in [(56, 64, 112), (72, 80, 120)] {
        let (o, n) = (rd64(&file, off_at), rd64(&file, len_at));
        if let Some(end) = o.checked_add(n).filter(|&e| e <= file.len() as u64) {
            let s = xxh64(&file[o as usize..end as usize], 0);
            file[sum_at..sum_at + 8].copy_from_slice(&s.to_le_bytes());
        }
    }
    let sum = xxh64(&file[..h - 8], 0);
    file[h - 8..h].copy_from_slice(&sum.to_le_bytes());
    let key: [u8; 16] = file[96..112].try_into().unwrap();
    let dtype = match data.get(16) {
        Some(0) => RowDType::F32,
        Some(2) => RowDType::Q8_0,
        Some(1) => RowDType::Bf16,
        Some(3) => RowDType::F16,
        _ => RowDType::Raw,
    };
    let table_dtype = match data.get(128) {
        Some(0) => DType::F32,
        Some(2) => DType::F16,
        _ => DType::BF16,
    };
    if let Ok(Ok(cache)) = parse::ple_cache(dir(), &file, config(), dtype, table_dtype, key) {
        // An opened cache serves every row it declares (or reports it corrupt).
        let mut row = vec![0f32; cache.row_len()];
        for id in 0..cache.rows().min(4) {
            let _ = cache.read_row(id, &mut row);
        }
    }
});
