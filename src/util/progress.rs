//! Progress of long work: an indicatif bar on a terminal, periodic log lines otherwise (CI
//! logs, SLURM output files), so a long job never looks hung.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Mutex<Instant>,
}

/// Without a terminal, a line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    /// `total` is in bytes.
    pub fn new(total: u64, label: &str) -> Progress {
        let bar = (std::io::stderr().is_terminal() && total > 0).then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            label: label.to_string(),
            total,
            done: AtomicU64::new(0),
            bar,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
        }
    }

    pub fn inc(&self, delta: u64) {
        let done = self.done.fetch_add(delta, Ordering::Relaxed) + delta;
        if let Some(bar) = &self.bar {
            bar.inc(delta);
            return;
        }
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let pct = 100.0 * done as f64 / self.total.max(1) as f64;
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9) / 1e6;
            tracing::info!("{}: {pct:.0}% ({:.1} MB/s)", self.label, rate);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        let done = self.done.load(Ordering::Relaxed);
        tracing::info!(
            "{}: done, {:.1} MB in {secs:.1} s",
            self.label,
            done as f64 / 1e6
        );
    }
}

/// Progress of a run in steps: a bar with a message (loss, lr) and ETA on a terminal; the
/// trainer logs its own lines otherwise.
pub struct Steps {
    bar: Option<ProgressBar>,
}

impl Steps {
    pub fn new(total: u64, label: &str) -> Steps {
        let bar = (std::io::stderr().is_terminal() && total > 0).then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        Steps { bar }
    }

    pub fn set(&self, pos: u64, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_message(msg.to_string());
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
