//! `tracing` setup: level from `--log-level` or `RUST_LOG` (default `info`), the rank in every
//! line once there are ranks, and a copy of the log in the run's output directory.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

pub struct LogSetup<'a> {
    /// Overrides `RUST_LOG` when given (e.g. `debug`, `moeq=trace`).
    pub level: Option<&'a str>,
    pub rank: Option<usize>,
    /// Also append the log here (no colours).
    pub file: Option<&'a Path>,
}

/// Installs the global subscriber. Returns a guard span; keep it alive for the process so the
/// rank prefix appears on every line. A bad filter string is reported, not fatal.
pub fn init(setup: LogSetup) -> Result<Option<tracing::span::EnteredSpan>, String> {
    let filter = |level: Option<&str>| -> Result<EnvFilter, String> {
        match level {
            Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level '{l}': {e}")),
            None => {
                Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
            }
        }
    };
    let stderr_layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter(setup.level)?);
    let file_layer = match setup.file {
        Some(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    format!("{}: cannot create log directory: {e}", parent.display())
                })?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{}: cannot open log file: {e}", path.display()))?;
            Some(
                fmt::layer()
                    .with_writer(Mutex::new(file))
                    .with_ansi(false)
                    .with_target(false)
                    .with_filter(filter(setup.level)?),
            )
        }
        None => None,
    };
    // A second init (tests, library use) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    Ok(setup
        .rank
        .map(|rank| tracing::info_span!("rank", rank).entered()))
}
