//! The text model of a multimodal Qwen3.5 checkpoint (`qwen3_5_moe`:
//! `Qwen3_5MoeForConditionalGeneration`, the text config under `text_config`, the text weights
//! under `model.language_model.`, `lm_head.weight` as it is, vision weights under
//! `model.visual.`): moeq computes what it computes on the same weights as a `qwen3_5_moe_text`
//! checkpoint, `moeq merge` keeps the multimodal file as it is (vision bytes untouched), updates
//! added, and `moeq train` reads it.

mod common;
use common::{eval_logits, moeq, multimodal_of, random_adapters, rel, EXPERT_PARAMETERS};
use moeq::arch::ModelType;
use moeq::lora::peft;
use moeq::model_files::ModelDir;
use std::collections::HashMap;
use std::path::Path;

const VISION: [(&str, [usize; 2]); 2] = [
    ("model.visual.patch_embed.proj.weight", [8, 12]),
    ("model.visual.blocks.0.attn.qkv.weight", [24, 8]),
];

/// The tiny `qwen3_5_moe_text` checkpoint at `text`, and the same weights as a multimodal
/// checkpoint at `multi` (`model.` as `model.language_model.`, plus two vision tensors).
fn both(text: &Path, multi: &Path) {
    let config = |mut text_config: serde_json::Value| {
        text_config["model_type"] = serde_json::json!("qwen3_5_moe_text");
        serde_json::json!({
            "model_type": "qwen3_5_moe",
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "text_config": text_config,
            "vision_config": {"model_type": "qwen3_5_moe", "hidden_size": 8, "depth": 1},
            "tie_word_embeddings": false,
        })
    };
    let rename = |k: &str| match k.strip_prefix("model.") {
        Some(rest) => format!("model.language_model.{rest}"),
        None => k.to_string(),
    };
    multimodal_of(
        ModelType::Qwen35MoeText,
        (text, multi),
        rename,
        &VISION,
        config,
    );
}

/// Every tensor of a safetensors file: its raw bytes and shape, by name.
fn raw(path: &Path) -> HashMap<String, (Vec<u8>, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.data().to_vec(), v.shape().to_vec())))
        .collect()
}

/// Same weights, same logits (bit for bit: the same reads and arithmetic); the merged
/// multimodal checkpoint keeps every name and shape (the vision tensors byte for byte) and
/// computes what the base with the adapter computes (f32: relative 1e-5, as in
/// tests/merge_cli.rs).
#[test]
fn the_text_model_of_a_multimodal_checkpoint_trains_evaluates_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let (text, multi) = (tmp.path().join("text"), tmp.path().join("multi"));
    both(&text, &multi);
    let md = ModelDir::open(&multi).unwrap();
    assert_eq!(md.spec.model_type, ModelType::Qwen35MoeText);
    assert_eq!(md.spec.weights_prefix, ("model.", "model.language_model."));
    assert_eq!(md.spec.linear_layers, [true, false, true, false]);
    // Longer than the delta rule's 64-position chunk.
    let data = tmp.path().join("d.jsonl");
    let ids: Vec<u32> = (0..80).map(|k| (k * 41 + 7) % 512).collect();
    std::fs::write(&data, serde_json::json!({ "input_ids": ids }).to_string()).unwrap();
    let a = eval_logits(&text, None, &data, &tmp.path().join("t.st"));
    let b = eval_logits(&multi, None, &data, &tmp.path().join("m.st"));
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    let adapters = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 5, 0.2);
    assert!(adapters
        .linear
        .contains_key("model.layers.0.linear_attn.in_proj_qkv"));
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
    let merged = raw(&out.join("model.safetensors"));
    let original = raw(&multi.join("model.safetensors"));
    let shapes = |m: &HashMap<String, (Vec<u8>, Vec<usize>)>| {
        let mut v: Vec<(String, Vec<usize>)> =
            m.iter().map(|(n, (_, s))| (n.clone(), s.clone())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&merged), shapes(&original));
    for (name, _) in VISION {
        assert!(merged[name].0 == original[name].0, "{name} changed");
    }
    // The linear-attention projections of the multimodal names got their updates.
    let qkv = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight";
    assert!(merged[qkv].0 != original[qkv].0, "{qkv} unchanged");
    let conv = "model.language_model.layers.0.linear_attn.conv1d.weight";
    assert!(merged[conv].0 == original[conv].0, "{conv} changed");
    let with = eval_logits(&multi, Some(&adapter), &data, &tmp.path().join("w.st"));
    let got = eval_logits(&out, None, &data, &tmp.path().join("g.st"));
    assert!(rel(&got, &with) <= 1e-5, "{}", rel(&got, &with));
    assert!(rel(&a, &with) > 1e-3, "the adapter changed nothing");

    // Training reads it too (CPU, a few steps of the tiny model).
    let run = tmp.path().join("run");
    let config = format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: pretokenized\nsequence_len: 80\nmicro_batch_size: 1\nmax_steps: 2\nlearning_rate: 0.001\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [in_proj_qkv, out_proj, q_proj]\nlora_target_parameters: [mlp.experts.gate_up_proj]\noutput_dir: {}\ndevice: cpu\n",
        multi.display(),
        data.display(),
        run.display()
    );
    let cfg = tmp.path().join("c.yaml");
    std::fs::write(&cfg, config).unwrap();
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let saved = raw(&run.join("adapter_model.safetensors"));
    assert!(
        saved
            .keys()
            .any(|n| n.contains("layers.2.linear_attn.in_proj_qkv.lora_A")),
        "{:?}",
        saved.keys()
    );
}
