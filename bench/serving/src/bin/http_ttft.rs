//! Time to first token through the OpenAI-compatible HTTP API against gRPC, on the same
//! `gemmad serve` (both over their Unix sockets, one kept-alive connection each, the
//! same prompt and seed, one token): prints the medians and their difference.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/http-ttft [--runs 20] [--model DIR] [--threads N]
//!
//! gRPC: from sending Generate to the first Delta. HTTP: from writing `POST
//! /v1/chat/completions` (`stream: true`) to the first content chunk (the role chunk
//! that comes before it is not a token).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemmad_bench_serving::{grpc_ttft, median, start_ttft_daemon, ttft_request, FIXTURE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = FIXTURE)]
    model: PathBuf,
    /// The gemmad binary (default: the harness's, gemmad_e2e::gemmad).
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value = "Tell me about the sea.")]
    prompt: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One streamed completion on a kept-alive connection: the time to its first content
/// chunk, then reads the rest of the response (to the chunked body's end).
async fn http_ttft(s: &mut tokio::net::UnixStream, body: &str) -> Result<Duration> {
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut b = [0u8; 8192];
    let mut first = None;
    loop {
        let n = s.read(&mut b).await?;
        if n == 0 {
            bail!(
                "the connection closed mid-response: {}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&buf);
        if first.is_none() && text.matches("chat.completion.chunk").count() >= 2 {
            first = Some(t0.elapsed());
        }
        if text.contains("data: [DONE]") && text.ends_with("\r\n0\r\n\r\n") {
            break;
        }
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n") {
            bail!("HTTP error: {text}");
        }
    }
    first.context("no content chunk")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let warmup = 3;
    let mut d = start_ttft_daemon(&a.model, a.threads, a.gemmad.as_deref())?;
    let mut c = d.client().await?;
    let r = ttft_request(&a.prompt);
    let body = serde_json::json!({
        "model": "full",
        "messages": [{"role": "user", "content": a.prompt}],
        "seed": 1, "max_tokens": 1, "stream": true,
    })
    .to_string();
    let mut h = tokio::net::UnixStream::connect(d.http_socket())
        .await
        .context("connecting to the HTTP socket")?;

    // Alternate the two, so that drift (heat, other load) hits both alike.
    let (mut grpc, mut http) = (Vec::new(), Vec::new());
    for i in 0..warmup + a.runs {
        let first = grpc_ttft(&mut c, &r).await?;
        let h_first = http_ttft(&mut h, &body).await?;
        if i >= warmup {
            grpc.push(ms(first));
            http.push(ms(h_first));
        }
    }
    drop(h);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.stop()?;
    let (mg, mh) = (median(&mut grpc), median(&mut http));
    println!("model            {}", a.model.display());
    println!(
        "runs             {} each (after {warmup} warm-up), alternating, threads {}, prompt cache off",
        a.runs, a.threads
    );
    println!("ttft via gRPC    median {mg:.3} ms");
    println!("ttft via HTTP    median {mh:.3} ms (first content chunk, SSE)");
    println!("HTTP - gRPC      {:.3} ms (median difference)", mh - mg);
    Ok(())
}
