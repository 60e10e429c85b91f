//! The prompt cache on a multi-turn chat through the daemon: a stateless client sends the
//! whole conversation each turn (a long system prompt, ~100 tokens of user text per turn,
//! ~100 generated), first with the cache off for every request, then on; then pins the
//! system prompt to the disk tier, restarts the daemon and runs the chat again. Prints
//! time to first token per turn (as the daemon measures it: from receipt to first token),
//! the cached prompt tokens, whether the tokens matched the cache-off run, and the RAM
//! and disk the cache holds against its budgets.
//!
//! cargo build --release -p gemmad -p gemmad-bench-serving
//! target/release/chat-bench --model DIR --quant q4_0 --cache-dir DIR [--turns 10]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemmad_bench_serving::Daemon;
use gemmad_client::{message, pb, text_part, Client, Generation};

#[derive(Parser)]
struct Args {
    /// The checkpoint folder (with a tokenizer).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "q4_0")]
    quant: String,
    /// cache_dir for the daemon (quantized weights, PLE cache, prompt-cache files); kept
    /// across the restart.
    #[arg(long)]
    cache_dir: PathBuf,
    #[arg(long)]
    gemmad: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// Tokens of the system prompt, of each user turn, generated per turn.
    #[arg(long, default_value_t = 1000)]
    system_tokens: usize,
    #[arg(long, default_value_t = 100)]
    user_tokens: usize,
    #[arg(long, default_value_t = 100)]
    gen_tokens: u32,
    /// Compute threads (0: all CPUs).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The disk tier's budget, bytes.
    #[arg(long, default_value_t = 4 << 30)]
    disk_bytes: u64,
}

const WORDS: &[&str] = &[
    "river", "stone", "quiet", "engine", "paper", "window", "garden", "signal", "orange",
    "distant", "market", "silver", "winter", "lantern", "harbor", "velvet", "copper", "meadow",
    "thunder", "pocket", "canyon", "violet", "marble", "feather", "compass", "island",
];

/// Words until the text is at least `tokens` tokens (the daemon's tokenizer counts).
async fn text_of(c: &mut Client, tokens: usize, salt: usize) -> Result<String> {
    let mut s = String::new();
    let mut i = salt;
    loop {
        for _ in 0..16 {
            s.push_str(WORDS[(i * 7 + i / 3) % WORDS.len()]);
            s.push(' ');
            i += 1;
        }
        if c.tokenize(&s, false).await?.ids.len() >= tokens {
            return Ok(s);
        }
    }
}

struct Turn {
    prompt: u32,
    cached: u32,
    ttft_ms: f64,
    prefill_ms: f64,
    tokens: Vec<u32>,
}

async fn chat(
    c: &mut Client,
    system: &str,
    users: &[String],
    gen: u32,
    cache: bool,
) -> Result<Vec<Turn>> {
    let mut history = vec![message("system", vec![text_part(system)])];
    let mut out = Vec::new();
    for (i, u) in users.iter().enumerate() {
        history.push(message("user", vec![text_part(u)]));
        let req = pb::GenerateRequest {
            messages: history.clone(),
            sampling: Some(pb::Sampling {
                seed: Some(1000 + i as u64),
                ..Default::default()
            }),
            max_tokens: gen,
            ignore_eos: true,
            cache_prompt: Some(cache),
            ..Default::default()
        };
        let g: Generation = c.generate_text(req).await?;
        let f = g.finished.clone().context("no Finished")?;
        let (u, t) = (f.usage.unwrap_or_default(), f.timings.unwrap_or_default());
        out.push(Turn {
            prompt: u.prompt_tokens,
            cached: u.cached_tokens,
            ttft_ms: t.time_to_first_token_ms,
            prefill_ms: t.prefill_ms,
            tokens: g.token_ids.clone(),
        });
        history.push(message("model", vec![text_part(&g.text)]));
    }
    Ok(out)
}

