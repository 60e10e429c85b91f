//! Soak: N concurrent streaming clients for T seconds against one `gemmad serve`, each
//! looping over requests of random length and cancelling some at random points. Prints
//! completed / cancelled / errors by code, and checks that no request was lost: every
//! client call ended, and the daemon's counters add up with nothing left queued.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/soak [--clients 64] [--secs 60] [--cancel-percent 25]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use gemmad_bench_serving::{Daemon, Rng, FIXTURE};
use gemmad_client::pb::generate_response::Event;
use gemmad_client::{pb, user_prompt, Client};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    /// The gemmad binary (default: the harness's, gemmad_e2e::gemmad: next to this one,
    /// or built by cargo under `cargo run`).
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Share of requests cancelled (the stream dropped) at a random point.
    #[arg(long, default_value_t = 25)]
    cancel_percent: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Default, Debug)]
struct Tally {
    sent: u64,
    completed: u64,
    cancelled: u64,
    /// Requests whose stream stalled past the timeout (would be "lost").
    stalled: u64,
    errors: BTreeMap<String, u64>,
    tokens: u64,
}

const STALL: Duration = Duration::from_secs(120);

async fn client_loop(
    socket: PathBuf,
    idx: usize,
    seed: u64,
    until: Instant,
    cancel_percent: u64,
) -> Result<Tally> {
    let mut rng = Rng::new(seed ^ ((idx as u64 + 1) * 7919));
    let mut c = Client::connect(&socket).await?;
    let mut t = Tally::default();
    while Instant::now() < until {
        let mut r = user_prompt(&format!("client {idx} request {} says hello", t.sent));
        r.max_tokens = rng.range(1, 256) as u32;
        r.sampling = Some(pb::Sampling {
            seed: Some(rng.next_u64()),
            ..Default::default()
        });
        if rng.range(0, 3) == 0 {
            r.priority = pb::Priority::Background as i32;
        }
        // Cancel after this many messages (Queued, Started, deltas...).
        let cancel_after = (rng.range(1, 100) <= cancel_percent).then(|| rng.range(0, 20));
        t.sent += 1;
        let mut s = match c.generate(r).await {
            Ok(s) => s,
            Err(e) => {
                let st = e.status();
                let why = match st.map(|s| s.message()) {
                    Some(m) if m.contains("queue is full") => " (queue full)",
                    Some(m) if m.contains("per_peer") => " (per-peer limit)",
                    _ => "",
                };
                *t.errors.entry(format!("{:?}{why}", e.code())).or_default() += 1;
                // Honour the daemon's retry hint.
                let hint = st
                    .and_then(|s| s.metadata().get("retry-after-ms"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(20);
                tokio::time::sleep(Duration::from_millis(hint)).await;
                continue;
            }
        };
        let mut seen = 0u64;
        loop {
            if cancel_after == Some(seen) {
                t.cancelled += 1;
                break; // dropping the stream cancels the call
            }
            match tokio::time::timeout(STALL, s.message()).await {
                Err(_) => {
                    t.stalled += 1;
                    break;
                }
                Ok(Err(st)) => {
                    *t.errors.entry(format!("{:?}", st.code())).or_default() += 1;
                    break;
                }
                Ok(Ok(None)) => {
                    *t.errors.entry("ended without Finished".into()).or_default() += 1;
                    break;
                }
                Ok(Ok(Some(m))) => match m.event {
                    Some(Event::Finished(f)) => {
                        t.completed += 1;
                        t.tokens += f.usage.map_or(0, |u| u.completion_tokens as u64);
                        break;
                    }
                    _ => seen += 1,
                },
            }
        }
    }
    Ok(t)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let depth = a.clients.max(1);
    let mut d = Daemon::builder()
        .model(&a.model)
        .config(format!(
            "[model]\nthreads = {}\n[queue]\ndepth = {depth}\nper_peer = {depth}\n[log]\nlevel = \"warn\"\n",
            a.threads
        ))
        .log_level("warn");
    if let Some(g) = &a.gemmad {
        d = d.gemmad(g);
    }
    let mut d = d.start()?;
    let rss_idle = d.rss()?;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        tasks.push(tokio::spawn(client_loop(
            d.socket().to_path_buf(),
            i,
            a.seed,
            until,
            a.cancel_percent,
        )));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await??;
        total.sent += t.sent;
        total.completed += t.completed;
        total.cancelled += t.cancelled;
        total.stalled += t.stalled;
        total.tokens += t.tokens;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let wall = t0.elapsed();
    let rss_end = d.rss()?;

    // Let the daemon settle, then compare its books with ours.
    let mut c = d.client().await?;
    let settle = Instant::now();
    let st = loop {
        let st = c.status().await?;
        let q = st.queue.unwrap_or_default();
        if (q.waiting == 0 && !q.running) || settle.elapsed() > Duration::from_secs(30) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let q = st.queue.unwrap_or_default();
    let n = st.requests.unwrap_or_default();
    let errors: u64 = total.errors.values().sum();
    // A graceful stop (SIGTERM), once this process's connection is closed.
    drop(c);
    d.stop()?;

    println!(
        "clients {}  duration {:.1} s",
        a.clients,
        wall.as_secs_f64()
    );
    println!(
        "client side: sent {}  completed {}  cancelled {}  errors {}  stalled {}  tokens {} ({:.0} tok/s)",
        total.sent,
        total.completed,
        total.cancelled,
        errors,
        total.stalled,
        total.tokens,
        total.tokens as f64 / wall.as_secs_f64()
    );
    for (k, v) in &total.errors {
        println!("  error {k}: {v}");
    }
    println!(
        "daemon side: admitted {}  completed {}  cancelled {}  failed {}  rejected {}  (queue now: {} waiting, running {})",
        n.admitted, n.completed, n.cancelled, n.failed, n.rejected, q.waiting, q.running
    );
    println!(
        "daemon RSS: {:.1} MiB idle at start, {:.1} MiB after the soak",
        rss_idle as f64 / 1048576.0,
        rss_end as f64 / 1048576.0
    );
    let accounted = total.completed + total.cancelled + errors + total.stalled;
    let books = n.completed + n.cancelled + n.failed;
    let mut lost = Vec::new();
    if accounted != total.sent {
        lost.push(format!(
            "client outcomes {accounted} != sent {}",
            total.sent
        ));
    }
    if books != n.admitted {
        lost.push(format!(
            "daemon outcomes {books} != admitted {}",
            n.admitted
        ));
    }
    if n.admitted + n.rejected > total.sent {
        lost.push("daemon saw more requests than were sent".into());
    }
    if total.stalled > 0 || q.waiting > 0 || q.running {
        lost.push("requests stalled or left in the queue".into());
    }
    if n.completed < total.completed {
        lost.push("daemon completed fewer than clients saw".into());
    }
    if lost.is_empty() {
        println!("none lost: every call ended, and the daemon's completed + cancelled + failed = admitted");
        Ok(())
    } else {
        bail!("LOST: {}", lost.join("; "))
    }
}
