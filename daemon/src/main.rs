//! `gemmad`: the Gemma 3n service binary. Subcommands: one-shot tools that run the engine
//! in-process on a checkpoint folder (`generate`, `logits`).

mod oneshot;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "gemmad", version, about = "Gemma 3n on-device inference service")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `gemmad_engine=debug`.
    #[arg(long, global = true, env = "GEMMAD_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text in-process from a checkpoint folder, streaming to stdout.
    Generate(oneshot::GenerateArgs),
    /// Write the logits of every position of a token-id sequence as a .npy file.
    Logits(oneshot::LogitsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.command {
        Command::Generate(a) => oneshot::generate(a),
        Command::Logits(a) => oneshot::logits(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gemmad: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
