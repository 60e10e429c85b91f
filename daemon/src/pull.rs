//! `gemmad pull REPO`: the command-line face of `gemmad_hub::pull` (which does the work).
//! Draws a progress bar when stderr is a terminal and plain periodic lines otherwise (a
//! log, a CI run), then says where the checkpoint went and how to serve it. Also the one
//! `--model` resolution of the one-shot tools (a folder, or a repo id in the stores).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use gemmad_hub::{Event, PullOptions};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Hugging Face repo id: google/gemma-3n-E2B-it, google/gemma-3n-E4B-it, or any repo
    /// in the same layout.
    pub repo: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Model store; the checkpoint goes to <store>/<org>/<name>. Default:
    /// $GEMMAD_MODEL_STORE, else /var/lib/gemmad/models for root and the gemmad user,
    /// else $XDG_DATA_HOME/gemmad/models (~/.local/share/gemmad/models).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The Hub to download from (default: $HF_ENDPOINT, else https://huggingface.co).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
}

/// A `--model` value as a checkpoint folder: the folder itself, or a repo id pulled into
/// one of the default stores.
pub fn resolve_model(value: &Path) -> Result<PathBuf> {
    Ok(gemmad_hub::resolve_model(
        value,
        &gemmad_hub::search_stores(None),
    )?)
}

pub fn pull(a: PullArgs) -> Result<()> {
    let store = a.store.clone().unwrap_or_else(gemmad_hub::default_store);
    let mut o = PullOptions::from_env(&a.repo, store.clone());
    o.revision = a.revision.clone();
    if let Some(e) = &a.endpoint {
        o.endpoint = e.trim_end_matches('/').to_string();
    }
    if o.offline {
        eprintln!("HF_HUB_OFFLINE is set: checking the store only, downloading nothing");
    } else {
        eprintln!(
            "pulling {}@{} from {} into {} ({})",
            o.repo,
            o.revision,
            o.endpoint,
            store.display(),
            if o.token.is_some() {
                "with a token"
            } else {
                "no token: gated repos such as Gemma need HF_TOKEN"
            }
        );
    }
    let mut report: Box<dyn Reporter> = if std::io::stderr().is_terminal() {
        Box::new(Bars::default())
    } else {
        Box::new(Lines::default())
    };
    let r = gemmad_hub::pull(&o, &mut |e: &Event<'_>| {
        report.event(e);
        ControlFlow::Continue(())
    });
    report.finish();
    let p = r.with_context(|| format!("cannot pull {}", o.repo))?;
    println!(
        "{} {} at {} in {}",
        if p.already_installed {
            "already installed:"
        } else {
            "installed"
        },
        p.manifest.repo,
        p.manifest.commit,
        p.dir.display()
    );
    let default = gemmad_hub::search_stores(None).contains(&store);
    if default {
        println!("serve it: gemmad serve --model {}", o.repo);
    } else {
        println!(
            "serve it: GEMMAD_MODEL_STORE={} gemmad serve --model {}  (or --model {})",
            store.display(),
            o.repo,
            p.dir.display()
        );
    }
    Ok(())
}

trait Reporter {
    fn event(&mut self, e: &Event<'_>);
    fn finish(&mut self) {}
}

/// A byte bar for the whole checkpoint, the current file as its message.
#[derive(Default)]
struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl Reporter for Bars {
    fn event(&mut self, e: &Event<'_>) {
        match e {
            Event::Resolved {
                commit,
                files,
                total,
            } => {
                eprintln!("commit {commit}: {} files, {}", files.len(), human(*total));
                let bar = indicatif::ProgressBar::new(*total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:30!} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                self.bar = Some(bar);
            }
            Event::FileStarted {
                name, resume_from, ..
            } => {
                if let Some(b) = &self.bar {
                    b.set_message(name.to_string());
                    if *resume_from > 0 {
                        b.println(format!("{name}: resuming at {}", human(*resume_from)));
                    }
                }
            }
            Event::Bytes { done, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*done);
                }
            }
            Event::Retrying {
                name,
                attempt,
                reason,
            } => {
                if let Some(b) = &self.bar {
                    b.println(format!("{name}: retry {attempt}: {reason}"));
                }
            }
            Event::FileDone { name, size } => {
                if let Some(b) = &self.bar {
                    b.println(format!("{name}: {} verified", human(*size)));
                }
            }
            Event::Installed { .. } => self.finish(),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Plain lines: every file, and the overall count at most every 5 seconds.
#[derive(Default)]
struct Lines {
    last: Option<Instant>,
}

impl Reporter for Lines {
    fn event(&mut self, e: &Event<'_>) {
        match e {
            Event::Resolved {
                commit,
                files,
                total,
            } => {
                eprintln!("commit {commit}: {} files, {}", files.len(), human(*total));
            }
            Event::FileStarted {
                name,
                size,
                resume_from,
            } if *resume_from > 0 => {
                eprintln!(
                    "{name}: {} (resuming at {})",
                    human(*size),
                    human(*resume_from)
                );
            }
            Event::FileStarted { name, size, .. } => eprintln!("{name}: {}", human(*size)),
            Event::Bytes { done, total, .. } => {
                if self
                    .last
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
                {
                    self.last = Some(Instant::now());
                    let pct = (done * 100).checked_div(*total).unwrap_or(100);
                    eprintln!("{pct:3}%  {} of {}", human(*done), human(*total));
                }
            }
            Event::Retrying {
                name,
                attempt,
                reason,
            } => {
                eprintln!("{name}: retry {attempt}: {reason}");
            }
            Event::FileDone { name, .. } => eprintln!("{name}: verified"),
            Event::Installed { .. } => {}
        }
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
