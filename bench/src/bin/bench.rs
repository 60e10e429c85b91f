//! `bench --model DIR --quant bf16|q8_0|q4_0|q4_k --threads 2 [--prompt 512] [--gen 128]
//! [--contexts 4096,32768] [--json FILE] [--cache-dir DIR]`: load time, prefill and decode
//! tokens/s, RSS, this machine's memory read bandwidth measured in the same run, the
//! decode roofline efficiency, and the CPU time other processes took meanwhile.
//! See bench/README.md for what each figure means.

use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemmad_bench::membw;
use gemmad_bench::procfs::{self, CpuSnapshot, CpuUse};
use gemmad_bench::synth::WyRand;
use gemmad_engine::internals::{Checkpoint, EngineInternals, TensorView};
use gemmad_engine::{
    Engine, GenerateRequest, IsaChoice, LoadOptions, ModelConfig, PleMode, Prompt, QuantType,
    SamplingParams,
};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(name = "bench", about = "Gemma 3n CPU inference benchmark")]
struct Args {
    /// Checkpoint folder (e.g. one written by make-synthetic).
    #[arg(long, value_name = "DIR", required_unless_present = "membw_child")]
    model: Option<PathBuf>,
    /// Weight storage: f32, bf16, q8_0, q4_0, q4_k.
    #[arg(long, default_value = "bf16")]
    quant: QuantType,
    /// Compute threads (engine and bandwidth probe alike).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt length in tokens for the prefill figure.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens to generate after the prompt for the decode figure.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Context lengths at which to measure decode speed and KV-cache size.
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Tokens decoded after each --contexts prefill.
    #[arg(long, default_value_t = 32)]
    ctx_gen: usize,
    /// Write the JSON report here too (it always goes to stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Directory for derived files (quantized weights, PLE cache).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Per-layer inputs from: auto (the PLE cache file with --cache-dir, else the
    /// checkpoint's table), table, or cache (needs --cache-dir).
    #[arg(long, default_value = "auto")]
    ple: PleMode,
    /// Seed of the random prompt ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bandwidth probe buffer, GiB.
    #[arg(long, default_value_t = 2.0)]
    bw_gib: f64,
    /// Bandwidth probe passes (the best counts).
    #[arg(long, default_value_t = 5)]
    bw_passes: usize,
    /// Do not reload after warming the page cache even if the first load was cold.
    #[arg(long)]
    no_reload: bool,
    /// Kernel tier: auto, or a lower one to measure another CPU's kernels (scalar, avx2,
    /// avxvnni, avx512, neon, neondot).
    #[arg(long, env = "GEMMAD_ISA", default_value = "auto")]
    isa: IsaChoice,
    /// 0: keep ggml's row layout instead of packing quantized matrices (for comparisons).
    #[arg(long, env = "GEMMAD_PACK", default_value_t = 1)]
    pack: u8,
    /// MatFormer slicing file (configs.csv format) offered besides `full` and, for
    /// E4B-shaped checkpoints, the official table.
    #[arg(long, value_name = "FILE")]
    matformer_config: Option<PathBuf>,
    /// MatFormer slice to measure (default: the whole checkpoint).
    #[arg(long, value_name = "NAME")]
    slice: Option<String>,
    /// Load on this slice, run it, then switch to --slice (between requests) and measure
    /// RSS before and after: what switching down gives back.
    #[arg(long, value_name = "NAME")]
    switch_from: Option<String>,
    /// Time this many switches between --slice and --switch-from (or `full`), each
    /// between requests, and one forced switch in the middle of a generation.
    #[arg(long, default_value_t = 0)]
    switches: usize,
    /// Internal: run only the bandwidth probe and print its JSON (used as a child process
    /// so that its buffer does not count in the benchmark's peak RSS).
    #[arg(long, hide = true)]
    membw_child: bool,
}

