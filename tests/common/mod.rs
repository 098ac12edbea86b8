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

/// Adapters of `spec` at rank 4 (α 8) on `modules` and the expert `parameters`, every A and B
/// drawn uniformly from ±`bound` by `seed` (PEFT starts B at zero, an adapter that changes
/// nothing).
#[allow(dead_code)]
pub fn random_adapters(
    spec: &moeq::arch::ArchSpec,
    modules: &[&str],
    parameters: &[&str],
    seed: u64,
    bound: f32,
) -> moeq::lora::Adapters {
    use rand::{Rng, SeedableRng};
    let cpu = candle_core::Device::Cpu;
    let settings = moeq::lora::LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: modules.iter().map(|m| m.to_string()).collect(),
        target_parameters: parameters.iter().map(|p| p.to_string()).collect(),
    };
    let a = moeq::lora::Adapters::new(spec, settings, 1, &cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (_, v) in a.vars() {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        v.set(&candle_core::Tensor::from_vec(vals, v.shape(), &cpu).unwrap())
            .unwrap();
    }
    a
}

/// Both expert parameters, as `lora_target_parameters` names them.
#[allow(dead_code)]
pub const EXPERT_PARAMETERS: [&str; 2] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"];
