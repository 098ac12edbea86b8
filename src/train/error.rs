//! How training fails: bad input (config, model, data) or a failure while running, as one
//! line that names the problem and, where there is one, the fix.

use super::step::Activations;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The input (config, model, data) cannot be trained on.
    #[error("{0}")]
    Input(String),
    /// Training failed while running.
    #[error("{0}")]
    Failed(String),
}

pub(crate) fn failed(e: impl std::fmt::Display) -> TrainError {
    TrainError::Failed(e.to_string())
}

/// What a run keeps for the backward, as it runs (an environment variable may override a key),
/// and its micro-batch: the settings an out-of-memory error names, in the order they lower the
/// peak for the least speed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub activations: Activations,
    /// The recompute takes each layer's attention output from its first forward.
    pub attention_kept: bool,
    pub micro_batch_size: usize,
}

impl Memory {
    /// The settings that would lower the peak, cheapest first (those not in effect already).
    fn fix(self) -> String {
        let mut steps = Vec::new();
        if self.activations == Activations::Keep {
            steps.push("set gradient_checkpointing: true (recompute each layer in the backward)");
        } else {
            if self.attention_kept {
                steps.push("run each layer's attention again in the recompute (recompute_attention: true, MOEQ_KEEP_ATTENTION unset)");
            }
            if self.activations != Activations::Offload {
                steps.push(
                    "set activation_offloading: true (park the saved layer inputs in host memory)",
                );
            }
        }
        if self.micro_batch_size > 1 {
            steps.push(
                "lower micro_batch_size (raise gradient_accumulation_steps to keep the batch)",
            );
        }
        steps.push("lower sequence_len");
        steps.join(", or ")
    }
}

/// A failed forward/backward; a device out of memory says which settings lower the peak.
pub(crate) fn step_failed(e: impl std::fmt::Display, memory: Memory) -> TrainError {
    let msg = e.to_string();
    let lower = msg.to_ascii_lowercase();
    if !lower.contains("out of memory") && !lower.contains("alloc_failed") {
        return TrainError::Failed(msg);
    }
    // One line: the device error's first (a backtrace may follow).
    let msg = msg.lines().next().unwrap_or_default().trim_end();
    TrainError::Failed(format!(
        "{msg}: the device ran out of memory in a training step; {}",
        memory.fix()
    ))
}

#[cfg(test)]
mod tests {
    use super::{step_failed, Memory};
    use crate::train::step::Activations;

    const fn memory(checkpointing: bool, rerun: bool, offload: bool) -> Memory {
        let activations = match (checkpointing, offload) {
            (false, _) => Activations::Keep,
            (true, false) => Activations::Recompute,
            (true, true) => Activations::Offload,
        };
        Memory {
            activations,
            attention_kept: checkpointing && !rerun,
            micro_batch_size: 4,
        }
    }

    #[test]
    fn out_of_memory_names_the_settings_that_lower_the_peak() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let frame = format!("{oom}\n   0: backtrace frame\n");
        let kept = step_failed(frame, memory(false, true, false)).to_string();
        assert!(!kept.contains('\n'), "{kept}");
        assert!(kept.starts_with(oom), "{kept}");
        assert!(kept.contains("set gradient_checkpointing: true"), "{kept}");
        assert!(!kept.contains("recompute_attention"), "{kept}");
        // The recompute with the attention outputs kept: first the rerun, then offloading.
        let memo = step_failed(oom, memory(true, false, false)).to_string();
        let (rerun, offload) = (
            memo.find("recompute_attention: true").expect(&memo),
            memo.find("set activation_offloading: true").expect(&memo),
        );
        assert!(rerun < offload, "{memo}");
        assert!(!memo.contains("gradient_checkpointing"), "{memo}");
        // Kept outputs with offloading on: the rerun, not offloading again.
        let parked = step_failed(oom, memory(true, false, true)).to_string();
        assert!(parked.contains("recompute_attention: true"), "{parked}");
        assert!(!parked.contains("activation_offloading"), "{parked}");
        // Everything lowered already: only the batch's shape is left, and at micro-batch 1
        // only the sequence.
        let lowest = step_failed(oom, memory(true, true, true)).to_string();
        assert!(
            lowest.ends_with("training step; lower micro_batch_size (raise gradient_accumulation_steps to keep the batch), or lower sequence_len"),
            "{lowest}"
        );
        let one = Memory {
            micro_batch_size: 1,
            ..memory(true, true, true)
        };
        let one = step_failed(oom, one).to_string();
        assert!(one.ends_with("training step; lower sequence_len"), "{one}");
        let cublas = step_failed(
            "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED",
            memory(true, true, false),
        );
        assert!(cublas.to_string().contains("ran out of memory"), "{cublas}");
        let other = step_failed("shape mismatch", memory(false, true, false)).to_string();
        assert_eq!(other, "shape mismatch");
    }
}
