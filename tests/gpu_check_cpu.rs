//! The device-vs-CPU machinery of `moeq gpu-check` (ops and the whole training step), run on
//! the CPU so CI exercises it. A binary of its own: its rows switch process-wide settings that
//! change the rounding (`MOEQ_JOINT_LORA`), which the exact comparisons of
//! tests/trainer_grads.rs must not see flip beside them.

use candle_core::Device;

/// f32 must agree with itself and bf16 within the stated tolerances.
#[test]
fn gpu_check_machinery_on_the_cpu() {
    let mut results = moeq::gpu_check::train_step::run_all(&Device::Cpu).unwrap();
    results.extend(moeq::gpu_check::ops::run_all(&Device::Cpu).unwrap());
    assert!(results.len() >= 16 + 30);
    for r in &results {
        assert!(r.passed(), "{r}");
    }
}
