//! `model.safetensors.index.json`: the tensor → shard map and the shard names.
#![no_main]

use gemmad_engine::internals::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| {
    if let Ok((shards, map)) = parse::safetensors_index(text) {
        // Shard names are plain file names inside the checkpoint folder.
        for s in &shards {
            assert!(!s.contains('/') && !s.contains(".."), "{s}");
        }
        assert!(map.values().all(|f| shards.contains(f)));
    }
});
