//! Daemon overhead on time to first token: the same prompt and seed run in-process on the
//! engine and through `gemmad serve` over gRPC on its Unix socket; prints medians and the
//! difference, and the idle daemon's RSS.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/ttft-overhead [--runs 20] [--model DIR] [--threads N]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use gemmad_bench_serving::{
    grpc_ttft, in_process_ttft, median, start_ttft_daemon, ttft_request, FIXTURE,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    /// The gemmad binary (default: the harness's, gemmad_e2e::gemmad: next to this one,
    /// or built by cargo under `cargo run`).
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Compute threads, for both the in-process engine and the daemon.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value = "Tell me about the sea.")]
    prompt: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let warmup = 3;

    // In-process: from the call to the first token callback.
    let mut local = in_process_ttft(&a.model, a.threads, &a.prompt, warmup, a.runs)?;

    // Through the daemon: from sending the request to receiving the first delta.
    let mut d = start_ttft_daemon(&a.model, a.threads, a.gemmad.as_deref())?;
    let mut c = d.client().await?;
    let r = ttft_request(&a.prompt);
    let mut remote = Vec::new();
    for i in 0..warmup + a.runs {
        let first = grpc_ttft(&mut c, &r).await?;
        if i >= warmup {
            remote.push(ms(first));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = d.rss()?;
    let st = c.status().await?;
    let reported = st
        .memory
        .iter()
        .find(|p| p.part == "process_rss")
        .map_or(0, |p| p.bytes);

    // Close the connection before the daemon is stopped (the stop blocks this thread).
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.stop()?;
    let (ml, mr) = (median(&mut local), median(&mut remote));
    println!("model            {}", a.model.display());
    println!(
        "runs             {} (after {warmup} warm-up), threads {}",
        a.runs, a.threads
    );
    println!("ttft in-process  median {ml:.3} ms");
    println!("ttft via gRPC    median {mr:.3} ms");
    println!(
        "daemon overhead  {:.3} ms (median difference; target < 5 ms)",
        mr - ml
    );
    println!(
        "idle daemon RSS  {:.1} MiB (/proc VmRSS; Status says {:.1} MiB)",
        rss as f64 / 1048576.0,
        reported as f64 / 1048576.0
    );
    Ok(())
}
