//! The text model of a multimodal Llama 4 checkpoint (`llama4`: `Llama4ForConditionalGeneration`,
//! the text config under `text_config`, the text weights under `language_model.`, vision weights
//! beside them): moeq computes what it computes on the same weights as a `llama4_text`
//! checkpoint, and `moeq merge` keeps the multimodal file as it is, updates added.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{eval_logits, moeq, multimodal_of, random_adapters, rel, EXPERT_PARAMETERS};
use moeq::arch::ModelType;
use moeq::lora::peft;
use moeq::model_files::ModelDir;
use std::path::Path;

const VISION: &str = "vision_model.patch_embedding.linear.weight";

/// The tiny `llama4_text` checkpoint at `text`, and the same weights as a multimodal
/// checkpoint at `multi` (under `language_model.`, plus one vision tensor).
fn both(text: &Path, multi: &Path) {
    let config = |text_config| {
        serde_json::json!({
            "model_type": "llama4",
            "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": text_config,
            "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 4},
            "tie_word_embeddings": false,
        })
    };
    let rename = |k: &str| format!("language_model.{k}");
    multimodal_of(
        ModelType::Llama4Text,
        (text, multi),
        rename,
        &[(VISION, [3, 4])],
        config,
    );
}

fn max_diff(x: &Tensor, y: &Tensor) -> f32 {
    let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar().unwrap()
}

/// Same weights, same logits (bit for bit: the same reads and arithmetic); the merged
/// multimodal checkpoint keeps every name (the vision tensor untouched) and computes what the
/// base with the adapter computes (f32: relative 1e-5, as in tests/merge_cli.rs).
#[test]
fn the_text_model_of_a_multimodal_checkpoint_trains_evaluates_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let (text, multi) = (tmp.path().join("text"), tmp.path().join("multi"));
    both(&text, &multi);
    let md = ModelDir::open(&multi).unwrap();
    assert_eq!(md.spec.model_type, ModelType::Llama4Text);
    assert_eq!(md.spec.weights_prefix, ("", "language_model."));
    let data = tmp.path().join("d.jsonl");
    let ids: Vec<u32> = (0..20).map(|k| (k * 41 + 7) % 512).collect();
    std::fs::write(&data, serde_json::json!({ "input_ids": ids }).to_string()).unwrap();
    let a = eval_logits(&text, None, &data, &tmp.path().join("t.st"));
    let b = eval_logits(&multi, None, &data, &tmp.path().join("m.st"));
    assert_eq!(max_diff(&a, &b), 0.0);

    let adapters = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 5, 0.2);
    let adapter = tmp.path().join("adapter");
    peft::save(&adapters, "base", &adapter).unwrap();
    let out = tmp.path().join("merged");
    let args = ["merge", "--model", multi.to_str().unwrap(), "--adapter"];
    let (code, _, err) = moeq(
        &[
            &args[..],
            &[adapter.to_str().unwrap(), "--out", out.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let merged = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu);
    let merged = merged.unwrap();
    let original = candle_core::safetensors::load(multi.join("model.safetensors"), &Device::Cpu);
    let original = original.unwrap();
    let mut names: Vec<&String> = merged.keys().collect();
    names.sort();
    let mut want: Vec<&String> = original.keys().collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(max_diff(&merged[VISION], &original[VISION]), 0.0);
    let with = eval_logits(&multi, Some(&adapter), &data, &tmp.path().join("w.st"));
    let got = eval_logits(&out, None, &data, &tmp.path().join("g.st"));
    assert!(rel(&got, &with) <= 1e-5, "{}", rel(&got, &with));
    assert!(rel(&a, &with) > 1e-3, "the adapter changed nothing");
    assert_eq!(merged[VISION].dtype(), DType::F32);

    // Training reads it too (CPU, a few steps of the tiny model).
    let run = tmp.path().join("run");
    let config = format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: pretokenized\nsequence_len: 20\nmicro_batch_size: 1\nmax_steps: 2\nlearning_rate: 0.001\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj]\nlora_target_parameters: [feed_forward.experts.gate_up_proj]\noutput_dir: {}\ndevice: cpu\n",
        multi.display(),
        data.display(),
        run.display()
    );
    let cfg = tmp.path().join("c.yaml");
    std::fs::write(&cfg, config).unwrap();
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        saved["target_parameters"],
        serde_json::json!(["feed_forward.experts.gate_up_proj"])
    );
}
