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

/// The tiny f32 `arch` checkpoint (hub names) at `text`, and the same weights as a multimodal
/// checkpoint at `multi`: the tokenizer files copied, every tensor renamed by `rename`, the
/// `vision` tensors added with random values, and `config(text config.json)` as its config.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn multimodal_of(
    arch: moeq::arch::ModelType,
    (text, multi): (&std::path::Path, &std::path::Path),
    rename: impl Fn(&str) -> String,
    vision: &[(&str, [usize; 2])],
    config: impl Fn(serde_json::Value) -> serde_json::Value,
) {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    let opts = moeq::synth::SynthOptions {
        model_type: arch,
        layout: moeq::synth::DiskLayout::Hub,
        seed: 3,
        dtype: "float32".into(),
        ..Default::default()
    };
    moeq::synth::write(&opts, text).unwrap();
    std::fs::create_dir_all(multi).unwrap();
    for f in std::fs::read_dir(text).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name != "config.json" && !name.ends_with(".safetensors") {
            std::fs::copy(&f, multi.join(&name)).unwrap();
        }
    }
    let weights = candle_core::safetensors::load(text.join("model.safetensors"), &Device::Cpu);
    let mut out: std::collections::HashMap<String, Tensor> = weights
        .unwrap()
        .into_iter()
        .map(|(k, v)| (rename(&k), v))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for (name, shape) in vision {
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        out.insert(
            name.to_string(),
            Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&out, multi.join("model.safetensors")).unwrap();
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(text.join("config.json")).unwrap()).unwrap();
    std::fs::write(multi.join("config.json"), config(text_config).to_string()).unwrap();
}

/// `ArchSpec` of a config value (named `config.json` in messages).
#[allow(dead_code)]
pub fn spec_of(v: &serde_json::Value) -> moeq::arch::ArchSpec {
    moeq::arch::ArchSpec::from_json(v, "config.json").unwrap()
}

/// The one-line error `ArchSpec` gives for a config value.
#[allow(dead_code)]
pub fn spec_error(v: &serde_json::Value) -> String {
    moeq::arch::ArchSpec::from_json(v, "config.json")
        .unwrap_err()
        .to_string()
}
