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

/// `moeq eval` logits of `model` (16-bit base, f32 on the CPU), with `adapter` if given, on the
/// lines of `data`, dumped to `out`.
#[allow(dead_code)]
pub fn eval_logits(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    data: &std::path::Path,
    out: &std::path::Path,
) -> candle_core::Tensor {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--quant-type",
        "none",
    ];
    args.extend(["--device", "cpu", "--data", data.to_str().unwrap()]);
    args.extend(["--dump-logits", out.to_str().unwrap()]);
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let (code, _, err) = moeq(&args);
    assert_eq!(code, 0, "{err}");
    candle_core::safetensors::load(out, &candle_core::Device::Cpu).unwrap()["logits"].clone()
}

/// max|a − b| / max|b|.
#[allow(dead_code)]
pub fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}
