//! Helpers shared by integration tests.

use std::process::Command;

/// The largest |value| of a tensor of any dtype, as f32.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Runs the `moeq` binary: (exit code, stdout, stderr).
#[allow(dead_code)]
pub fn moeq(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeq"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
