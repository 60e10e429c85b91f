//! gemmactl: talk to gemmad from the command line, over its socket (gRPC) or over D-Bus.

use std::io::Write;

use std::path::PathBuf;
use tokio::io::AsyncBufReadExt;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gemmad_client::dbus::{Bus, DbusClient};
use gemmad_client::{
    describe, finish_reason_str, image_part, message, pb, text_part, wav_part, Client, ClientError,
    Generation, ServingStatus,
};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "gemmactl",
    version,
    about = "Command-line client of the gemmad service"
)]
struct Cli {
    /// gemmad's Unix socket.
    #[arg(long, global = true, env = "GEMMAD_SOCKET", default_value = gemmad_client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Reach gemmad over D-Bus instead of its socket: `system`, `session`, a D-Bus address
    /// (unix:path=...), or `off` (the socket, the default).
    #[arg(long, global = true, env = "GEMMAD_DBUS", value_name = "BUS", value_parser = parse_dbus)]
    dbus: Option<DbusChoice>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Debug)]
enum DbusChoice {
    Off,
    On(Bus),
}

fn parse_dbus(s: &str) -> Result<DbusChoice, String> {
    match s {
        "off" | "" => Ok(DbusChoice::Off),
        bus => bus
            .parse()
            .map(DbusChoice::On)
            .map_err(|e| format!("{e}, or off")),
    }
}

/// gemmad over either transport, so that each subcommand has one code path.
enum Conn {
    Grpc(Box<Client>),
    Dbus(DbusClient),
}

/// Runs the same call on whichever client `$conn` holds.
macro_rules! on_either {
    ($conn:expr, $c:ident => $call:expr) => {
        match $conn {
            Conn::Grpc($c) => $call,
            Conn::Dbus($c) => $call,
        }
    };
}

impl Conn {
    async fn connect(cli: &Cli) -> Result<Conn, ClientError> {
        match &cli.dbus {
            Some(DbusChoice::On(bus)) => Ok(Conn::Dbus(DbusClient::connect(bus.clone()).await?)),
            None | Some(DbusChoice::Off) => {
                Ok(Conn::Grpc(Box::new(Client::connect(&cli.socket).await?)))
            }
        }
    }