fn gb(b: f64) -> f64 {
    b / 1e9
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Runs the bandwidth probe in a child process (its 2 GiB buffer would otherwise become
/// this process's peak RSS).
fn bandwidth(a: &Args) -> Result<Value> {
    let exe = std::env::current_exe().context("locate the bench executable")?;
    let out = std::process::Command::new(exe)
        .args([
            "--membw-child",
            "--threads",
            &a.threads.to_string(),
            "--bw-gib",
            &a.bw_gib.to_string(),
            "--bw-passes",
            &a.bw_passes.to_string(),
        ])
        .output()
        .context("run the bandwidth probe")?;
    if !out.status.success() {
        bail!(
            "bandwidth probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parse the bandwidth probe's output")
}

fn membw_child(a: &Args) -> Result<()> {
    let bytes = (a.bw_gib * (1u64 << 30) as f64) as usize;
    let b = membw::measure(bytes, a.threads, a.bw_passes)?;
    println!(
        "{}",
        json!({
            "best_bytes_per_s": b.best_bytes_per_s,
            "passes_bytes_per_s": b.passes,
            "buffer_bytes": b.buffer_bytes,
            "threads": b.threads,
            "huge_pages_advised": b.huge_pages_advised,
        })
    );
    Ok(())
}

/// File byte ranges of the tensors a decode step reads from the checkpoint: the text
/// decoder minus the PLE table (read a row per token). Warming these keeps load and
/// decode figures free of disk reads.
struct WarmSet {
    /// (file, start, end, mapped slice for mincore)
    ranges: Vec<(PathBuf, usize, usize)>,
    views: Vec<TensorView>,
    bytes: usize,
}

fn warm_set(dir: &Path) -> Result<WarmSet> {
    let ckpt = Checkpoint::open(dir)?;
    let mut names: Vec<String> = ckpt
        .tensor_names()
        .filter(|n| {
            ![
                "embed_tokens_per_layer",
                "vision_tower",
                "audio_tower",
                "embed_vision",
                "embed_audio",
            ]
            .iter()
            .any(|x| n.contains(x))
        })
        .map(str::to_string)
        .collect();
    names.sort();
    let mut views = Vec::new();
    for n in &names {
        let shape = ckpt.shape(n).context("tensor shape")?.to_vec();
        views.push(ckpt.get(n, &shape)?);
    }
    let mut ranges: Vec<(PathBuf, usize, usize)> = views
        .iter()
        .map(|v| (v.path.clone(), v.start, v.end))
        .collect();
    ranges.sort();
    // Merge adjacent ranges of a file.
    let mut merged: Vec<(PathBuf, usize, usize)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(m) if m.0 == r.0 && r.1 <= m.2 => m.2 = m.2.max(r.2),
            _ => merged.push(r),
        }
    }
    let bytes = merged.iter().map(|r| r.2 - r.1).sum();
    Ok(WarmSet {
        ranges: merged,
        views,
        bytes,
    })
}

impl WarmSet {
    fn resident(&self) -> Result<usize> {
        let mut s = 0;
        for v in &self.views {
            s += procfs::resident_in(v.bytes())?;
        }
        Ok(s)
    }

    /// Reads every byte into the page cache.
    fn touch(&self) -> Result<()> {
        let mut buf = vec![0u8; 8 << 20];
        for (path, start, end) in &self.ranges {
            let f =
                std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
            let mut off = *start;
            while off < *end {
                let n = buf.len().min(end - off);
                f.read_exact_at(&mut buf[..n], off as u64)
                    .with_context(|| format!("read {}", path.display()))?;
                off += n;
            }
        }
        std::hint::black_box(&buf);
        Ok(())
    }
}

fn random_prompt(len: usize, seed: u64, salt: u64) -> Vec<u32> {
    let mut rng = WyRand::new(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut ids: Vec<u32> = (0..len)
        .map(|_| (rng.next_u64() % 262_144) as u32)
        .collect();
    if let Some(first) = ids.first_mut() {
        *first = 2; // <bos>
    }
    ids
}

fn cpu_json(c: &CpuUse, ncpu: usize) -> Value {
    json!({
        "wall_s": c.wall_s,
        "own_cpu_s": c.own_cpu_s,
        "others_cpu_s": c.others_cpu_s,
        "steal_s": c.steal_s,
        "iowait_s": c.iowait_s,
        "others_share": c.others_share(ncpu),
    })
}

struct GenFigures {
    prefill_tokens: usize,
    prefill_s: f64,
    prefill_tps: f64,
    decode_tokens: usize,
    decode_s: f64,
    decode_tps: f64,
    cpu_prefill: CpuUse,
    cpu_decode: CpuUse,
    kv_bytes: usize,
    /// Bandwidth read by the probes taken during the decode (see [`Probe`]).
    bw_during: Vec<f64>,
}

/// A streaming read over the decode weights in place, taken every `every` decode
/// tokens from inside the generation (its time is taken out of the decode time). This
/// VM's memory speed changes on a scale of seconds (35 vs 63 GB/s), so only a probe
/// interleaved with the decode measures the bandwidth that decode had.
struct Probe {
    /// (address, length) of each region: the engine is mutably borrowed while it
    /// generates, so the regions cannot be held as slices.
    regions: Vec<(usize, usize)>,
    threads: usize,
    every: usize,
}

impl Probe {
    fn new(engine: &Engine, threads: usize, every: usize) -> Probe {
        let regions = engine
            .text_model()
            .decode_weight_regions()
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len()))
            .collect();
        Probe {
            regions,
            threads,
            every,
        }
    }

    /// The read over the regions, best of `passes`.
    fn read(&self, passes: usize) -> membw::Bandwidth {
        let slices: Vec<&[u8]> = self
            .regions
            .iter()
            // SAFETY: the engine owns these weights while the probe lives (it is dropped
            // before the engine) and nothing writes them.
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p as *const u8, n) })
            .collect();
        membw::measure_regions(&slices, self.threads, passes)
    }
}

