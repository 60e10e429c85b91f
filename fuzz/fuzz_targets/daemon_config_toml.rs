//! The daemon's TOML configuration, parsed and validated as `gemmad serve` loads it.
#![no_main]

use gemmad::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::parse(text) {
        // What validation promises the server.
        assert!(c.socket_mode().is_ok_and(|m| m <= 0o777));
        assert!(c.queue.depth >= 1 && c.limits.default_max_tokens <= c.limits.max_tokens);
        let _ = (c.model.quant(), c.model.ple_mode(), c.model.isa());
        let _ = std::time::Duration::from_secs_f64(c.shutdown.grace_period_s);
    }
});