    async fn generate_with(
        &mut self,
        req: pb::GenerateRequest,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, ClientError> {
        on_either!(self, c => c.generate_with(req, on_text).await)
    }

    async fn status(&mut self) -> Result<pb::StatusResponse, ClientError> {
        on_either!(self, c => c.status().await)
    }

    async fn tokenize(
        &mut self,
        text: &str,
        special: bool,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        on_either!(self, c => c.tokenize(text, special).await)
    }

    async fn detokenize(&mut self, ids: Vec<u32>) -> Result<String, ClientError> {
        on_either!(self, c => c.detokenize(ids).await)
    }

    async fn list_slices(&mut self) -> Result<Vec<pb::Slice>, ClientError> {
        on_either!(self, c => c.list_slices().await)
    }

    async fn set_slice(&mut self, name: &str, force: bool) -> Result<pb::Slice, ClientError> {
        on_either!(self, c => c.set_slice(name, force).await)
    }

    async fn governor_pin(&mut self, tier: Option<&str>) -> Result<(), ClientError> {
        on_either!(self, c => c.governor_pin(tier).await)
    }

    async fn load_modality(&mut self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        on_either!(self, c => c.load_modality(m).await)
    }

    async fn cache_prompt(
        &mut self,
        req: pb::CachePromptRequest,
    ) -> Result<pb::CachedPrompt, ClientError> {
        on_either!(self, c => c.cache_prompt(req).await)
    }

    async fn drop_cached_prompt(&mut self, key: &str) -> Result<(), ClientError> {
        on_either!(self, c => c.drop_cached_prompt(key).await)
    }

    async fn unload_modality(&mut self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        on_either!(self, c => c.unload_modality(m).await)
    }

    async fn health(&mut self) -> Result<ServingStatus, ClientError> {
        on_either!(self, c => c.health("").await)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a reply to one prompt, streaming it to the terminal.
    Generate(GenerateArgs),
    /// Interactive multi-turn chat (/help lists its commands; /quit or Ctrl-D ends it).
    Chat(SamplingArgs),
    /// What the daemon is doing: model, slice, memory, queue.
    Status(JsonFlag),
    /// Token ids of a text.
    Tokenize(TokenizeArgs),
    /// Text of token ids.
    Detokenize(DetokenizeArgs),
    /// The model sizes (MatFormer slices) on offer.
    Slices(JsonFlag),
    /// Switch the model size (MatFormer slice) requests run on.
    SetSlice(SetSliceArgs),
    /// The governor: `pin TIER` (full, balanced, saver, critical) or `unpin`.
    #[command(subcommand)]
    Governor(GovernorCmd),
    /// Load a tower (vision or audio) and page its weights in.
    Load(ModalityArgs),
    /// Unload a tower and drop its pages.
    Unload(ModalityArgs),
    /// The health check (gRPC's, or over D-Bus a Peer.Ping); exit status 0 when serving.
    Health,
    /// Keep a prompt prefix warm in the prompt cache (a system prompt, a document):
    /// prefilled now, resumed by every later request that starts with it.
    CachePrompt(CachePromptArgs),
    /// Unpin and drop a cached prompt by key (`--all`: every one you may drop).
    DropCachedPrompt(DropCachedPromptArgs),
    /// Stop the daemon as SIGTERM does (admins: root, gemmad's own user, admin groups).
    Shutdown,
    /// Print a shell completion script: `gemmactl completions bash > ~/.local/share/bash-completion/completions/gemmactl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (gemmactl.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
    },
    /// Have the daemon download a checkpoint from the Hugging Face Hub into its model
    /// store (admins; gRPC only). Serve it with `gemmad serve --model REPO`.
    Pull(PullArgs),
}

#[derive(Args, Debug)]
struct PullArgs {
    /// Hugging Face repo id, e.g. google/gemma-3n-E2B-it.
    repo: String,
    /// Branch, tag or commit (default: main).
    #[arg(long, default_value = "")]
    revision: String,
}

#[derive(Args, Debug)]
struct CachePromptArgs {
    /// The system prompt to keep warm: what every conversation starting with it shares.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    system: Option<String>,
    /// Read the system prompt from this file ("-": stdin).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Every user's requests may resume it (admins only).
    #[arg(long)]
    shared: bool,
    /// Also write it to the disk tier, to survive a restart (cache.disk_bytes).
    #[arg(long)]
    persist: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DropCachedPromptArgs {
    /// The key `cache-prompt` or `status` printed.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    key: Option<String>,
    /// Every pinned prompt you may drop.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum GovernorCmd {
    /// Hold the governor at a tier (admins), for diagnosis.
    Pin {
        /// full, balanced, saver or critical.
        tier: String,
    },
    /// Let the readings decide again.
    Unpin,
}

#[derive(Args, Debug)]
struct SetSliceArgs {
    /// A slice name from `gemmactl slices`.
    name: String,
    /// Switch the running generation too (it re-prefills on the new slice) instead of
    /// waiting for it to end.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct ModalityArgs {
    /// vision (or image) or audio.
    #[arg(value_parser = parse_modality)]
    modality: pb::Modality,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_modality(s: &str) -> Result<pb::Modality, String> {
    match s.to_ascii_lowercase().as_str() {
        "vision" | "image" => Ok(pb::Modality::Vision),
        "audio" => Ok(pb::Modality::Audio),
        other => Err(format!("unknown modality `{other}` (vision, audio)")),
    }
}

fn print_tower(t: &pb::Tower, json_out: bool) {
    if json_out {
        println!(
            "{}",
            json!({"modality": modality_str(t.modality), "available": t.available,
                   "loaded": t.loaded, "bytes": t.bytes})
        );
    } else {
        let state = if t.loaded { "loaded" } else { "not loaded" };
        println!("{} {state} ({})", modality_str(t.modality), mib(t.bytes));
    }
}

#[derive(Args, Debug)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// Maximum tokens to generate (default: the daemon's).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// RNG seed: same seed, same output.
    #[arg(long)]
    seed: Option<u64>,
    /// 0 = greedy (default: the model's, 1.0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the K likeliest tokens; 0 = no limit (default: the model's, 64).
    #[arg(long, value_name = "K")]
    top_k: Option<u32>,
    /// Sample among the likeliest tokens whose probabilities add up to P (default 0.95).
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the likeliest one; 0 = off (default).
    #[arg(long, value_name = "P")]
    min_p: Option<f32>,
    /// Penalize tokens already in the context; 1 = off (default).
    #[arg(long, value_name = "X")]
    repetition_penalty: Option<f32>,
    /// Stop when this string appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Model size: "auto" or a slice name from `gemmactl slices`.
    #[arg(long)]
    size: Option<String>,
    /// Run behind interactive requests.
    #[arg(long)]
    background: bool,
    /// Prefill the whole prompt and keep nothing in the prompt cache (the output is the
    /// same; only slower).
    #[arg(long)]
    no_prompt_cache: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Attach an image (PNG/JPEG; repeatable).
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// Attach audio (WAV; repeatable).
    #[arg(long, value_name = "FILE")]
    audio: Vec<PathBuf>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Print usage and timings to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// The prompt; "-" reads it from stdin.
    prompt: String,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    /// Add special tokens (a leading <bos>).
    #[arg(long)]
    special: bool,
    /// Print JSON (ids, count, context) instead of text.
    #[arg(long)]
    json: bool,
    /// The text to tokenize.
    text: String,
}

#[derive(Args, Debug)]
struct DetokenizeArgs {
    /// Comma-separated ids, e.g. 2,105,2364.
    #[arg(value_delimiter = ',', required = true)]
    ids: Vec<u32>,
}

impl SamplingArgs {
    fn request(&self, messages: Vec<pb::Message>) -> pb::GenerateRequest {
        pb::GenerateRequest {
            messages,
            sampling: Some(pb::Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            }),
            max_tokens: self.max_tokens.unwrap_or(0),
            stop: self.stop.clone(),
            size: self.size.clone().unwrap_or_default(),
            priority: if self.background {
                pb::Priority::Background
            } else {
                pb::Priority::Interactive
            } as i32,
            ignore_eos: false,
            cache_prompt: self.no_prompt_cache.then_some(false),
        }
    }

