//! `gemmad`: the Gemma 3n service binary. `gemmad serve` runs the service (gRPC on a Unix
//! socket); `generate` and `logits` are one-shot tools that run the engine in-process on a
//! checkpoint folder, `export-slice` writes a MatFormer slice as a checkpoint, and `pull`
//! downloads a checkpoint from the Hugging Face Hub into the model store.

use clap::{Parser, Subcommand};
use gemmad::{export, oneshot, pull, serve};

#[derive(Parser, Debug)]
#[command(
    name = "gemmad",
    version,
    about = "Gemma 3n on-device inference service"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `gemmad_engine=debug`.
    /// Default: `warn` for the one-shot tools, the config's log.level for `serve`.
    #[arg(long, global = true, env = "GEMMAD_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service: serve the model over gRPC on a Unix socket.
    Serve(serve::ServeArgs),
    /// Generate text in-process from a checkpoint folder, streaming to stdout.
    Generate(oneshot::GenerateArgs),
    /// Write the logits of every position of a token-id sequence as a .npy file.
    Logits(oneshot::LogitsArgs),
    /// Build the PLE cache file of a checkpoint (with a progress bar).
    PleCache(oneshot::PleCacheArgs),
    /// Write one MatFormer slice of a checkpoint as a checkpoint of its own.
    ExportSlice(export::ExportSliceArgs),
    /// Download a checkpoint from the Hugging Face Hub into the model store
    /// (resumable, verified, installed atomically); `--model org/name` then finds it.
    Pull(pull::PullArgs),
}

fn init_oneshot_logging(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_new(level.unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Serve(a) => serve::run(a, cli.log),
        Command::Generate(a) => {
            init_oneshot_logging(cli.log.as_deref());
            oneshot::generate(a)
        }
        Command::Logits(a) => {
            init_oneshot_logging(cli.log.as_deref());
            oneshot::logits(a)
        }
        Command::PleCache(a) => {
            init_oneshot_logging(cli.log.as_deref());
            oneshot::ple_cache(a)
        }
        Command::ExportSlice(a) => {
            init_oneshot_logging(cli.log.as_deref());
            export::export_slice(a)
        }
        Command::Pull(a) => {
            init_oneshot_logging(cli.log.as_deref());
            pull::pull(a)
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gemmad: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
