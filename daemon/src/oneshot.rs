//! One-shot subcommands that run the engine in this process: `gemmad generate` and
//! `gemmad logits`. They print their results; they are tools, not the service path.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemmad_engine::{ChatMessage, Engine, GenerateRequest, LoadOptions, Prompt, SamplingParams};

/// Options shared by the subcommands that load a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint folder as downloaded from the Hugging Face Hub, or a repo id
    /// (`google/gemma-3n-E2B-it`) pulled into the model store with `gemmad pull`.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: PathBuf,
    /// Compute threads (default: all CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context length in tokens (default: the model's maximum).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Weight storage: f32, bf16 (the checkpoint's own), q8_0, q4_0, q4_k.
    #[arg(long, default_value = "bf16")]
    pub quant: gemmad_engine::QuantType,
    /// Directory for derived files (quantized weights, PLE cache).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Instruction set the kernels may use: auto, avx512, avxvnni, avx2, neondot, neon,
    /// scalar.
    #[arg(long, env = "GEMMAD_ISA", default_value = "auto")]
    pub isa: gemmad_engine::IsaChoice,
    /// Repack quantized matrices for the fast kernels; 0 keeps the row layout.
    #[arg(long, env = "GEMMAD_PACK", default_value_t = 1, value_name = "0|1")]
    pub pack: u8,
    /// MatFormer slicing file (Google's configs.csv format): its slices are offered
    /// besides the whole checkpoint and, for E4B-shaped checkpoints, the official table.
    #[arg(long, value_name = "FILE")]
    pub matformer_config: Option<PathBuf>,
    /// The MatFormer slice to run (default: the whole checkpoint, `full`).
    #[arg(long, value_name = "NAME")]
    pub slice: Option<String>,
}

impl ModelArgs {
    fn load(&self) -> Result<Engine> {
        let dir = crate::pull::resolve_model(&self.model)?;
        Engine::load(
            &dir,
            LoadOptions {
                max_context: self.max_context,
                threads: self.threads,
                quant: self.quant,
                cache_dir: self.cache_dir.clone(),
                isa: self.isa,
                pack: self.pack != 0,
                matformer_config: self.matformer_config.clone(),
                slice: self.slice.clone(),
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot load the model from {}", dir.display()))
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample among the K likeliest tokens; 0 disables.
    #[arg(long, value_name = "K", default_value_t = 64)]
    pub top_k: usize,
    /// Sample among the likeliest tokens whose probabilities add up to P.
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the likeliest one; 0 disables.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens already in the context; 1 disables.
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// RNG seed (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// System prompt (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    /// Tokenize the prompt as plain text instead of applying the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print usage and timings to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// The prompt.
    pub prompt: String,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let mut engine = a.model.load()?;
    let prompt = if a.raw || !engine.tokenizer().is_ok_and(|t| t.has_chat_template()) {
        Prompt::Text(a.prompt.clone())
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::text("system", s));
        }
        msgs.push(ChatMessage::text("user", &a.prompt));
        Prompt::Chat(msgs)
    };
    let req = GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        slice: None,
        ignore_eos: a.ignore_eos,
        cancel: None,
        user: None,
        cache_prompt: true,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let res = engine.generate(&req, &mut |ev| {
        if let Err(e) = out.write_all(ev.text.as_bytes()).and_then(|_| out.flush()) {
            write_err = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    if a.stats {
        let t = res.timings;
        eprintln!(
            "finish={} prompt_tokens={} completion_tokens={} ttft_ms={:.1} prefill_tok_s={:.1} decode_tok_s={:.2}",
            res.finish_reason.as_str(),
            res.usage.prompt_tokens,
            res.usage.completion_tokens,
            t.time_to_first_token.as_secs_f64() * 1e3,
            t.prefill_tokens_per_s,
            t.decode_tokens_per_s
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. `2,105,2364`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// Output .npy file: f32, shape [T, vocab], C order.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    if a.ids.is_empty() {
        bail!("--ids is empty");
    }
    let mut engine = a.model.load()?;
    let vocab = engine.config().text.vocab_size;
    let logits = engine.logits(&a.ids)?;
    write_npy_f32(&a.out, &[a.ids.len(), vocab], &logits)
        .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}

/// Writes a C-order little-endian f32 array in NumPy's .npy format (version 1.0).
fn write_npy_f32(path: &std::path::Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // magic(6) + version(2) + len(2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len() * 4);
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let tmp = path.with_extension("npy.tmp");
    std::fs::write(&tmp, &buf)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct PleCacheArgs {
    /// Checkpoint folder, or a repo id pulled into the model store.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: PathBuf,
    /// Cache directory (the daemon's `model.cache_dir`).
    #[arg(long, value_name = "DIR", default_value = "/var/cache/gemmad")]
    pub cache_dir: PathBuf,
    /// Row type: raw (the checkpoint's own rows; exact, the daemon's), or whole
    /// precomputed per-layer inputs in f32, f16, bf16 or q8_0 (approximate).
    #[arg(long, default_value = "raw")]
    pub dtype: gemmad_engine::RowDType,
}

/// Builds the PLE cache, drawing a progress bar on stderr; Ctrl-C leaves no partial file.
pub fn ple_cache(a: PleCacheArgs) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_sigint(_: nix::libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        );
    }
    let model = crate::pull::resolve_model(&a.model)?;
    let t0 = std::time::Instant::now();
    let mut last = 0u64;
    let report =
        gemmad_engine::build_ple_cache(&model, &a.cache_dir, a.dtype, &mut |done, total| {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            if pct != last || done == total {
                last = pct;
                let bar = "#".repeat((pct / 2) as usize);
                let eta = if done > 0 {
                    t0.elapsed().as_secs_f64() * (total - done) as f64 / done as f64
                } else {
                    0.0
                };
                eprint!("\r[{bar:<50}] {pct:3}%  {done}/{total} rows  eta {eta:.0} s ");
            }
            if STOP.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .with_context(|| format!("building the PLE cache of {}", model.display()))?;
    eprintln!();
    println!(
        "{} ({} rows, {} bytes, {}) built in {:.1} s",
        report.path.display(),
        report.rows,
        report.file_bytes,
        report.dtype,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}
