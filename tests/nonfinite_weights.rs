//! A frozen weight holding NaN or Inf is named before training: a warning per tensor with its
//! count (the run goes on), or with `strict_weights: true` one error line and no output.

mod common;
use common::moeq;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

const NAN: u16 = 0x7FC0; // bf16 quiet NaN
const INF: u16 = 0x7F80; // bf16 +Inf
const NEG_INF: u16 = 0xFF80;

/// Sets `values` (element index → bf16 bits) in tensor `name` of the model's one shard.
fn poison(dir: &Path, name: &str, values: &[(usize, u16)]) {
    let shard = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut data: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    for (n, t) in file.tensors() {
        data.insert(
            n.clone(),
            (t.dtype(), t.shape().to_vec(), t.data().to_vec()),
        );
    }
    let (dtype, _, raw) = data
        .get_mut(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    assert_eq!(*dtype, Dtype::BF16);
    for &(i, bits) in values {
        raw[2 * i..2 * i + 2].copy_from_slice(&bits.to_le_bytes());
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &shard).unwrap();
}

fn config(root: &Path, model: &Path, extra: &str) -> std::path::PathBuf {
    let data = root.join("data.jsonl");
    let rows: Vec<String> = (0..24)
        .map(|i| format!("{{\"text\": \"row {i}: seven small birds sing near the old river\"}}"))
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let path = root.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "base_model: {}\ndevice: cpu\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\n\
             lora_target_modules: [q_proj, v_proj]\ndatasets:\n  - path: {}\n    type: completion\n\
             sequence_len: 64\nmicro_batch_size: 2\nmax_steps: 2\noutput_dir: {}\n{extra}",
            model.display(),
            data.display(),
            root.join("out").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn nonfinite_frozen_weights_are_named_before_training() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let model = root.join("model");
    let opts = moeq::synth::SynthOptions {
        model_type: moeq::arch::ModelType::Qwen3Moe,
        layout: moeq::synth::DiskLayout::Hub,
        shard_bytes: 1 << 40,
        ..moeq::synth::SynthOptions::default()
    };
    moeq::synth::write(&opts, &model).unwrap();
    // A quantized attention weight (4 values), one expert of a fused expert parameter (2 values,
    // reported under the canonical name) and a dense norm weight (1 value).
    poison(
        &model,
        "model.layers.0.self_attn.q_proj.weight",
        &[(3, NAN), (17, INF), (18, NEG_INF), (500, NAN)],
    );
    poison(
        &model,
        "model.layers.1.mlp.experts.3.up_proj.weight",
        &[(0, NAN), (9, INF)],
    );
    poison(&model, "model.norm.weight", &[(5, NAN)]);

    let (code, _, err) = moeq(&[
        "train",
        "--config",
        config(root, &model, "").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for (name, n) in [
        ("model.layers.0.self_attn.q_proj.weight", 4),
        ("model.layers.1.mlp.experts.gate_up_proj", 2),
        ("model.norm.weight", 1),
    ] {
        let line = format!("frozen weight '{name}' holds {n} NaN/Inf values");
        assert!(err.contains(&line), "missing warning: {line}\n{err}");
    }
    assert_eq!(err.matches("NaN/Inf values").count(), 3, "{err}");

    std::fs::remove_dir_all(root.join("out")).unwrap();
    let strict = config(root, &model, "strict_weights: true\n");
    let (code, _, err) = moeq(&["train", "--config", strict.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("frozen weight 'model.layers.0.self_attn.q_proj.weight' holds 4 NaN/Inf values (and 2 more tensors)"),
        "{err}"
    );
    assert!(!root.join("out/adapter_model.safetensors").exists());
}
