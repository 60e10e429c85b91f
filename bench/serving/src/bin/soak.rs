//! Soak: N concurrent streaming clients for T seconds against one `gemmad serve`, each
//! looping over requests of random length; some are cancelled at a random point, some
//! end in an abrupt disconnect (the whole connection dropped mid-stream, or a raw socket
//! that sends half a request and hangs up), some are invalid. The daemon's RSS is sampled
//! every second. Prints outcomes by kind and RSS over the first and last minute, and
//! checks that no request was lost: every client call ended, and the daemon's counters
//! add up with nothing left queued.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/soak [--clients 64] [--secs 600] [--cancel-percent 20]
//!     [--disconnect-percent 5] [--invalid-percent 10] [--rss-csv rss.csv]

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
    #[arg(long, default_value_t = 20)]
    cancel_percent: u64,
    /// Share of requests ended by dropping the whole connection mid-stream (half of them
    /// instead a raw socket that writes part of a request and hangs up).
    #[arg(long, default_value_t = 5)]
    disconnect_percent: u64,
    /// Share of requests that are invalid (each is expected to be refused).
    #[arg(long, default_value_t = 10)]
    invalid_percent: u64,
    /// Where to write the per-second RSS samples (seconds, bytes).
    #[arg(long)]
    rss_csv: Option<PathBuf>,
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
    /// Calls ended by dropping their connection mid-stream.
    disconnected: u64,
    /// Raw connections that sent part of a request and hung up (not calls).
    raw_hangups: u64,
    /// Invalid requests sent, and how many were refused (with any code: a full queue
    /// may answer first); one that runs is a failure of the soak.
    invalid_sent: u64,
    invalid_refused: u64,
    /// Requests whose stream stalled past the timeout (would be "lost").
    stalled: u64,
    errors: BTreeMap<String, u64>,
    tokens: u64,
}

const STALL: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
struct Mix {
    cancel: u64,
    disconnect: u64,
    invalid: u64,
}

/// One of several kinds of request the daemon must refuse as invalid.
fn invalid_request(rng: &mut Rng) -> pb::GenerateRequest {
    let mut r = user_prompt("hello");
    match rng.range(0, 5) {
        0 => r.messages.clear(),
        1 => r.messages[0].role = "wizard".into(),
        2 => r.max_tokens = u32::MAX,
        3 => {
            r.sampling = Some(pb::Sampling {
                temperature: Some(-1.0),
                ..Default::default()
            })
        }
        _ => r.stop = vec![String::new(); 10_000],
    }
    r
}

/// A raw connection that sends the HTTP/2 preface and part of a frame, then hangs up.
async fn raw_hangup(socket: &std::path::Path, rng: &mut Rng) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    let preface =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x40\x00\x01\x05";
    let n = rng.range(1, preface.len() as u64) as usize;
    s.write_all(&preface[..n]).await?;
    drop(s);
    Ok(())
}

