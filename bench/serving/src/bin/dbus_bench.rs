//! The D-Bus front end measured: time to first token in-process, over gRPC and over
//! D-Bus on one daemon (medians), then a soak of N concurrent D-Bus clients, each on its
//! own bus connection, with random cancels, abrupt disconnects (the connection dropped
//! mid-stream) and invalid requests. Prints outcomes by kind and checks that none was
//! lost: every call ended, and the daemon's counters add up with nothing left queued.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/dbus-bench [--runs 20] [--clients 32] [--secs 60]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use gemmad_bench_serving::{in_process_ttft, median, Daemon, Rng, FIXTURE};
use gemmad_client::dbus::{Bus, DbusClient};
use gemmad_client::pb::generate_response::Event;
use gemmad_client::{pb, user_prompt};
use gemmad_e2e::PrivateBus;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value = "Tell me about the sea.")]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Soak length; 0 skips the soak.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    #[arg(long, default_value_t = 20)]
    cancel_percent: u64,
    #[arg(long, default_value_t = 10)]
    disconnect_percent: u64,
    #[arg(long, default_value_t = 10)]
    invalid_percent: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn request(prompt: &str, max_tokens: u32, seed: u64) -> pb::GenerateRequest {
    let mut r = user_prompt(prompt);
    r.sampling = Some(pb::Sampling {
        seed: Some(seed),
        ..Default::default()
    });
    r.max_tokens = max_tokens;
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let warmup = 3;

    let mut local = in_process_ttft(&a.model, a.threads, &a.prompt, warmup, a.runs)?;

    let bus = PrivateBus::session()?;
    let mut b = Daemon::builder()
        .model(&a.model)
        .config(format!(
            "[model]\nthreads = {}\n[queue]\ndepth = 256\nper_peer = 256\n[log]\nlevel = \"warn\"\n",
            a.threads
        ))
        .log_level("warn")
        .dbus(&bus);
    if let Some(g) = &a.gemmad {
        b = b.gemmad(g);
    }
    let mut d = b.start()?;
    let mut grpc = d.client().await?;
    let dbus = DbusClient::connect(Bus::Address(bus.address().to_string())).await?;
    let r = request(&a.prompt, 1, 1);
    let (mut via_grpc, mut via_dbus) = (Vec::new(), Vec::new());
    for i in 0..warmup + a.runs {
        // Alternate, so that drift on the machine hits both alike.
        let t0 = Instant::now();
        let mut s = grpc.generate(r.clone()).await?;
        let mut first = None;
        while let Some(m) = s.message().await? {
            if let Some(Event::Delta(_)) = m.event {
                first.get_or_insert_with(|| t0.elapsed());
            }
        }
        let t1 = Instant::now();
        let mut g = dbus.generate(r.clone()).await?;
        let mut first_d = None;
        while let Some(m) = g.message().await? {
            if let Some(Event::Delta(_)) = m.event {
                first_d.get_or_insert_with(|| t1.elapsed());
            }
        }
        if i >= warmup {
            via_grpc.push(ms(first.unwrap_or_default()));
            via_dbus.push(ms(first_d.unwrap_or_default()));
        }
    }
    let (ml, mg, md) = (
        median(&mut local),
        median(&mut via_grpc),
        median(&mut via_dbus),
    );
    println!("model              {}", a.model.display());
    println!(
        "runs               {} (after {warmup} warm-up), threads {}",
        a.runs, a.threads
    );
    println!("ttft in-process    median {ml:.3} ms");
    println!("ttft via gRPC      median {mg:.3} ms  (+{:.3} ms)", mg - ml);
    println!(
        "ttft via D-Bus     median {md:.3} ms  (+{:.3} ms over in-process; target < 3 ms)",
        md - ml
    );

    if a.secs > 0 {
        soak(&a, &bus, &mut grpc).await?;
    }
    drop(grpc);
    drop(dbus);
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.stop()?;
    Ok(())
}

#[derive(Default, Debug)]
struct Tally {
    sent: u64,
    completed: u64,
    cancelled: u64,
    disconnected: u64,
    invalid_sent: u64,
    invalid_refused: u64,
    stalled: u64,
    errors: BTreeMap<String, u64>,
    tokens: u64,
}

const STALL: Duration = Duration::from_secs(120);

/// A request the daemon must refuse.
fn invalid(rng: &mut Rng) -> pb::GenerateRequest {
    let mut r = user_prompt("hello");
    match rng.range(0, 3) {
        0 => r.messages[0].role = "wizard".into(),
        1 => r.max_tokens = u32::MAX,
        _ => {
            r.sampling = Some(pb::Sampling {
                temperature: Some(-1.0),
                ..Default::default()
            })
        }
    }
    r
}

