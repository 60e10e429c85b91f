//! Helpers shared by the serving benchmarks. The daemon itself is started by the shared
//! end-to-end harness, `gemmad_e2e` (tests/src/lib.rs): `Daemon`, `FIXTURE` and the
//! binary lookup are re-exported from there.

pub use gemmad_e2e::{Daemon, FIXTURE};

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use gemmad_client::pb::generate_response::Event;
use gemmad_client::{pb, Client};

use gemmad_engine::{ChatMessage, Engine, GenerateRequest, LoadOptions, Prompt};

/// Time to first token in-process (ms), `runs` times after `warmup`: the engine loaded
/// from `model` with `threads`, one user turn `prompt`, seed 1, one token.
pub fn in_process_ttft(
    model: &Path,
    threads: usize,
    prompt: &str,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut engine = Engine::load(
        model,
        LoadOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )?;
    let mut req = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::text("user", prompt)]));
    req.sampling.seed = Some(1);
    req.max_tokens = 1;
    let mut local = Vec::new();
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let mut first = None;
        engine.generate(&req, &mut |_| {
            first.get_or_insert_with(|| t0.elapsed());
            ControlFlow::Continue(())
        })?;
        if i >= warmup {
            local.push(first.unwrap_or_default().as_secs_f64() * 1e3);
        }
    }
    Ok(local)
}

/// A daemon on `model` for time-to-first-token runs: `threads`, warn logs, and the
/// prompt cache off, so that each repeat of the same prompt prefills it as the
/// in-process engine does instead of resuming from the previous one.
pub fn start_ttft_daemon(
    model: &Path,
    threads: usize,
    gemmad: Option<&Path>,
) -> anyhow::Result<Daemon> {
    let mut d = Daemon::builder()
        .model(model)
        .config(format!(
            "[model]\nthreads = {threads}\n[log]\nlevel = \"warn\"\n[cache]\nenabled = false\n"
        ))
        .log_level("warn");
    if let Some(g) = gemmad {
        d = d.gemmad(g);
    }
    d.start()
}

/// The gRPC request of the time-to-first-token runs: one user turn `prompt`, seed 1,
/// one token (what [`in_process_ttft`] runs).
pub fn ttft_request(prompt: &str) -> pb::GenerateRequest {
    let mut r = gemmad_client::user_prompt(prompt);
    r.sampling = Some(pb::Sampling {
        seed: Some(1),
        ..Default::default()
    });
    r.max_tokens = 1;
    r
}

/// Time from sending `r` to its first Delta, reading the stream to its end.
pub async fn grpc_ttft(c: &mut Client, r: &pb::GenerateRequest) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut s = c.generate(r.clone()).await?;
    let mut first = None;
    while let Some(m) = s.message().await? {
        if let Some(Event::Delta(_)) = m.event {
            first.get_or_insert_with(|| t0.elapsed());
        }
    }
    Ok(first.unwrap_or_default())
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A small deterministic PRNG (xorshift64*), so runs are repeatable without extra crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