/// One greedy generation from `ids` with EOS ignored; the first streamed token marks the
/// boundary between the prefill and decode CPU windows.
fn run_generation(
    engine: &mut Engine,
    ids: Vec<u32>,
    max_tokens: usize,
    probe: Option<&Probe>,
) -> Result<GenFigures> {
    let n = ids.len();
    let mut req = GenerateRequest::new(Prompt::Ids(ids));
    req.sampling = SamplingParams::greedy();
    req.max_tokens = max_tokens;
    req.ignore_eos = true;
    // Prefill figures: every run prefills the whole prompt.
    req.cache_prompt = false;
    let s0 = CpuSnapshot::now()?;
    let mut mid: Option<CpuSnapshot> = None;
    let (mut count, mut paused, mut bw_during) = (0usize, 0.0f64, Vec::new());
    let out = engine.generate(&req, &mut |_ev| {
        if mid.is_none() {
            mid = CpuSnapshot::now().ok();
        }
        count += 1;
        if let Some(p) = probe {
            if count > 1 && (count - 1) % p.every == 0 && count < max_tokens {
                let t0 = Instant::now();
                // The compute pool's idle worker spins for 3 ms before it parks.
                std::thread::sleep(std::time::Duration::from_millis(4));
                bw_during.push(p.read(2).best_bytes_per_s);
                paused += t0.elapsed().as_secs_f64();
            }
        }
        ControlFlow::Continue(())
    })?;
    let s2 = CpuSnapshot::now()?;
    let decode_tokens = out.usage.completion_tokens.saturating_sub(1);
    // The probes' pauses are not decode time.
    let decode_s = out.timings.decode.as_secs_f64() - paused;
    let s1 = mid.unwrap_or(s2);
    let t = out.timings;
    Ok(GenFigures {
        prefill_tokens: n,
        prefill_s: t.prefill.as_secs_f64(),
        prefill_tps: t.prefill_tokens_per_s,
        decode_tokens,
        decode_s,
        decode_tps: decode_tokens as f64 / decode_s.max(1e-9),
        cpu_prefill: s0.until(&s1),
        cpu_decode: s1.until(&s2),
        kv_bytes: engine.kv_cache_bytes(),
        bw_during,
    })
}

