//! Progress of long work: an indicatif bar on a terminal, periodic log lines otherwise (CI
//! logs, SLURM output files), so a long job never looks hung. Every bar is drawn through one
//! [`MultiProgress`]; log lines go to the terminal through [`suspend`] (`util::logging`), which
//! takes the bars off the screen, prints the line and draws them again below it — so the bars
//! stay at the bottom and the scrollback holds log lines only.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
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

/// The bars on the terminal.
static BARS: std::sync::LazyLock<MultiProgress> =
    std::sync::LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));

/// Runs `f` (a write to the terminal) with the bars hidden, then draws them again.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    BARS.suspend(f)
}

/// Without a terminal, a line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    /// `total` is in bytes.
    pub fn new(total: u64, label: &str) -> Progress {
        let bar = (std::io::stderr().is_terminal() && total > 0).then(|| {
            let bar = BARS.add(ProgressBar::new(total));
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
            BARS.remove(bar);
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

/// Progress of a run in steps: a bar with a message (loss, lr, rates) and ETA on a terminal;
/// the trainer logs its own lines otherwise.
pub struct Steps {
    bar: Option<ProgressBar>,
}

impl Steps {
    pub fn new(total: u64, label: &str) -> Steps {
        let bar = (std::io::stderr().is_terminal() && total > 0).then(|| {
            let bar = BARS.add(ProgressBar::new(total));
            let style =
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
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
            BARS.remove(bar);
        }
    }
}

/// A rate with the precision a reader wants: three significant digits below 100, whole numbers
/// with thousands separators above (`0.482`, `11.6`, `42,180`).
pub fn rate(per_s: f64) -> String {
    if !per_s.is_finite() || per_s < 0.0 {
        return "-".into();
    }
    if per_s < 1.0 {
        format!("{per_s:.3}")
    } else if per_s < 10.0 {
        format!("{per_s:.2}")
    } else if per_s < 100.0 {
        format!("{per_s:.1}")
    } else {
        let digits = format!("{:.0}", per_s);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_read_well() {
        let r = super::rate;
        assert_eq!(
            [
                r(0.48213),
                r(3.25671),
                r(11.5983),
                r(999.4),
                r(42180.2),
                r(1234567.0)
            ],
            ["0.482", "3.26", "11.6", "999", "42,180", "1,234,567"]
        );
        assert_eq!(r(f64::NAN), "-");
    }
}
