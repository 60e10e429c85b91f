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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write man pages (gemmad.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: std::path::PathBuf,
    },
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

/// Writes gemmad.1 and a page per subcommand (gemmad-serve.1, ...) into `out`.
fn write_man_pages(out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, out)
        .with_context(|| format!("cannot write man pages into {}", out.display()))?;
    eprintln!("man pages written to {}", out.display());
    Ok(())
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
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "gemmad", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => write_man_pages(&out),
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
        undocumented(&Cli::command(), "gemmad", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }
}