/// Connects again after a dropped connection; a refusal (the per-user connection cap
/// while the old one is still being released) is counted and retried.
async fn reconnect(socket: &std::path::Path, t: &mut Tally) -> Result<Client> {
    let mut tries = 0;
    loop {
        match Client::connect(socket).await {
            Ok(c) => return Ok(c),
            Err(e) if tries < 50 => {
                tries += 1;
                *t.errors
                    .entry(format!("reconnect {:?}", e.code()))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("reconnecting to {}: {e}", socket.display()),
        }
    }
}

async fn client_loop(
    socket: PathBuf,
    idx: usize,
    seed: u64,
    until: Instant,
    mix: Mix,
) -> Result<Tally> {
    let mut rng = Rng::new(seed ^ ((idx as u64 + 1) * 7919));
    let mut c = Client::connect(&socket).await?;
    let mut t = Tally::default();
    while Instant::now() < until {
        let invalid = rng.range(1, 100) <= mix.invalid;
        let mut r = if invalid {
            t.invalid_sent += 1;
            invalid_request(&mut rng)
        } else {
            let mut r = user_prompt(&format!("client {idx} request {} says hello", t.sent));
            r.max_tokens = rng.range(1, 256) as u32;
            r.sampling = Some(pb::Sampling {
                seed: Some(rng.next_u64()),
                ..Default::default()
            });
            r
        };
        if rng.range(0, 3) == 0 {
            r.priority = pb::Priority::Background as i32;
        }
        // Cancel, or drop the connection, after this many messages (Queued, Started,
        // deltas...).
        // Invalid requests run to their refusal.
        let roll = if invalid { 101 } else { rng.range(1, 100) };
        let cancel_after = (roll <= mix.cancel).then(|| rng.range(0, 20));
        let disconnect_after =
            (roll > mix.cancel && roll <= mix.cancel + mix.disconnect).then(|| rng.range(0, 20));
        if disconnect_after.is_some() && rng.range(0, 2) == 0 {
            // Half the disconnects are raw sockets that never become a call.
            raw_hangup(&socket, &mut rng).await?;
            t.raw_hangups += 1;
            continue;
        }
        t.sent += 1;
        let mut s = match c.generate(r).await {
            Ok(s) => s,
            Err(e) => {
                if invalid {
                    t.invalid_refused += 1;
                }
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
            if disconnect_after == Some(seen) {
                t.disconnected += 1;
                // Drop the stream and the connection under it, then reconnect.
                drop(s);
                c = reconnect(&socket, &mut t).await?;
                break;
            }
            match tokio::time::timeout(STALL, s.message()).await {
                Err(_) => {
                    t.stalled += 1;
                    break;
                }
                Ok(Err(st)) => {
                    if invalid {
                        t.invalid_refused += 1;
                    }
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
            "[model]\nthreads = {}\n[queue]\ndepth = {depth}\nper_peer = {depth}\n\
             per_peer_preparing = {depth}\n[server]\nmax_connections_per_uid = {conns}\n\
             [log]\nlevel = \"warn\"\n",
            a.threads,
            // One user runs every client here: each holds a connection, and a dropped one
            // may not be released yet when its client reconnects.
            conns = depth * 4 + 16,
        ))
        .log_level("warn");
    if let Some(g) = &a.gemmad {
        d = d.gemmad(g);
    }
    let mut d = d.start()?;
    let rss_idle = d.rss()?;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(a.secs);
    let pid = d.pid();
    // RSS once a second, from a thread of its own so a busy runtime cannot skew it.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let on = sampling.clone();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut next = Instant::now();
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(rss) = vm_rss(pid.as_raw()) {
                    v.push((t0.elapsed().as_secs_f64(), rss));
                }
                next += Duration::from_secs(1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            v
        })
    };
    let mix = Mix {
        cancel: a.cancel_percent,
        disconnect: a.disconnect_percent,
        invalid: a.invalid_percent,
    };
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        tasks.push(tokio::spawn(client_loop(
            d.socket().to_path_buf(),
            i,
            a.seed,
            until,
            mix,
        )));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await??;
        total.sent += t.sent;
        total.completed += t.completed;
        total.cancelled += t.cancelled;
        total.disconnected += t.disconnected;
        total.raw_hangups += t.raw_hangups;
        total.invalid_sent += t.invalid_sent;
        total.invalid_refused += t.invalid_refused;
        total.stalled += t.stalled;
        total.tokens += t.tokens;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let wall = t0.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
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
        "client side: sent {}  completed {}  cancelled {}  disconnected {}  errors {}  stalled {}  tokens {} ({:.0} tok/s)",
        total.sent,
        total.completed,
        total.cancelled,
        total.disconnected,
        errors,
        total.stalled,
        total.tokens,
        total.tokens as f64 / wall.as_secs_f64()
    );
    for (k, v) in &total.errors {
        println!("  error {k}: {v}");
    }
    println!(
        "invalid requests: sent {}  refused {}; raw half-request hang-ups {}",
        total.invalid_sent, total.invalid_refused, total.raw_hangups
    );
    println!(
        "daemon side: admitted {}  completed {}  cancelled {}  failed {}  rejected {}  (queue now: {} waiting, running {})",
        n.admitted, n.completed, n.cancelled, n.failed, n.rejected, q.waiting, q.running
    );
    println!(
        "daemon RSS: {:.1} MiB idle at start, {:.1} MiB after the soak",
        rss_idle as f64 / 1048576.0,
        rss_end as f64 / 1048576.0
    );
    let minute = |from: f64, to: f64| {
        let w: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, r)| *r as f64 / 1048576.0)
            .collect();
        let max = w.iter().cloned().fold(f64::NAN, f64::max);
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        (mean, max, w.len())
    };
    let end = samples.last().map_or(0.0, |s| s.0);
    let first = minute(0.0, 60.0);
    let last = minute((end - 60.0).max(0.0), end + 1.0);
    println!(
        "RSS per second ({} samples): first minute mean {:.1} MiB max {:.1}; last minute mean {:.1} MiB max {:.1}",
        samples.len(),
        first.0,
        first.1,
        last.0,
        last.1
    );
    if let Some(p) = &a.rss_csv {
        let mut out = String::from("seconds,rss_bytes\n");
        for (t, r) in &samples {
            out.push_str(&format!("{t:.1},{r}\n"));
        }
        std::fs::write(p, out)?;
    }
    let accounted = total.completed + total.cancelled + total.disconnected + errors + total.stalled;
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
    if total.invalid_refused != total.invalid_sent {
        lost.push(format!(
            "{} of {} invalid requests were not refused",
            total.invalid_sent - total.invalid_refused,
            total.invalid_sent
        ));
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

/// VmRSS of `pid` in bytes (None once it is gone).
fn vm_rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
