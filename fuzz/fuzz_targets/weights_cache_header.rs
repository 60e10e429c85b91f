//! The quantized-weights cache file as the engine opens it. The key and quant type are
//! taken from the header and the index and data checksums are recomputed where the
//! extents allow, so the fuzzer reaches the index and the matrices behind the checks.
#![no_main]

use gemmad_engine::internals::parse::{self, xxh64};
use gemmad_engine::QuantType;
use libfuzzer_sys::fuzz_target;

fn rd64(b: &[u8], o: usize) -> usize {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize
}

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    if file.len() < 4096 {
        let _ = parse::weights_cache(&file, &[0; 16], QuantType::Bf16);
        return;
    }
    let quant = match file[12] {
        1 => QuantType::Q8_0,
        2 => QuantType::Q4_0,
        3 => QuantType::Q4K,
        4 => QuantType::F32,
        _ => QuantType::Bf16,
    };
    let key: [u8; 16] = file[16..32].try_into().unwrap();
    let (ioff, ilen) = (rd64(&file, 40), rd64(&file, 48));
    let doff = rd64(&file, 56);
    if let Some(end) = ioff.checked_add(ilen).filter(|&e| e <= file.len()) {
        let s = xxh64(&file[ioff..end], 0);
        file[72..80].copy_from_slice(&s.to_le_bytes());
    }
    if doff <= file.len() {
        let s = xxh64(&file[doff..], 0);
        file[80..88].copy_from_slice(&s.to_le_bytes());
    }
    let _ = parse::weights_cache(&file, &key, quant);
});
