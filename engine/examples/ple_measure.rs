//! Measures the PLE cache and memory control on a checkpoint (issue #5 figures).
//!
//! ```text
//! ple_measure --model DIR --cache-dir DIR MODE [--dtype raw] [--quant bf16] [--prompt 512] [--decode 128]
//!   MODE: build   build the PLE cache (time, size), with a progress line
//!         table   serve with the checkpoint's table in RAM (a)
//!         cache   serve from the PLE cache (b), then ple.release() (c)
//!         cold    time to first token after dropping the page cache, then warm
//! ```
//! Each mode prints the memory report after load and after the request.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use gemmad_engine::internals::EngineInternals;
use gemmad_engine::*;

struct Args {
    model: PathBuf,
    cache_dir: PathBuf,
    mode: String,
    dtype: RowDType,
    prompt: usize,
    decode: usize,
    threads: Option<usize>,
    quant: QuantType,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        cache_dir: PathBuf::from("/tmp/gemmad-cache"),
        mode: String::new(),
        dtype: RowDType::default(),
        prompt: 512,
        decode: 128,
        threads: None,
        quant: QuantType::Bf16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = v()?.into(),
            "--cache-dir" => a.cache_dir = v()?.into(),
            "--dtype" => a.dtype = v()?.parse()?,
            "--quant" => a.quant = v()?.parse()?,
            "--prompt" => a.prompt = v()?.parse().map_err(|e| format!("{e}"))?,
            "--decode" => a.decode = v()?.parse().map_err(|e| format!("{e}"))?,
            "--threads" => a.threads = Some(v()?.parse().map_err(|e| format!("{e}"))?),
            m if !m.starts_with('-') => a.mode = m.to_string(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.model.as_os_str().is_empty() || a.mode.is_empty() {
        return Err("usage: ple_measure --model DIR --cache-dir DIR build|table|cache|cold".into());
    }
    Ok(a)
}

fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut v = vec![2u32];
    while v.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let lo = (vocab as u64 / 100).max(1);
        v.push((lo + s % (vocab as u64 - 2 * lo)) as u32);
    }
    v
}

fn report(label: &str, e: &Engine) {
    let r = e.memory_report();
    println!("--- memory: {label}\n{}", r.table());
}

fn run(e: &mut Engine, a: &Args) -> GenerateOutput {
    let ids = prompt_ids(a.prompt, e.config().text.vocab_size_per_layer_input);
    let req = GenerateRequest {
        max_tokens: a.decode,
        ignore_eos: true,
        ..GenerateRequest::new(Prompt::Ids(ids))
    };
    let out = e
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    let t = &out.timings;
    println!(
        "prompt {} tokens, decoded {}: prefill {:.2} s ({:.1} tok/s), TTFT {:.2} s, decode {:.3} tok/s",
        out.usage.prompt_tokens,
        out.usage.completion_tokens,
        t.prefill.as_secs_f64(),
        t.prefill_tokens_per_s,
        t.time_to_first_token.as_secs_f64(),
        t.decode_tokens_per_s
    );
    out
}

fn load(a: &Args, ple: PleMode) -> Engine {
    let t0 = Instant::now();
    let e = Engine::load(
        &a.model,
        LoadOptions {
            cache_dir: Some(a.cache_dir.clone()),
            quant: a.quant,
            ple,
            ple_dtype: a.dtype,
            threads: a.threads,
            max_context: Some(a.prompt + a.decode + 8),
            ..Default::default()
        },
    )
    .expect("load");
    println!("load: {:.2} s", t0.elapsed().as_secs_f64());
    e
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    match std::fs::write("/proc/sys/vm/drop_caches", "3") {
        Ok(()) => println!("page cache dropped"),
        Err(e) => println!("cannot drop the page cache: {e}"),
    }
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match a.mode.as_str() {
        "build" => {
            let mut last = Instant::now();
            let rep = build_ple_cache(&a.model, &a.cache_dir, a.dtype, &mut |d, t| {
                if last.elapsed().as_secs_f64() > 5.0 || d == t {
                    last = Instant::now();
                    print!(
                        "\rbuilding PLE cache: {d}/{t} rows ({:.1}%)",
                        d as f64 * 100.0 / t as f64
                    );
                    let _ = std::io::stdout().flush();
                }
                ControlFlow::Continue(())
            })
            .expect("build");
            println!(
                "\nbuilt {} ({}): {} rows, {} bytes ({:.2} GiB) in {:.1} s",
                rep.path.display(),
                rep.dtype,
                rep.rows,
                rep.file_bytes,
                rep.file_bytes as f64 / (1u64 << 30) as f64,
                rep.elapsed.as_secs_f64()
            );
        }
        "table" | "cache" => {
            let mode = if a.mode == "table" {
                PleMode::Table
            } else {
                PleMode::Cache
            };
            let mut e = load(&a, mode);
            report("after load", &e);
            run(&mut e, &a);
            report("after the request", &e);
            if let Some(p) = e.ple_cache() {
                p.release();
                report("after ple.release()", &e);
            }
        }
        "cold" => {
            drop_caches();
            let mut e = load(&a, PleMode::Cache);
            let cold = run(&mut e, &a);
            let warm = run(&mut e, &a);
            println!(
                "TTFT cold {:.2} s, warm {:.2} s",
                cold.timings.time_to_first_token.as_secs_f64(),
                warm.timings.time_to_first_token.as_secs_f64()
            );
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