async fn client_loop(a: SoakArgs, idx: usize, until: Instant) -> Result<Tally> {
    let mut rng = Rng::new(a.seed ^ ((idx as u64 + 1) * 7919));
    let bus = Bus::Address(a.address.clone());
    let mut c = DbusClient::connect(bus.clone()).await?;
    let mut t = Tally::default();
    while Instant::now() < until {
        let bad = rng.range(1, 100) <= a.invalid;
        let r = if bad {
            t.invalid_sent += 1;
            invalid(&mut rng)
        } else {
            request(
                &format!("client {idx} request {} says hello", t.sent),
                rng.range(1, 128) as u32,
                rng.next_u64(),
            )
        };
        let roll = if bad { 101 } else { rng.range(1, 100) };
        let cancel_after = (roll <= a.cancel).then(|| rng.range(0, 10));
        let drop_after =
            (roll > a.cancel && roll <= a.cancel + a.disconnect).then(|| rng.range(0, 10));
        t.sent += 1;
        let mut g = match c.generate(r).await {
            Ok(g) => g,
            Err(e) => {
                if bad {
                    t.invalid_refused += 1;
                }
                *t.errors.entry(format!("{:?}", e.code())).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if bad {
            bail!("client {idx}: an invalid request was queued");
        }
        let mut seen = 0u64;
        loop {
            if cancel_after == Some(seen) {
                g.cancel().await?;
                // Cancel ends the stream with CANCELLED.
                match tokio::time::timeout(STALL, async {
                    loop {
                        match g.message().await {
                            Ok(Some(_)) => continue,
                            other => return other,
                        }
                    }
                })
                .await
                {
                    Ok(_) => t.cancelled += 1,
                    Err(_) => t.stalled += 1,
                }
                break;
            }
            if drop_after == Some(seen) {
                // The whole bus connection goes away mid-stream.
                drop(g);
                c = DbusClient::connect(bus.clone()).await?;
                t.disconnected += 1;
                break;
            }
            match tokio::time::timeout(STALL, g.message()).await {
                Err(_) => {
                    t.stalled += 1;
                    break;
                }
                Ok(Ok(Some(m))) => {
                    seen += 1;
                    match m.event {
                        Some(Event::Delta(dl)) => t.tokens += dl.token_ids.len() as u64,
                        Some(Event::Finished(_)) => {
                            t.completed += 1;
                            break;
                        }
                        _ => {}
                    }
                }
                Ok(Ok(None)) => {
                    *t.errors.entry("ended without Finished".into()).or_default() += 1;
                    break;
                }
                Ok(Err(e)) => {
                    *t.errors
                        .entry(format!("{:?} mid-stream", e.code()))
                        .or_default() += 1;
                    break;
                }
            }
        }
    }
    Ok(t)
}

#[derive(Clone)]
struct SoakArgs {
    address: String,
    seed: u64,
    cancel: u64,
    disconnect: u64,
    invalid: u64,
}

async fn soak(a: &Args, bus: &PrivateBus, grpc: &mut gemmad_client::Client) -> Result<()> {
    let sa = SoakArgs {
        address: bus.address().to_string(),
        seed: a.seed,
        cancel: a.cancel_percent,
        disconnect: a.disconnect_percent,
        invalid: a.invalid_percent,
    };
    let before = grpc.status().await?.requests.unwrap_or_default();
    let until = Instant::now() + Duration::from_secs(a.secs);
    let tasks: Vec<_> = (0..a.clients)
        .map(|i| tokio::spawn(client_loop(sa.clone(), i, until)))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await??;
        all.sent += t.sent;
        all.completed += t.completed;
        all.cancelled += t.cancelled;
        all.disconnected += t.disconnected;
        all.invalid_sent += t.invalid_sent;
        all.invalid_refused += t.invalid_refused;
        all.stalled += t.stalled;
        all.tokens += t.tokens;
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    // Let the daemon finish the cancels of the last disconnects.
    let end = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = grpc.status().await?;
        let q = st.queue.unwrap_or_default();
        if (q.waiting == 0 && !q.running) || Instant::now() > end {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = st.requests.unwrap_or_default();
    let q = st.queue.unwrap_or_default();
    let admitted = after.admitted - before.admitted;
    let ended = (after.completed - before.completed)
        + (after.cancelled - before.cancelled)
        + (after.failed - before.failed);
    println!(
        "soak               {} D-Bus clients, {} s, cancel {}%, disconnect {}%, invalid {}%",
        a.clients, a.secs, a.cancel_percent, a.disconnect_percent, a.invalid_percent
    );
    println!(
        "client side        sent {}  completed {}  cancelled {}  disconnected {}  invalid {} (refused {})  stalled {}  tokens {}",
        all.sent,
        all.completed,
        all.cancelled,
        all.disconnected,
        all.invalid_sent,
        all.invalid_refused,
        all.stalled,
        all.tokens
    );
    println!("errors             {:?}", all.errors);
    println!(
        "daemon counters    admitted {admitted}  completed {}  cancelled {}  failed {}  rejected {}  (left waiting {}, running {})",
        after.completed - before.completed,
        after.cancelled - before.cancelled,
        after.failed - before.failed,
        after.rejected - before.rejected,
        q.waiting,
        q.running
    );
    let lost = admitted.saturating_sub(ended);
    println!(
        "lost               {lost} (admitted minus ended), stalled {}",
        all.stalled
    );
    if lost > 0 || all.stalled > 0 || q.waiting > 0 || q.running {
        bail!("requests were lost or stalled");
    }
    if all.invalid_refused != all.invalid_sent {
        bail!("an invalid request was not refused");
    }
    Ok(())
}
