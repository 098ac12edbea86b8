//! Time per training phase for profiling, switched on by `MOEQ_PHASE_TIMES=1`: the device is
//! synchronized before and after each timed region, so every phase gets exactly its own device
//! time (the run itself gets slower by the lost overlap). `MOEQ_PHASE_TIMES=host` times the host
//! instead, with no synchronization added: how long the host takes to enqueue each phase,
//! including where it waits on the device (the expert counts' copy, `waited`), and at every
//! boundary how much work the GPU has queued (`util::gpu_lag`: near zero, it waits on the
//! host). Off, `timed` only calls the closure.

use crate::util::gpu_lag;
use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    /// Device time per phase (synchronized at each boundary).
    Device,
    /// Host time per phase, nothing synchronized.
    Host,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MOEQ_PHASE_TIMES").as_deref() {
        Ok("1") => Mode::Device,
        Ok("host") => Mode::Host,
        _ => Mode::Off,
    })
}

fn enabled() -> bool {
    mode() != Mode::Off
}

/// Synchronizes `device` in device-time mode (host mode adds no synchronization).
fn sync(device: &Device) {
    if mode() == Mode::Device {
        let _ = device.synchronize();
    }
}

/// Seconds and calls per phase name.
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Runs `f`, adding its time to `phase` when profiling is on. Nested phases are each counted
/// in full (an outer phase includes its inner ones).
pub fn timed<T>(phase: &'static str, device: &Device, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    sync(device);
    lag_mark(phase, true, device);
    let start = Instant::now();
    let out = f();
    sync(device);
    add(phase, start.elapsed().as_secs_f64());
    lag_mark(phase, false, device);
    out
}

/// In host mode, the GPU's lag at a phase boundary (`util::gpu_lag`).
fn lag_mark(phase: &'static str, start: bool, device: &Device) {
    if mode() == Mode::Host {
        gpu_lag::mark(phase, start, device);
    }
}

/// Runs `f`, a host wait on the device (a copy to the host), adding its time to `phase` in
/// host mode only (device mode's synchronization would make it nothing).
pub fn waited<T>(phase: &'static str, device: &Device, f: impl FnOnce() -> T) -> T {
    if mode() != Mode::Host {
        return f();
    }
    lag_mark(phase, true, device);
    let start = Instant::now();
    let out = f();
    add(phase, start.elapsed().as_secs_f64());
    lag_mark(phase, false, device);
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
            sync(device);
            lag_mark(phase, true, device);
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
            sync(&self.device);
            add(self.phase, start.elapsed().as_secs_f64());
            lag_mark(self.phase, false, &self.device);
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
    gpu_lag::reset();
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
    let what = match mode() {
        Mode::Host => "host time, MOEQ_PHASE_TIMES=host",
        _ => "MOEQ_PHASE_TIMES=1",
    };
    let mut s = format!("phase times ({what}, {steps} steps):");
    for (name, (secs, calls)) in rows {
        s += &format!(
            "\n  {name:<28} {:>9.1} ms/step {:>7} calls",
            secs * 1e3 / steps.max(1) as f64,
            calls
        );
    }
    if let Some(lag) = gpu_lag::report() {
        s += "\n";
        s += &lag;
    }
    Some(s)
}

/// Per mark label, the highest device-pool memory in use and reserved (bytes), and the rest of
/// the device memory (context, modules, cuBLAS workspaces: driver view minus the pool's
/// reservation) at the mark.
static MEMORY: Mutex<BTreeMap<&'static str, (u64, u64, u64)>> = Mutex::new(BTreeMap::new());

/// When device times are on, records under `label` the stream-ordered pool's high-water mark of
/// memory in use since the previous mark (then resets it): where in a step the peak is.
pub fn mark_memory(label: &'static str, device: &Device) {
    if mode() != Mode::Device {
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

/// The table of memory marks (None unless device times are on and something was marked).
pub fn memory_report() -> Option<String> {
    let m = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if mode() != Mode::Device || m.is_empty() {
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
