//! A rank's progress clock for the watchdog in its heartbeat thread.

use std::time::{Duration, Instant};

/// A rank's progress clock, read by its heartbeat thread (see `StoreClient::start_heartbeat`).
/// The trainer calls `progress` as it completes work and sets the allowed gap with `limit`.
pub struct Watch {
    rank: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `origin` at the last progress.
    last_ms: std::sync::atomic::AtomicU64,
    /// Allowed gap in milliseconds; 0: not watching.
    limit_ms: std::sync::atomic::AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

/// This process's watch.
pub static WATCH: Watch = Watch {
    rank: std::sync::atomic::AtomicUsize::new(0),
    last_ms: std::sync::atomic::AtomicU64::new(0),
    limit_ms: std::sync::atomic::AtomicU64::new(0),
    origin: std::sync::OnceLock::new(),
};

impl Watch {
    fn now_ms(&self) -> u64 {
        self.origin.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub fn set_rank(&self, rank: usize) {
        self.rank.store(rank, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn rank(&self) -> usize {
        self.rank.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Work completed now.
    pub fn progress(&self) {
        self.last_ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on, a gap longer than `limit` between progress calls is a hang.
    pub fn limit(&self, limit: Duration) {
        self.progress();
        self.limit_ms.store(
            limit.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Stops watching (long I/O); returns the limit to give back to `resume`.
    pub fn pause(&self) -> u64 {
        self.limit_ms.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Watches again with the limit `pause` returned, from now.
    pub fn resume(&self, limit_ms: u64) {
        self.progress();
        self.limit_ms
            .store(limit_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The gap since the last progress, when it exceeds the limit.
    pub(super) fn stalled(&self) -> Option<Duration> {
        let limit = self.limit_ms.load(std::sync::atomic::Ordering::Relaxed);
        let gap = self
            .now_ms()
            .saturating_sub(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        (limit > 0 && gap > limit).then(|| Duration::from_millis(gap))
    }

    pub(super) fn exit(&self, msg: &str) -> ! {
        eprintln!("error: rank {}: job stopped: {msg}", self.rank());
        run_exit_hooks(Duration::from_secs(10));
        std::process::exit(1)
    }
}

/// What runs before a stopped rank exits (`Watch::exit`): the NCCL communicator's abort, so a
/// GPU stuck in a collective is released rather than left to the process teardown.
static EXIT_HOOKS: std::sync::Mutex<Vec<ExitHook>> = std::sync::Mutex::new(Vec::new());

/// One hook; it says what it did (printed) or None.
pub type ExitHook = Box<dyn FnOnce() -> Option<String> + Send>;

/// Adds a hook run once when this rank is stopped (watchdog or a failed peer).
pub fn on_exit(hook: ExitHook) {
    EXIT_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(hook);
}

/// Runs the hooks on a thread of their own, waiting at most `limit` for them (an abort that
/// itself hangs must not keep the rank alive).
pub fn run_exit_hooks(limit: Duration) {
    let hooks = std::mem::take(&mut *EXIT_HOOKS.lock().unwrap_or_else(|e| e.into_inner()));
    if hooks.is_empty() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for hook in hooks {
            if let Some(done) = hook() {
                eprintln!("{done}");
            }
        }
        let _ = tx.send(());
    });
    if rx.recv_timeout(limit).is_err() {
        eprintln!("exit hooks did not finish in {} s", limit.as_secs());
    }
}
