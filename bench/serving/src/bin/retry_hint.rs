//! How well the `retry-after-ms` hint predicts the wait: a client queues requests of
//! random length until one is refused, and reads that refusal's hint; then the real
//! times are measured from the daemon's Status: until a queue slot frees (a retry would be
//! admitted) and until all the work ahead has ended (a request queued then would start).
//! The hint predicts the second.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/retry-hint [--rounds 10] [--depth 8] [--threads 1]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemmad_bench_serving::{median, Daemon, Rng, FIXTURE};
use gemmad_client::{pb, user_prompt, Client};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    /// The gemmad binary (default: the harness's).
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Queue depth (requests waiting behind the running one).
    #[arg(long, default_value_t = 8)]
    depth: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn request(rng: &mut Rng) -> pb::GenerateRequest {
    let mut r = user_prompt("Write a long story about the sea and the ships on it.");
    r.max_tokens = rng.range(64, 1024) as u32;
    // Half run to max_tokens, half may stop early: the hint must handle both.
    r.ignore_eos = rng.range(0, 2) == 0;
    r.sampling = Some(pb::Sampling {
        seed: Some(rng.next_u64()),
        ..Default::default()
    });
    r
}

async fn queue(c: &mut Client) -> Result<pb::QueueInfo> {
    Ok(c.status().await?.queue.unwrap_or_default())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut d = Daemon::builder().model(&a.model).config(format!(
        "[model]\nthreads = {}\n[queue]\ndepth = {}\nper_peer = {}\n",
        a.threads,
        a.depth,
        a.depth + 1
    ));
    if let Some(g) = &a.gemmad {
        d = d.gemmad(g);
    }
    let mut d = d.start()?;
    let mut rng = Rng::new(a.seed);
    let mut filler = d.client().await?;
    let mut watcher = d.client().await?;
    // Let the daemon learn its rates.
    for _ in 0..5 {
        filler.generate_text(request(&mut rng)).await?;
    }
    let (mut ratio, mut rows) = (Vec::new(), Vec::new());
    println!("round  hint_ms  slot_free_ms  all_ahead_done_ms  hint/all_ahead");
    for round in 0..a.rounds {
        // Queue requests until one is refused: that one reads the hint.
        let mut sent = 0;
        let e = loop {
            match filler.generate(request(&mut rng)).await {
                Ok(mut s) => {
                    tokio::spawn(async move { while let Ok(Some(_)) = s.message().await {} });
                }
                Err(e) if e.code() == Some(tonic::Code::ResourceExhausted) => break e,
                Err(e) => return Err(e.into()),
            }
            sent += 1;
            if sent > 10_000 {
                bail!("round {round}: the queue never filled");
            }
        };
        let t0 = Instant::now();
        let hint: u64 = e
            .status()
            .and_then(|s| s.metadata().get("retry-after-ms"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no retry-after-ms on {e}"))?;
        let mut slot = None;
        let done = loop {
            let q = queue(&mut watcher).await?;
            if slot.is_none() && q.waiting < a.depth as u32 {
                slot = Some(t0.elapsed());
            }
            if q.waiting == 0 && !q.running {
                break t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let slot = slot.unwrap_or(done);
        let r = hint as f64 / (done.as_secs_f64() * 1e3);
        println!(
            "{round:5}  {hint:7}  {:12.0}  {:17.0}  {r:.2}",
            slot.as_secs_f64() * 1e3,
            done.as_secs_f64() * 1e3
        );
        ratio.push(r);
        rows.push((hint, done));
    }
    let mut abs_err: Vec<f64> = rows
        .iter()
        .map(|(h, d)| (*h as f64 - d.as_secs_f64() * 1e3).abs() / (d.as_secs_f64() * 1e3))
        .collect();
    println!(
        "hint / real wait: median {:.2}, min {:.2}, max {:.2}; median relative error {:.0}%",
        median(&mut ratio.clone()),
        ratio.iter().cloned().fold(f64::INFINITY, f64::min),
        ratio.iter().cloned().fold(0.0, f64::max),
        median(&mut abs_err) * 100.0
    );
    drop((filler, watcher));
    d.stop()?;
    Ok(())
}
