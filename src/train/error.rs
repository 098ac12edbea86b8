//! How training fails: bad input (config, model, data) or a failure while running, as one
//! line that names the problem and, where there is one, the fix.

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

/// A failed forward/backward; a device out of memory says which settings lower the peak.
pub(crate) fn step_failed(e: impl std::fmt::Display, gradient_checkpointing: bool) -> TrainError {
    let msg = e.to_string();
    let lower = msg.to_ascii_lowercase();
    if !lower.contains("out of memory") && !lower.contains("alloc_failed") {
        return TrainError::Failed(msg);
    }
    // One line: the device error's first (a backtrace may follow).
    let msg = msg.lines().next().unwrap_or_default().trim_end();
    let fix = if gradient_checkpointing {
        "lower micro_batch_size or sequence_len"
    } else {
        "set gradient_checkpointing: true (recompute each layer in the backward), or lower micro_batch_size or sequence_len"
    };
    TrainError::Failed(format!(
        "{msg}: the device ran out of memory in a training step; {fix}"
    ))
}

#[cfg(test)]
mod tests {
    use super::step_failed;

    #[test]
    fn out_of_memory_names_the_settings_that_lower_the_peak() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let kept = step_failed(format!("{oom}\n   0: backtrace frame\n"), false).to_string();
        assert!(!kept.contains('\n'), "{kept}");
        assert!(kept.starts_with(oom), "{kept}");
        assert!(kept.contains("set gradient_checkpointing: true"), "{kept}");
        let recomputed = step_failed(oom, true).to_string();
        assert!(
            recomputed.contains("lower micro_batch_size"),
            "{recomputed}"
        );
        assert!(
            !recomputed.contains("gradient_checkpointing"),
            "{recomputed}"
        );
        let cublas = step_failed("cuBLAS: CUBLAS_STATUS_ALLOC_FAILED", false).to_string();
        assert!(cublas.contains("ran out of memory"), "{cublas}");
        let other = step_failed("shape mismatch", false).to_string();
        assert_eq!(other, "shape mismatch");
    }
}
