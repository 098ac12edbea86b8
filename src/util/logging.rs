//! `tracing` setup: level from `--log-level` or `RUST_LOG` (default `info`), the rank in every
//! line once there are ranks, and a copy of the log in the run's output directory.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

pub struct LogSetup<'a> {
    /// Overrides `RUST_LOG` when given (e.g. `debug`, `moeq=trace`).
    pub level: Option<&'a str>,
    pub rank: Option<usize>,
    /// Also append the log here (no colours) once `open_log_file` is called: a run that
    /// stops on bad input leaves no file behind. Lines logged before are kept and written first.
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
        .with_writer(|| LineToTerminal(Vec::new()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter(setup.level)?);
    let file_layer = match setup.file {
        Some(path) => {
            let mut d = deferred();
            d.path = Some(path.to_path_buf());
            d.buf.clear();
            d.file = None;
            Some(
                fmt::layer()
                    .with_writer(|| DeferredWriter)
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

/// Lines kept in memory before the log file is opened, at most this many bytes.
const BUFFER_LIMIT: usize = 8 << 20;

#[derive(Default)]
struct Deferred {
    path: Option<std::path::PathBuf>,
    buf: Vec<u8>,
    file: Option<std::fs::File>,
}

static DEFERRED: Mutex<Deferred> = Mutex::new(Deferred {
    path: None,
    buf: Vec::new(),
    file: None,
});

fn deferred() -> MutexGuard<'static, Deferred> {
    DEFERRED.lock().unwrap_or_else(|p| p.into_inner())
}

struct DeferredWriter;

impl std::io::Write for DeferredWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut guard = deferred();
        let d = &mut *guard;
        if let Some(f) = d.file.as_mut() {
            f.write_all(bytes)?;
        } else if d.path.is_some() && d.buf.len() + bytes.len() <= BUFFER_LIMIT {
            d.buf.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match deferred().file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Opens the log file given to `init` (appending; its directory is created) and writes the
/// lines logged so far. A no-op without a log file.
pub fn open_log_file() -> Result<(), String> {
    use std::io::Write;
    let mut d = deferred();
    let Some(path) = d.path.clone() else {
        return Ok(());
    };
    if d.file.is_some() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("{}: cannot create log directory: {e}", parent.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: cannot open log file: {e}", path.display()))?;
    let buf = std::mem::take(&mut d.buf);
    file.write_all(&buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    d.file = Some(file);
    Ok(())
}

/// One log line for stderr, written when the formatter is done with it, with the progress bars
/// taken off the terminal meanwhile (`util::progress::suspend`): the bars stay below the log.
struct LineToTerminal(Vec<u8>);

impl std::io::Write for LineToTerminal {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineToTerminal {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.0);
        super::progress::suspend(|| {
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &line);
        });
    }
}
