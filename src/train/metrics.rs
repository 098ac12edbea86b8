//! What a run records per step: `metrics.jsonl` (truncated to the resume point when a run
//! resumes) and the FLOP accounting behind its MFU figure.

use super::error::{failed, TrainError};
use candle_core::Device;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Peak dense bf16 tensor-core FLOP/s of the GPU, for MFU; None when unknown.
pub(crate) fn peak_flops(device: &Device) -> Option<f64> {
    if !device.is_cuda() {
        return None;
    }
    // H100/H200 SXM dense bf16. Other GPUs: set MOEQ_PEAK_TFLOPS.
    let tflops = std::env::var("MOEQ_PEAK_TFLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(989.0);
    Some(tflops * 1e12)
}

/// FLOPs per trained token with a frozen base and full recompute: 6·N_active (forward,
/// recompute, input gradient) plus attention (3 passes × 2·S·(d_qk + d_v) per head and layer:
/// the q·kᵀ and p·v products, causal half counted in full as the kernel computes it).
pub fn flops_per_token(spec: &crate::arch::ArchSpec, seq: usize) -> f64 {
    let n_active = spec.active_params() as f64 - (spec.vocab_size * spec.hidden_size) as f64;
    let per_head = 2 * seq * (spec.head_dim + spec.v_head_dim());
    let attn = 3.0 * (per_head * spec.num_heads * spec.num_layers) as f64;
    6.0 * n_active + attn
}

pub(crate) struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// A new `metrics.jsonl`, or, when resuming from step `from`, the existing one without the
    /// records of the steps after `from` (they are trained again), continued.
    pub(crate) fn create(dir: &Path, from: usize) -> Result<Metrics, TrainError> {
        let path = dir.join("metrics.jsonl");
        let append = from > 0;
        if append {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s as usize <= from)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                let tmp = dir.join(".metrics.jsonl.tmp");
                std::fs::write(&tmp, kept)
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .map_err(|e| failed(format!("{}: {e}", path.display())))?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|e| failed(format!("{}: {e}", path.display())))?;
        Ok(Metrics { file })
    }

    /// Appends one record as one write of the whole line, so a reader tailing the file (a
    /// dashboard, a test) never sees half a record (`writeln!` on a file writes piece by piece).
    pub(crate) fn write(&mut self, v: &Value) -> Result<(), TrainError> {
        self.file
            .write_all(format!("{v}\n").as_bytes())
            .map_err(failed)?;
        self.file.flush().map_err(failed)
    }
}
