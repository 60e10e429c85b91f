//! `config.json` (and, after a NUL byte, `generation_config.json`) to the engine's
//! validated model configuration, then the layer relations the loader derives from it.
#![no_main]

use gemmad_engine::internals::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, generation) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(c) = parse::model_config(config, generation) {
        let t = &c.text;
        let _ = (t.q_dim(), t.kv_dim(), t.first_kv_shared_layer());
        for l in 0..t.num_hidden_layers {
            let src = t.kv_source_layer(l);
            assert!(src <= l && t.layer_types[src] == t.layer_types[l]);
        }
    }
});
