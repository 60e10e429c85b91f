//! A prompt-cache state file as the disk tier reads it, for the text fixture's geometry
//! (2 KV heads of 32, f16): the input is the whole file, its trailing checksum recomputed
//! so that the fuzzer gets past it.
#![no_main]

use gemmad_engine::internals::parse::{self, xxh64};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    if file.len() >= 24 {
        let n = file.len() - 8;
        let sum = xxh64(&file[..n], 0);
        file[n..].copy_from_slice(&sum.to_le_bytes());
    }
    if let Ok(tokens) = parse::prompt_cache_file(&file, 64, 32) {
        // A state the tier would resume holds at least one token.
        assert!(tokens > 0);
    }
});