fn start(a: &Args) -> Result<Daemon> {
    let mut b = Daemon::builder()
        .model(&a.model)
        .config(format!(
            "[model]\nthreads = {}\nquant = \"{}\"\ncache_dir = \"{}\"\n\
             [limits]\nmax_tokens = 4096\nmax_prompt_bytes = 1048576\n\
             [cache]\ndisk_bytes = {}\n[governor]\nenabled = false\n\
             [log]\nlevel = \"warn\"\n",
            a.threads,
            a.quant,
            a.cache_dir.display(),
            a.disk_bytes
        ))
        .log_level("warn");
    if let Some(g) = &a.gemmad {
        b = b.gemmad(g);
    }
    b.start()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

async fn cache_line(c: &mut Client, when: &str) -> Result<()> {
    let s = c.status().await?;
    let p = s.prompt_cache.context("no prompt_cache in Status")?;
    let rss = s
        .memory
        .iter()
        .find(|m| m.part == "process_rss")
        .map_or(0, |m| m.bytes);
    println!(
        "{when}: prompt cache {:.1} MiB of {:.1} MiB in RAM ({} states), disk {:.1} MiB of {:.1} MiB ({} files); {} hits, {} tokens reused; process RSS {:.0} MiB",
        mib(p.ram_bytes),
        mib(p.ram_budget),
        p.entries,
        mib(p.disk_bytes),
        mib(p.disk_budget),
        p.disk_entries,
        p.hits,
        p.reused_tokens,
        mib(rss)
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut d = start(&a)?;
    let mut c = d.client().await?;
    let system = text_of(&mut c, a.system_tokens, 0).await?;
    // Conversation A (cache off, then on), B (another one, same system prompt) and C
    // (after the restart).
    let mut convs: Vec<Vec<String>> = Vec::new();
    for k in 0..3 {
        let mut users = Vec::new();
        for i in 0..a.turns {
            users.push(text_of(&mut c, a.user_tokens, 1 + i * 13 + k * 1000).await?);
        }
        convs.push(users);
    }
    let users = &convs[0];
    // Warm the weights' pages once (the first request of a fresh daemon pays them).
    chat(&mut c, "warm up", &users[..1], 4, false).await?;

    let off = chat(&mut c, &system, users, a.gen_tokens, false).await?;
    let on = chat(&mut c, &system, users, a.gen_tokens, true).await?;
    cache_line(&mut c, "after the chat with the cache on").await?;
    let other = chat(
        &mut c,
        &system,
        &convs[1][..a.turns.min(3)],
        a.gen_tokens,
        true,
    )
    .await?;
    cache_line(&mut c, "after (up to) 3 turns of another conversation").await?;

    let t = Instant::now();
    let pinned = c
        .cache_prompt(pb::CachePromptRequest {
            messages: vec![message("system", vec![text_part(&system)])],
            persist: true,
            ..Default::default()
        })
        .await?;
    println!(
        "pinned the system prompt: {} tokens, key {}, {:.0} ms",
        pinned.tokens,
        pinned.key,
        t.elapsed().as_secs_f64() * 1e3
    );
    let t0 = Instant::now();
    loop {
        let p = c.status().await?.prompt_cache.unwrap_or_default();
        if p.pinned.iter().any(|x| x.key == pinned.key && x.on_disk) {
            break;
        }
        if t0.elapsed().as_secs() > 120 {
            bail!("the pinned prompt was not written to disk");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cache_line(&mut c, "after pinning").await?;
    drop(c);
    d.stop()?;

    let mut d = start(&a)?;
    let mut c = d.client().await?;
    chat(&mut c, "warm up", &users[..1], 4, false).await?;
    let restarted = chat(&mut c, &system, &convs[2], a.gen_tokens, true).await?;
    cache_line(&mut c, "after the restart and a third conversation").await?;
    let c_off = chat(&mut c, &system, &convs[2][..1], a.gen_tokens, false).await?;
    drop(c);
    d.stop()?;

    println!("\nconversation A, the same requests with the cache off and on:");
    println!("turn | prompt tokens | TTFT off (ms) | cached tokens | TTFT on (ms) | same tokens");
    println!("---|---|---|---|---|---");
    for i in 0..a.turns {
        let (x, y) = (&off[i], &on[i]);
        println!(
            "{} | {} | {:.0} | {} | {:.0} | {}",
            i + 1,
            x.prompt,
            x.ttft_ms,
            y.cached,
            y.ttft_ms,
            x.tokens == y.tokens
        );
    }
    println!("\nthe first turn of a new conversation with the same system prompt:");
    println!("where from | prompt tokens | cached tokens | TTFT (ms)");
    println!("---|---|---|---");
    for (what, t) in [
        ("prefilled (A, cache off)", &off[0]),
        ("RAM (B, after A)", &other[0]),
        ("disk, after a restart (C)", &restarted[0]),
        ("prefilled (C, cache off)", &c_off[0]),
    ] {
        println!("{what} | {} | {} | {:.0}", t.prompt, t.cached, t.ttft_ms);
    }
    println!("\nconversation C after the restart:");
    println!("turn | prompt tokens | cached tokens | TTFT (ms)");
    println!("---|---|---|---");
    for (i, t) in restarted.iter().enumerate() {
        println!("{} | {} | {} | {:.0}", i + 1, t.prompt, t.cached, t.ttft_ms);
    }
    let sum = |v: &[Turn]| v.iter().map(|t| t.ttft_ms).sum::<f64>();
    let pre = |v: &[Turn]| v.iter().map(|t| t.prefill_ms).sum::<f64>();
    println!(
        "\ntotal TTFT: off {:.0} ms, on {:.0} ms, after restart {:.0} ms (prefill {:.0} / {:.0} / {:.0} ms)",
        sum(&off),
        sum(&on),
        sum(&restarted),
        pre(&off),
        pre(&on),
        pre(&restarted)
    );
    if off.iter().zip(&on).any(|(x, y)| x.tokens != y.tokens)
        || c_off[0].tokens != restarted[0].tokens
    {
        bail!("the cache changed the output");
    }
    Ok(())
}