    fn system_message(&self) -> Option<pb::Message> {
        self.system
            .as_deref()
            .map(|s| message("system", vec![text_part(s)]))
    }
}

fn timings_json(g: &Generation) -> Value {
    let f = g.finished.clone().unwrap_or_default();
    let u = f.usage.unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    json!({
        "request_id": g.request_id,
        "text": g.text,
        "token_ids": g.token_ids,
        "finish_reason": finish_reason_str(f.finish_reason),
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "cached_tokens": u.cached_tokens},
        "timings": {
            "queue_wait_ms": t.queue_wait_ms,
            "time_to_first_token_ms": t.time_to_first_token_ms,
            "prefill_ms": t.prefill_ms,
            "prefill_tokens_per_s": t.prefill_tokens_per_s,
            "decode_ms": t.decode_ms,
            "decode_tokens_per_s": t.decode_tokens_per_s,
            "active_slice": t.active_slice,
        },
    })
}

fn print_stats(g: &Generation) {
    let f = g.finished.clone().unwrap_or_default();
    let u = f.usage.unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    eprintln!(
        "finish={} prompt_tokens={} cached_tokens={} completion_tokens={} queue_ms={:.1} ttft_ms={:.1} decode_tok_s={:.1} slice={}",
        finish_reason_str(f.finish_reason),
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        t.queue_wait_ms,
        t.time_to_first_token_ms,
        t.decode_tokens_per_s,
        t.active_slice
    );
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
    Ok(s)
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn generate(c: &mut Conn, a: GenerateArgs) -> Result<()> {
    let prompt = if a.prompt == "-" {
        read_stdin()?
    } else {
        a.prompt.clone()
    };
    let mut parts = Vec::new();
    for f in &a.image {
        parts.push(image_part(read(f)?));
    }
    for f in &a.audio {
        parts.push(wav_part(read(f)?));
    }
    parts.push(text_part(&prompt));
    let mut messages: Vec<_> = a.sampling.system_message().into_iter().collect();
    messages.push(message("user", parts));
    let req = a.sampling.request(messages);
    let json = a.json;
    let stdout = std::io::stdout();
    let g = c
        .generate_with(req, |t| {
            if !json {
                let mut o = stdout.lock();
                let _ = o.write_all(t.as_bytes());
                let _ = o.flush();
            }
        })
        .await?;
    if json {
        println!("{}", timings_json(&g));
    } else {
        println!();
    }
    if a.stats {
        print_stats(&g);
    }
    Ok(())
}

const CHAT_HELP: &str = "\
/help    this list
/reset   forget the conversation (keeps --system)
/quit    end the chat (also /exit, Ctrl-D)
//text   send a line that starts with a slash";

async fn chat(c: &mut Conn, a: SamplingArgs) -> Result<()> {
    let mut history: Vec<pb::Message> = a.system_message().into_iter().collect();
    // Read stdin asynchronously: the connection keeps answering the daemon meanwhile.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    eprintln!("Chatting with gemmad. /help lists the commands; Ctrl-D or /quit ends.");
    loop {
        eprint!("> ");
        let Some(line) = lines.next_line().await? else {
            // Ctrl-D: end the prompt's line so the shell's starts on its own.
            eprintln!();
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(usize::from(a.system.is_some()));
                eprintln!("(conversation forgotten)");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{CHAT_HELP}");
                continue;
            }
            cmd if cmd.starts_with('/') && !cmd.starts_with("//") => {
                eprintln!(
                    "unknown command {cmd}; /help lists them (start a line with // to send a /)"
                );
                continue;
            }
            _ => {}
        }
        // "//text" sends "/text".
        let line = line
            .strip_prefix('/')
            .filter(|l| l.starts_with('/'))
            .unwrap_or(line);
        history.push(message("user", vec![text_part(line)]));
        let stdout = std::io::stdout();
        let r = c
            .generate_with(a.request(history.clone()), |t| {
                let mut o = stdout.lock();
                let _ = o.write_all(t.as_bytes());
                let _ = o.flush();
            })
            .await;
        println!();
        match r {
            Ok(g) => history.push(message("model", vec![text_part(&g.text)])),
            Err(e) => {
                history.pop();
                eprintln!("gemmactl: {e}");
            }
        }
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn modality_str(m: i32) -> &'static str {
    match pb::Modality::try_from(m) {
        Ok(pb::Modality::Vision) => "vision",
        Ok(pb::Modality::Audio) => "audio",
        _ => "unspecified",
    }
}

async fn status(c: &mut Conn, json_out: bool) -> Result<()> {
    let s = c.status().await?;
    let m = s.model.clone().unwrap_or_default();
    let q = s.queue.unwrap_or_default();
    let r = s.requests.unwrap_or_default();
    let n = s.connections.unwrap_or_default();
    if json_out {
        let v = json!({
            "version": s.version,
            "uptime_s": s.uptime_s,
            "model": {"dir": m.dir, "model_type": m.model_type, "layers": m.layers,
                      "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
                      "context_tokens": m.context_tokens, "quant": m.quant,
                      "kernels": m.kernels, "threads": m.threads, "isa": m.isa,
                      "pack": m.pack},
            "active_slice": s.active_slice,
            "towers": s.towers.iter().map(|t| json!({"modality": modality_str(t.modality),
                "available": t.available, "loaded": t.loaded, "bytes": t.bytes})).collect::<Vec<_>>(),
            "memory": s.memory.iter().map(|p| (p.part.clone(), json!(p.bytes))).collect::<serde_json::Map<_, _>>(),
            "queue": {"waiting": q.waiting, "waiting_interactive": q.waiting_interactive,
                      "waiting_background": q.waiting_background, "running": q.running,
                      "depth": q.depth, "per_peer": q.per_peer},
            "requests": {"admitted": r.admitted, "completed": r.completed, "cancelled": r.cancelled,
                         "failed": r.failed, "rejected": r.rejected},
            "connections": {"open": n.open, "accepted": n.accepted, "refused": n.refused,
                            "over_limit": n.over_limit, "accept_errors": n.accept_errors,
                            "max_per_uid": n.max_per_uid, "max_total": n.max_total},
            "governor": s.governor.map(|g| json!({"tier": g.tier, "pinned": g.pinned,
                "transitions": g.transitions, "actions_applied": g.actions_applied,
                "last_actions": g.last_actions,
                "readings": g.readings.iter().map(|x| json!({"name": x.name, "value": x.value, "unit": x.unit})).collect::<Vec<_>>()})),
            "warnings": s.warnings,
            "prompt_cache": s.prompt_cache.as_ref().map(|p| json!({"enabled": p.enabled,
                "ram_bytes": p.ram_bytes, "ram_budget": p.ram_budget, "entries": p.entries,
                "disk_bytes": p.disk_bytes, "disk_budget": p.disk_budget,
                "disk_entries": p.disk_entries, "hits": p.hits,
                "reused_tokens": p.reused_tokens,
                "pinned": p.pinned.iter().map(cached_prompt_json).collect::<Vec<_>>()})),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("gemmad {} up {:.0} s", s.version, s.uptime_s);
    println!(
        "model    {} ({}, {} layers, hidden {}, vocab {}, context {} tokens)",
        m.dir, m.model_type, m.layers, m.hidden_size, m.vocab_size, m.context_tokens
    );
    println!(
        "engine   {} weights, {} kernels (isa {}, {}), {} threads",
        m.quant,
        m.kernels,
        m.isa,
        if m.pack { "packed" } else { "row layout" },
        m.threads
    );
    println!("slice    {}", s.active_slice);
    for t in &s.towers {
        let state = match (t.available, t.loaded) {
            (_, true) => format!("loaded ({})", mib(t.bytes)),
            (true, false) => "available, not loaded".into(),
            (false, _) => "not available".into(),
        };
        println!("tower    {:<7}{state}", modality_str(t.modality));
    }
    let width = s.memory.iter().map(|p| p.part.len()).max().unwrap_or(0) + 2;
    for p in &s.memory {
        println!("memory   {:<width$}{:>12}", p.part, mib(p.bytes));
    }
    println!(
        "queue    {} waiting ({} interactive, {} background), {}; depth {}, per peer {}",
        q.waiting,
        q.waiting_interactive,
        q.waiting_background,
        if q.running { "one running" } else { "idle" },
        q.depth,
        q.per_peer
    );
    println!(
        "requests {} admitted, {} completed, {} cancelled, {} failed, {} rejected",
        r.admitted, r.completed, r.cancelled, r.failed, r.rejected
    );
    println!(
        "conns    {} open (at most {}, {} per uid); {} accepted, {} refused, {} over a limit, {} accept errors",
        n.open, n.max_total, n.max_per_uid, n.accepted, n.refused, n.over_limit, n.accept_errors
    );
    if let Some(p) = &s.prompt_cache {
        if p.enabled {
            let disk = if p.disk_budget > 0 {
                format!(
                    "; disk {} of {} in {} files",
                    mib(p.disk_bytes),
                    mib(p.disk_budget),
                    p.disk_entries
                )
            } else {
                "; no disk tier".into()
            };
            println!(
                "prompts  {} of {} in RAM, {} kept{disk}; {} hits, {} tokens reused",
                mib(p.ram_bytes),
                mib(p.ram_budget),
                p.entries,
                p.hits,
                p.reused_tokens
            );
            for c in &p.pinned {
                println!("         {}", cached_prompt_line(c));
            }
        } else {
            println!("prompts  cache off");
        }
    }
    match s.governor {
        Some(g) => {
            let pinned = if g.pinned.is_empty() {
                String::new()
            } else {
                format!(" (pinned {})", g.pinned)
            };
            println!(
                "governor tier {}{pinned}; {} transitions, {} actions",
                g.tier, g.transitions, g.actions_applied
            );
            for a in &g.last_actions {
                println!("         {a}");
            }
        }
        None => println!("governor (none)"),
    }
    for w in &s.warnings {
        println!("warning  {w}");
    }
    Ok(())
}

fn cached_prompt_json(c: &pb::CachedPrompt) -> Value {
    json!({"key": c.key, "tokens": c.tokens, "shared": c.shared, "uid": c.uid,
           "slice": c.slice, "ram_bytes": c.ram_bytes, "on_disk": c.on_disk})
}

fn cached_prompt_line(c: &pb::CachedPrompt) -> String {
    let owner = match (c.shared, c.uid) {
        (true, _) => "shared".to_string(),
        (false, Some(u)) => format!("uid {u}"),
        (false, None) => "local".to_string(),
    };
    let place = match (c.ram_bytes > 0, c.on_disk) {
        (true, true) => format!("{} in RAM, on disk", mib(c.ram_bytes)),
        (true, false) => format!("{} in RAM", mib(c.ram_bytes)),
        (false, true) => "on disk".to_string(),
        (false, false) => "evicted".to_string(),
    };
    format!(
        "pinned {} {} tokens, {owner}, slice {}, {place}",
        c.key, c.tokens, c.slice
    )
}

async fn cache_prompt(c: &mut Conn, a: CachePromptArgs) -> Result<()> {
    let system = match (&a.system, &a.file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) if f.as_os_str() == "-" => read_stdin()?,
        (None, Some(f)) => String::from_utf8(read(f)?)
            .with_context(|| format!("{} is not UTF-8 text", f.display()))?,
        (None, None) => anyhow::bail!("give --system TEXT or --file FILE"),
    };
    let p = c
        .cache_prompt(pb::CachePromptRequest {
            messages: vec![message("system", vec![text_part(&system)])],
            ids: Vec::new(),
            shared: a.shared,
            persist: a.persist,
        })
        .await?;
    if a.json {
        println!("{}", cached_prompt_json(&p));
    } else {
        println!("{}", cached_prompt_line(&p));
    }
    Ok(())
}

/// Pull through the daemon, printing its progress: a line per message when something
/// happened (a file done, a retry), byte counts at most every 2 s.
async fn pull(c: &mut Conn, a: PullArgs) -> Result<()> {
    let Conn::Grpc(c) = c else {
        return Err(ClientError::NotOnDbus("Pull".into()).into());
    };
    let mut last = std::time::Instant::now();
    let done = c
        .pull_with(&a.repo, &a.revision, |p| {
            if !p.message.is_empty() && p.installed_dir.is_empty() {
                eprintln!("{}", p.message);
            } else if p.total_bytes > 0 && last.elapsed().as_secs() >= 2 {
                last = std::time::Instant::now();
                eprintln!(
                    "{:3}%  {} of {} bytes ({})",
                    (p.done_bytes * 100)
                        .checked_div(p.total_bytes)
                        .unwrap_or(100),
                    p.done_bytes,
                    p.total_bytes,
                    p.file
                );
            }
        })
        .await?;
    println!(
        "{} {} at {} in {}",
        if done.already_installed {
            "already installed:"
        } else {
            "installed"
        },
        a.repo,
        done.commit,
        done.installed_dir
    );
    println!("serve it: gemmad serve --model {}", a.repo);
    Ok(())
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "gemmactl", &mut std::io::stdout());
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Man { out } => {
            write_man_pages(out)?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut c = Conn::connect(&cli).await?;
    match cli.command {
        Command::Generate(a) => generate(&mut c, a).await?,
        Command::Chat(a) => chat(&mut c, a).await?,
        Command::Status(a) => status(&mut c, a.json).await?,
        Command::Tokenize(a) => {
            let r = c.tokenize(&a.text, a.special).await?;
            if a.json {
                println!(
                    "{}",
                    json!({"ids": r.ids, "count": r.ids.len(), "context_tokens": r.context_tokens})
                );
            } else {
                let ids: Vec<String> = r.ids.iter().map(u32::to_string).collect();
                println!("{}", ids.join(","));
                eprintln!("{} tokens (context {})", r.ids.len(), r.context_tokens);
            }
        }
        Command::Detokenize(a) => println!("{}", c.detokenize(a.ids).await?),
        Command::Slices(a) => {
            let slices = c.list_slices().await?;
            if a.json {
                let v: Vec<Value> = slices
                    .iter()
                    .map(|s| json!({"name": s.name, "active": s.active, "layers": s.layers, "ffn_widths": s.ffn_widths, "params": s.params}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for s in slices {
                    let mark = if s.active { "*" } else { " " };
                    println!(
                        "{mark} {:<10} {} layers, FFN widths {:?}, {} parameters",
                        s.name, s.layers, s.ffn_widths, s.params
                    );
                }
            }
        }
        Command::Governor(g) => {
            match &g {
                GovernorCmd::Pin { tier } => c.governor_pin(Some(tier)).await?,
                GovernorCmd::Unpin => c.governor_pin(None).await?,
            }
            let st = c.status().await?;
            if let Some(gov) = st.governor {
                println!(
                    "governor tier: {}{}",
                    gov.tier,
                    if gov.pinned.is_empty() {
                        String::new()
                    } else {
                        format!(" (pinned: {})", gov.pinned)
                    }
                );
            }
        }
        Command::SetSlice(a) => {
            let s = c.set_slice(&a.name, a.force).await?;
            println!(
                "active slice: {} ({} layers, {} parameters)",
                s.name, s.layers, s.params
            );
        }
        Command::CachePrompt(a) => cache_prompt(&mut c, a).await?,
        Command::DropCachedPrompt(a) => {
            c.drop_cached_prompt(a.key.as_deref().unwrap_or("")).await?;
        }
        Command::Shutdown => {
            on_either!(&mut c, c => c.shutdown().await)?;
            eprintln!("gemmad is shutting down");
        }
        // Answered above, without a connection.
        Command::Completions { .. } | Command::Man { .. } => {}
        Command::Load(a) => print_tower(&c.load_modality(a.modality).await?, a.json),
        Command::Unload(a) => print_tower(&c.unload_modality(a.modality).await?, a.json),
        Command::Pull(a) => pull(&mut c, a).await?,
        Command::Health => {
            let st = c.health().await?;
            println!("{}", st.as_str_name());
            if st != ServingStatus::Serving {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Writes gemmactl.1 and a page per subcommand (gemmactl-generate.1, ...) into `out`.
fn write_man_pages(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, out)
        .with_context(|| format!("cannot write man pages into {}", out.display()))?;
    eprintln!("man pages written to {}", out.display());
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::Rpc(s)) => eprintln!("gemmactl: {}", describe(s)),
                _ => eprintln!("gemmactl: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument of every subcommand, with the path of subcommands leading to it,
    /// that has no help line.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let builtin = matches!(a.get_id().as_str(), "help" | "version");
            if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_name() != "help" {
                out.push(format!("{path} {} (the subcommand)", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_and_subcommand_has_a_help_line() {
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "gemmactl", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }
}
