//! Time per training phase for profiling, switched on by `MOEQ_PHASE_TIMES=1`: the device is
//! synchronized before and after each timed region, so every phase gets exactly its own device
//! time (the run itself gets slower by the lost overlap). Off, `timed` only calls the closure.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOEQ_PHASE_TIMES").is_ok_and(|v| v == "1"))
}

/// Seconds and calls per phase name.
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Runs `f`, adding its time to `phase` when profiling is on. Nested phases are each counted
/// in full (an outer phase includes its inner ones).
pub fn timed<T>(phase: &'static str, device: &Device, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let _ = device.synchronize();
    let start = Instant::now();
    let out = f();
    let _ = device.synchronize();
    add(phase, start.elapsed().as_secs_f64());
    out
}

/// A timed region that ends when dropped (for code that returns early with `?`).
pub struct Span {
    phase: &'static str,
    device: Device,
    start: Option<Instant>,
}

impl Span {
    pub fn start(phase: &'static str, device: &Device) -> Span {
        let start = enabled().then(|| {
            let _ = device.synchronize();
            Instant::now()
        });
        Span {
            phase,
            device: device.clone(),
            start,
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let _ = self.device.synchronize();
            add(self.phase, start.elapsed().as_secs_f64());
        }
    }
}

fn add(phase: &'static str, secs: f64) {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(phase).or_insert((0.0, 0));
    e.0 += secs;
    e.1 += 1;
}

/// Forgets the times so far (the first step, with its one-time kernel loading, is left out).
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The table of phases, longest first, with time per optimizer step over `steps` steps; None
/// when profiling is off.
pub fn report(steps: usize) -> Option<String> {
    if !enabled() {
        return None;
    }
    let t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut s = format!("phase times (MOEQ_PHASE_TIMES=1, {steps} steps):");
    for (name, (secs, calls)) in rows {
        s += &format!(
            "\n  {name:<28} {:>9.1} ms/step {:>7} calls",
            secs * 1e3 / steps.max(1) as f64,
            calls
        );
    }
    Some(s)
}

/// Per mark label, the highest device-pool memory in use and reserved (bytes), and the rest of
/// the device memory (context, modules, cuBLAS workspaces: driver view minus the pool's
/// reservation) at the mark.
static MEMORY: Mutex<BTreeMap<&'static str, (u64, u64, u64)>> = Mutex::new(BTreeMap::new());

/// When profiling is on, records under `label` the stream-ordered pool's high-water mark of
/// memory in use since the previous mark (then resets it): where in a step the peak is.
pub fn mark_memory(label: &'static str, device: &Device) {
    if !enabled() {
        return;
    }
    if let Some((high, reserved, other)) = crate::util::mem::pool_high_since_last(device) {
        let mut m = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(label).or_insert((0, 0, 0));
        e.0 = e.0.max(high);
        e.1 = e.1.max(reserved);
        e.2 = e.2.max(other);
    }
}

/// The table of memory marks (None when profiling is off or nothing was marked).
pub fn memory_report() -> Option<String> {
    let m = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if !enabled() || m.is_empty() {
        return None;
    }
    let mut s = String::from(
        "device memory (MOEQ_PHASE_TIMES=1), highest up to each mark: pool in use | pool reserved | outside the pool",
    );
    for (label, (high, reserved, other)) in m.iter() {
        s += &format!(
            "\n  {label:<28} {:>8.3} GB | {:>8.3} GB | {:>6.3} GB",
            *high as f64 / 1e9,
            *reserved as f64 / 1e9,
            *other as f64 / 1e9
        );
    }
    Some(s)
}