fn load(dir: &Path, a: &Args, max_context: usize) -> Result<(Engine, f64)> {
    let t = Instant::now();
    let e = Engine::load(
        dir,
        LoadOptions {
            quant: a.quant,
            cache_dir: a.cache_dir.clone(),
            max_context: Some(max_context),
            threads: Some(a.threads),
            ple: a.ple,
            isa: a.isa,
            pack: a.pack != 0,
            matformer_config: a.matformer_config.clone(),
            slice: a.switch_from.clone().or_else(|| a.slice.clone()),
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("load {} as {}", dir.display(), a.quant))?;
    Ok((e, t.elapsed().as_secs_f64()))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.membw_child {
        return membw_child(&a);
    }
    // Before the bandwidth probes run any kernel (the load would fix the defaults).
    gemmad_engine::configure_kernels(a.isa, a.pack != 0);
    let dir = a.model.clone().context("--model is required")?;
    if a.prompt == 0 || a.gen < 2 {
        bail!("--prompt must be >= 1 and --gen >= 2");
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run_start = CpuSnapshot::now()?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let max_pos = cfg.text.max_position_embeddings;
    let mut max_context = a.prompt + a.gen + 1;
    for &c in &a.contexts {
        max_context = max_context.max(c + a.ctx_gen + 2);
    }
    let max_context = max_context.min(max_pos);
    if a.prompt + a.gen + 1 > max_context {
        bail!("--prompt + --gen exceeds the model's context ({max_pos})");
    }

    eprintln!("[bench] warm-up set: text decoder tensors (PLE table excluded)");
    let ws = warm_set(&dir)?;
    let resident_before = ws.resident()?;
    let resident_frac = resident_before as f64 / ws.bytes.max(1) as f64;

    eprintln!(
        "[bench] loading {} as {} ({:.0}% of the decoder's bytes in the page cache)",
        dir.display(),
        a.quant,
        100.0 * resident_frac
    );
    let (engine, load_first_s) = load(&dir, &a, max_context)?;
    let t = Instant::now();
    ws.touch()?;
    let touch_s = t.elapsed().as_secs_f64();
    let reload = resident_frac < 0.95 && !a.no_reload;
    let (mut engine, load_warm_s) = if reload {
        drop(engine);
        eprintln!("[bench] first load was cold; reloading with a warm page cache");
        let (e, s) = load(&dir, &a, max_context)?;
        (e, Some(s))
    } else {
        (engine, None)
    };
    let mem_after_load = procfs::mem_status()?;
    let huge_after_load = procfs::huge_pages().unwrap_or_default();
    let switch_down = match &a.switch_from {
        Some(from) => Some(switch_down(&mut engine, &a, from)?),
        None => None,
    };
    let decode_weight_bytes = engine.decode_weight_bytes();

    // Warm-up: a short forward pass (thread pool, allocations) and a sanity check that the
    // weights produce finite logits.
    let prompt_ids = random_prompt(a.prompt, a.seed, 0);
    let probe = &prompt_ids[..prompt_ids.len().min(8)];
    let logits = engine.logits(probe)?;
    let finite = logits.iter().all(|x| x.is_finite());
    let max_abs = logits.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let vocab = cfg.text.vocab_size;
    let last = &logits[logits.len() - vocab..];
    let mean = last.iter().map(|&x| f64::from(x)).sum::<f64>() / vocab as f64;
    let std = (last
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / vocab as f64)
        .sqrt();
    drop(logits);
    if !finite {
        eprintln!("[bench] WARNING: non-finite logits in the warm-up pass");
    }

    eprintln!("[bench] memory bandwidth ({} threads)", a.threads);
    let bw1 = bandwidth(&a)?;
    eprintln!("[bench] prefill {} + decode {} tokens", a.prompt, a.gen - 1);
    let probe = Probe::new(&engine, a.threads, 32);
    let main = run_generation(&mut engine, prompt_ids, a.gen, Some(&probe))?;
    let bw2 = bandwidth(&a)?;
    // The same read over the decode weights themselves, where they lie: on a VM the
    // speed of memory can differ between physical regions (host page size), so a fresh
    // probe buffer alone may understate what decode's own pages allow.
    let bw_w = probe.read(a.bw_passes);
    drop(probe);
    let bw_of = |v: &Value| v["best_bytes_per_s"].as_f64().unwrap_or(0.0);
    let bw_best = bw_of(&bw1).max(bw_of(&bw2)).max(bw_w.best_bytes_per_s);
    let during = &main.bw_during;
    let bw_during = if during.is_empty() {
        bw_best
    } else {
        during.iter().sum::<f64>() / during.len() as f64
    };
    let decode_rate = decode_weight_bytes as f64 * main.decode_tps;
    let efficiency = decode_rate / bw_during.max(1.0);
    let efficiency_vs_best = decode_rate / bw_best.max(1.0);

    let mut ctx_rows = Vec::new();
    for (i, &c) in a.contexts.iter().enumerate() {
        let len = c.min(max_context - a.ctx_gen - 2);
        eprintln!(
            "[bench] context {c}: prefill {len} + decode {} tokens",
            a.ctx_gen
        );
        let ids = random_prompt(len, a.seed, 1 + i as u64);
        let g = run_generation(&mut engine, ids, a.ctx_gen + 1, None)?;
        ctx_rows.push((c, g));
    }
    let switching = if a.switches > 0 {
        Some(switch_latency(&mut engine, &a)?)
    } else {
        None
    };
    let mem_end = procfs::mem_status()?;
    // The bandwidth probes read every weight byte, also what the slice does not use.
    engine.release_unused();
    let mem_end_released = procfs::mem_status()?;
    let run = run_start.until(&CpuSnapshot::now()?);

    // ---- report ----
    let contaminated = main.cpu_decode.others_share(ncpu) > 0.05;
    let mut table = String::new();
    let mut line = |k: &str, v: String| table.push_str(&format!("{k:<34} {v}\n"));
    line("model", dir.display().to_string());
    line(
        "MatFormer slice",
        format!(
            "{} ({} parameters without embeddings)",
            engine.active_slice(),
            engine.state().slice_params
        ),
    );
    if let Some(sd) = &switch_down {
        line(
            "switched down",
            sd["summary"].as_str().unwrap_or("").to_string(),
        );
    }
    if let Some(sw) = &switching {
        line(
            "slice switches",
            sw["summary"].as_str().unwrap_or("").to_string(),
        );
    }
    line(
        "quant / threads",
        format!("{} / {} (machine: {ncpu} CPUs)", a.quant, a.threads),
    );
    line("kernels", gemmad_engine::kernels_in_use().to_string());
    line(
        "load, first",
        format!(
            "{load_first_s:.2} s ({:.0}% of {:.2} GB decoder bytes cached before)",
            100.0 * resident_frac,
            gb(ws.bytes as f64)
        ),
    );
    line("page-cache warm-up (read)", format!("{touch_s:.2} s"));
    line(
        "load, warm",
        match load_warm_s {
            Some(s) => format!("{s:.2} s"),
            None => "= first load (it was already warm)".into(),
        },
    );
    line(
        "warm-up logits",
        format!("finite={finite}, max|x|={max_abs:.2}, last-row std={std:.3}"),
    );
    line(
        "prefill",
        format!(
            "{:.2} tok/s ({} tokens in {:.2} s)",
            main.prefill_tps, main.prefill_tokens, main.prefill_s
        ),
    );
    line(
        "decode",
        format!(
            "{:.3} tok/s ({} tokens in {:.2} s, after {} prompt tokens)",
            main.decode_tps, main.decode_tokens, main.decode_s, main.prefill_tokens
        ),
    );
    line(
        "decode weight bytes / token",
        format!("{:.3} GB", gb(decode_weight_bytes as f64)),
    );
    line(
        "memory read bandwidth",
        format!(
            "{:.2} GB/s best (before {:.2}, after {:.2}; {} threads, {} GiB, THP {})",
            gb(bw_best),
            gb(bw_of(&bw1)),
            gb(bw_of(&bw2)),
            a.threads,
            a.bw_gib,
            procfs::thp_mode().unwrap_or_else(|| "?".into())
        ),
    );
    line(
        "weights stream bandwidth",
        format!(
            "{:.2} GB/s best ({:.2} GB of decode weights in place, {} threads)",
            gb(bw_w.best_bytes_per_s),
            gb(bw_w.buffer_bytes as f64),
            a.threads
        ),
    );
    line(
        "bandwidth during decode",
        if during.is_empty() {
            "not read (fewer than 33 decode tokens); the run's best read is used".into()
        } else {
            format!(
                "{:.2} GB/s mean of {} reads of the weights between decode steps (min {:.2}, max {:.2})",
                gb(bw_during),
                during.len(),
                gb(during.iter().copied().fold(f64::INFINITY, f64::min)),
                gb(during.iter().copied().fold(0.0, f64::max))
            )
        },
    );
    line(
        "decode roofline efficiency",
        format!(
            "{:.1}% of the bandwidth during decode ({:.1}% of the run's best read, {:.2} GB/s)",
            100.0 * efficiency,
            100.0 * efficiency_vs_best,
            gb(bw_best)
        ),
    );
    line(
        "RSS after load",
        format!(
            "{:.2} GiB (anon {:.2}, file {:.2})",
            gib(mem_after_load.vm_rss),
            gib(mem_after_load.rss_anon),
            gib(mem_after_load.rss_file)
        ),
    );
    line(
        "on 2 MiB pages after load",
        format!(
            "{:.2} GiB file-backed (the mapped weights), {:.2} GiB anonymous",
            gib(huge_after_load.file_pmd),
            gib(huge_after_load.anon_huge)
        ),
    );
    line(
        "RSS at end",
        format!(
            "{:.2} GiB (anon {:.2}, file {:.2})",
            gib(mem_end.vm_rss),
            gib(mem_end.rss_anon),
            gib(mem_end.rss_file)
        ),
    );
    line(
        "RSS at end, slice's pages only",
        format!(
            "{:.2} GiB (anon {:.2}, file {:.2}; after giving back what the bandwidth probes read outside the slice)",
            gib(mem_end_released.vm_rss),
            gib(mem_end_released.rss_anon),
            gib(mem_end_released.rss_file)
        ),
    );
    line(
        "peak RSS (VmHWM)",
        format!("{:.2} GiB", gib(mem_end.vm_hwm)),
    );
    line(
        "KV cache after main run",
        format!("{:.1} MiB", main.kv_bytes as f64 / (1 << 20) as f64),
    );
    let cpu_line = |c: &CpuUse| {
        format!(
            "{:.2} CPU-s others, {:.2} steal, {:.2} iowait over {:.1} s wall ({:.1}% of capacity)",
            c.others_cpu_s,
            c.steal_s,
            c.iowait_s,
            c.wall_s,
            100.0 * c.others_share(ncpu)
        )
    };
    line("other load during prefill", cpu_line(&main.cpu_prefill));
    line(
        "other load during decode",
        format!(
            "{}{}",
            cpu_line(&main.cpu_decode),
            if contaminated {
                "  <-- CONTAMINATED, rerun on a quiet machine"
            } else {
                ""
            }
        ),
    );
    line("other load, whole run", cpu_line(&run));
    for (c, g) in &ctx_rows {
        line(
            &format!("context {c}"),
            format!(
                "decode {:.3} tok/s ({} tok) after {} tokens; prefill {:.2} tok/s; KV {:.1} MiB; others {:.1}%",
                g.decode_tps,
                g.decode_tokens,
                g.prefill_tokens,
                g.prefill_tps,
                g.kv_bytes as f64 / (1 << 20) as f64,
                100.0 * g.cpu_decode.others_share(ncpu)
            ),
        );
    }

    let report = json!({
        "model": dir.display().to_string(),
        "slice": engine.active_slice(),
        "slice_params": engine.state().slice_params,
        "switch_down": switch_down,
        "switching": switching,
        "quant": a.quant.as_str(),
        "ple": format!("{:?}", a.ple).to_lowercase(),
        "threads": a.threads,
        "kernels": gemmad_engine::kernels_in_use(),
        "machine": {
            "cpus": ncpu,
            "cpu_model": procfs::cpu_model(),
            "thp": procfs::thp_mode(),
        },
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "load": {
            "first_s": load_first_s,
            "decoder_bytes": ws.bytes,
            "decoder_resident_before": resident_frac,
            "page_cache_warmup_s": touch_s,
            "warm_s": load_warm_s,
        },
        "warmup_logits": {"finite": finite, "max_abs": max_abs, "last_row_std": std},
        "prefill": {
            "tokens": main.prefill_tokens,
            "seconds": main.prefill_s,
            "tokens_per_s": main.prefill_tps,
            "cpu": cpu_json(&main.cpu_prefill, ncpu),
        },
        "decode": {
            "tokens": main.decode_tokens,
            "seconds": main.decode_s,
            "tokens_per_s": main.decode_tps,
            "after_prompt_tokens": main.prefill_tokens,
            "cpu": cpu_json(&main.cpu_decode, ncpu),
            "contaminated": contaminated,
        },
        "decode_weight_bytes": decode_weight_bytes,
        "bandwidth": {
            "best_bytes_per_s": bw_best,
            "before_decode": bw1,
            "after_decode": bw2,
            "during_decode_bytes_per_s": main.bw_during,
            "decode_weights_in_place": {
                "best_bytes_per_s": bw_w.best_bytes_per_s,
                "passes_bytes_per_s": bw_w.passes,
                "bytes": bw_w.buffer_bytes,
            },
        },
        "decode_roofline_efficiency": efficiency,
        "decode_roofline_efficiency_vs_best_read": efficiency_vs_best,
        "rss": {
            "after_load_bytes": mem_after_load.vm_rss,
            "after_load_file_pmd_mapped_bytes": huge_after_load.file_pmd,
            "after_load_anon_huge_bytes": huge_after_load.anon_huge,
            "after_load_anon_bytes": mem_after_load.rss_anon,
            "after_load_file_bytes": mem_after_load.rss_file,
            "end_bytes": mem_end.vm_rss,
            "end_anon_bytes": mem_end.rss_anon,
            "end_file_bytes": mem_end.rss_file,
            "end_slice_only_bytes": mem_end_released.vm_rss,
            "peak_bytes": mem_end.vm_hwm,
        },
        "kv_cache_bytes_after_main": main.kv_bytes,
        "contexts": ctx_rows.iter().map(|(c, g)| json!({
            "context": c,
            "prefill_tokens": g.prefill_tokens,
            "prefill_tokens_per_s": g.prefill_tps,
            "decode_tokens": g.decode_tokens,
            "decode_tokens_per_s": g.decode_tps,
            "kv_cache_bytes": g.kv_bytes,
            "cpu_decode": cpu_json(&g.cpu_decode, ncpu),
        })).collect::<Vec<_>>(),
        "cpu_whole_run": cpu_json(&run, ncpu),
    });
    println!("{table}");
    let js = serde_json::to_string_pretty(&report)?;
    println!("{js}");
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{js}\n")).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// RSS (whole process, anonymous + file) once the page-release thread has finished:
/// sampled until two readings 100 ms apart agree within 1 MiB (at most 10 s).
fn settled_rss() -> Result<procfs::MemStatus> {
    let mut last = procfs::mem_status()?;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = procfs::mem_status()?;
        if now.vm_rss.abs_diff(last.vm_rss) < 1 << 20 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Runs the slice loaded (`from`) so its weights are resident, switches to `--slice`
/// between requests and reports RSS before and after.
fn switch_down(engine: &mut Engine, a: &Args, from: &str) -> Result<Value> {
    let to = a.slice.clone().unwrap_or_else(|| "full".into());
    eprintln!("[bench] running {from}, then switching to {to}");
    run_generation(engine, random_prompt(64, a.seed, 7), 8, None)?;
    let before = settled_rss()?;
    let t = Instant::now();
    engine.control(&gemmad_engine::Control::SetSlice {
        name: to.clone(),
        force: false,
    })?;
    let switch_s = t.elapsed().as_secs_f64();
    let after = settled_rss()?;
    let summary = format!(
        "{from} -> {to} in {:.2} ms; RSS {:.2} -> {:.2} GiB (anon {:.2}, file {:.2} -> {:.2})",
        switch_s * 1e3,
        gib(before.vm_rss),
        gib(after.vm_rss),
        gib(after.rss_anon),
        gib(before.rss_file),
        gib(after.rss_file)
    );
    Ok(json!({
        "from": from, "to": to, "switch_s": switch_s,
        "rss_before_bytes": before.vm_rss, "rss_after_bytes": after.vm_rss,
        "file_before_bytes": before.rss_file, "file_after_bytes": after.rss_file,
        "anon_after_bytes": after.rss_anon, "summary": summary,
    }))
}

/// `--switches` switches between requests (median and max of the switch itself; the
/// next request's prefill is not counted), then one forced switch in the middle of a
/// generation (the re-prefill of its tokens so far on the new slice).
fn switch_latency(engine: &mut Engine, a: &Args) -> Result<Value> {
    let one = a.slice.clone().unwrap_or_else(|| "full".into());
    let other = a
        .switch_from
        .clone()
        .filter(|f| *f != one)
        .unwrap_or_else(|| "full".into());
    eprintln!("[bench] {} switches between {one} and {other}", a.switches);
    let mut times = Vec::with_capacity(a.switches);
    for i in 0..a.switches {
        let name = if i % 2 == 0 { &other } else { &one };
        let t = Instant::now();
        engine.control(&gemmad_engine::Control::SetSlice {
            name: name.clone(),
            force: false,
        })?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    // Forced: a generation on `one`, switched to `other` after 8 tokens.
    engine.control(&gemmad_engine::Control::SetSlice {
        name: one.clone(),
        force: false,
    })?;
    let mut req = GenerateRequest::new(Prompt::Ids(random_prompt(a.prompt, a.seed, 9)));
    req.sampling = SamplingParams::greedy();
    req.max_tokens = 16;
    req.ignore_eos = true;
    let mut g = engine.start(&req)?;
    for _ in 0..8 {
        engine.step(&mut g)?;
    }
    let t = Instant::now();
    engine.control(&gemmad_engine::Control::SetSlice {
        name: other.clone(),
        force: true,
    })?;
    engine.step(&mut g)?;
    let forced_step_s = t.elapsed().as_secs_f64();
    let out = loop {
        if let gemmad_engine::Step::Done { output, .. } = engine.step(&mut g)? {
            break output;
        }
    };
    let reprefill_s = out.timings.reprefill.as_secs_f64();
    let summary = format!(
        "{} between requests: median {:.3} ms, max {:.3} ms; forced mid-generation \
         {one} -> {other}: {:.2} s to the next token (re-prefill of {} tokens {:.2} s)",
        times.len(),
        median * 1e3,
        max * 1e3,
        forced_step_s,
        a.prompt + 8,
        reprefill_s
    );
    Ok(json!({
        "count": times.len(), "median_s": median, "max_s": max,
        "forced": {"from": one, "to": other, "next_token_s": forced_step_s,
                   "reprefill_s": reprefill_s, "reprefill_tokens": a.prompt + 8,
                   "slice_at_end": out.slice},
        "summary": summary,
    }))
}
