//! How far the GPU runs behind the host, at phase boundaries (`MOEQ_PHASE_TIMES=host`): each
//! boundary records a timed CUDA event and the host's clock. The event's device time minus the
//! host time is the work queued ahead of the GPU there, up to a constant; the smallest over the
//! run (at the expert counts' copy, the host has just waited for an empty queue) is taken as
//! zero. A boundary whose lag stays near zero is one where the GPU has nothing queued: it waits
//! on the host. On the CPU nothing is recorded. For bench runs of a few minutes: every boundary
//! keeps its event until the report, and the device times are f32 milliseconds from the first
//! (≈ 0.06 ms apart after 1,000 s).

use candle_core::Device;

#[cfg(feature = "cuda")]
mod marks {
    use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaEvent};
    use candle_core::Device;
    use std::sync::Mutex;
    use std::time::Instant;

    struct Mark {
        label: &'static str,
        start: bool,
        host: Instant,
        event: CudaEvent,
    }

    static MARKS: Mutex<Vec<Mark>> = Mutex::new(Vec::new());

    pub fn mark(label: &'static str, start: bool, device: &Device) {
        let Device::Cuda(d) = device else {
            return;
        };
        let host = Instant::now();
        if let Ok(event) = d
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            let m = Mark {
                label,
                start,
                host,
                event,
            };
            MARKS.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        }
    }

    pub fn reset() {
        MARKS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// (label, start, lag in ms up to a constant) per boundary, in order.
    pub fn lags() -> Vec<(&'static str, bool, f64)> {
        let marks = std::mem::take(&mut *MARKS.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(first) = marks.first() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(marks.len());
        for m in &marks {
            let Ok(device_ms) = first.event.elapsed_ms(&m.event) else {
                return Vec::new();
            };
            let host_ms = m.host.duration_since(first.host).as_secs_f64() * 1e3;
            out.push((m.label, m.start, device_ms as f64 - host_ms));
        }
        out
    }
}

#[cfg(not(feature = "cuda"))]
mod marks {
    pub fn mark(_: &'static str, _: bool, _: &candle_core::Device) {}
    pub fn reset() {}
    pub fn lags() -> Vec<(&'static str, bool, f64)> {
        Vec::new()
    }
}

/// Records a boundary (`start` of `label` or its end) on `device`'s stream.
pub fn mark(label: &'static str, start: bool, device: &Device) {
    marks::mark(label, start, device)
}

/// Forgets the boundaries so far.
pub fn reset() {
    marks::reset()
}

/// Per boundary: how often it was crossed, the median and smallest lag (ms), and the share of
/// crossings with under 0.05 ms queued; None when nothing was recorded.
pub fn report() -> Option<String> {
    table(&marks::lags())
}

/// `report`'s table of `lags` (label, start, lag up to a constant), the smallest lag taken as 0.
fn table(lags: &[(&'static str, bool, f64)]) -> Option<String> {
    let zero = lags.iter().map(|l| l.2).reduce(f64::min)?;
    let mut by: std::collections::BTreeMap<(&str, bool), Vec<f64>> = Default::default();
    for &(label, start, lag) in lags {
        by.entry((label, start)).or_default().push(lag - zero);
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    for (_, v) in rows.iter_mut() {
        v.sort_by(f64::total_cmp);
    }
    rows.sort_by(|a, b| a.1[a.1.len() / 2].total_cmp(&b.1[b.1.len() / 2]));
    let mut s = String::from(
        "GPU lag behind the host at phase boundaries (ms of work queued; near 0: the GPU waits on the host):",
    );
    for ((label, start), v) in rows {
        let starved = v.iter().filter(|&&l| l < 0.05).count();
        s += &format!(
            "\n  {:<5} {label:<28} median {:>7.3}  min {:>7.3}  {:>5.1}% under 0.05 ms  ({} crossings)",
            if start { "start" } else { "end" },
            v[v.len() / 2],
            v[0],
            100.0 * starved as f64 / v.len() as f64,
            v.len()
        );
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn lags_are_relative_to_the_smallest_and_sorted_by_median() {
        // Boundary "a" always 0.02 ms above the smallest lag (starved), "b" 3 ms and more.
        let lags = [
            ("b", true, 13.0),
            ("a", false, 10.02),
            ("b", true, 14.0),
            ("a", false, 10.0),
            ("b", true, 15.0),
        ];
        let s = table(&lags).unwrap();
        let rows: Vec<&str> = s.lines().skip(1).collect();
        assert_eq!(rows.len(), 2, "{s}");
        assert!(rows[0].starts_with("  end   a "), "{s}");
        assert!(
            rows[0].contains("median   0.020") && rows[0].contains("100.0% under"),
            "{s}"
        );
        assert!(
            rows[1].contains("median   4.000") && rows[1].contains("min   3.000"),
            "{s}"
        );
        assert!(
            rows[1].contains("  0.0% under") && rows[1].contains("(3 crossings)"),
            "{s}"
        );
        assert!(table(&[]).is_none());
    }
}
