//! A safetensors file (header and data) as a checkpoint shard: the header's JSON, dtypes,
//! shapes and data offsets checked against the file's length.
#![no_main]

use gemmad_engine::internals::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|file: &[u8]| {
    if let Ok(tensors) = parse::safetensors_header(file) {
        for t in tensors {
            // What the parser promises: every range lies inside the file, in order.
            assert!(t.start <= t.end && t.end <= file.len(), "{t:?}");
            if let Ok(dt) = t.dtype {
                assert_eq!(
                    t.shape.iter().product::<usize>() * dt.size(),
                    t.end - t.start
                );
            }
        }
    }
});
