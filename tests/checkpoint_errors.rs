//! Damaged or inconsistent model directories fail with one line naming the file and problem.

use moeq::arch::ModelType;
use moeq::model_files::ModelDir;
use moeq::synth::{self, DiskLayout, SynthOptions};
use std::path::Path;

fn synth_into(dir: &Path, shard_bytes: u64) {
    let opts = SynthOptions {
        model_type: ModelType::Qwen3Moe,
        layout: DiskLayout::Hub,
        shard_bytes,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).unwrap();
}

fn open_err(dir: &Path) -> String {
    match ModelDir::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_directory_and_missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    assert_eq!(
        open_err(&missing),
        format!(
            "{}: model directory does not exist (give a Hugging Face model directory or synth://<arch>/<preset>)",
            missing.display()
        )
    );
    assert_eq!(
        open_err(tmp.path()),
        format!(
            "{}: no config.json: not a Hugging Face model directory",
            tmp.path().display()
        )
    );
}

#[test]
fn unsupported_model_type_lists_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 8}"#,
    )
    .unwrap();
    assert_eq!(
        open_err(tmp.path()),
        format!(
            "{}: unsupported model_type 'llama' (supported: qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe, glm4_moe_lite, deepseek_v2, deepseek_v3, kimi_k2, flex_olmo, minimax_m2, ernie4_5_moe, granitemoe, hunyuan_v1_moe, gpt_oss, granitemoeshared, llama4_text, qwen3_next, qwen3_5_moe_text)",
            tmp.path().join("config.json").display()
        )
    );
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    synth_into(tmp.path(), 100_000);
    let shard = tmp.path().join("model-00002-of-00004.safetensors");
    std::fs::remove_file(&shard).unwrap();
    assert_eq!(
        open_err(tmp.path()),
        format!(
            "{}: lists shard 'model-00002-of-00004.safetensors', which is missing: the download is incomplete",
            tmp.path().join("model.safetensors.index.json").display()
        )
    );
}

#[test]
fn truncated_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    synth_into(tmp.path(), u64::MAX);
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let want = format!(
        "{}: header describes a different data size than the file holds ({} bytes): truncated or damaged, re-download it",
        file.display(),
        bytes.len() - 100
    );
    assert_eq!(open_err(tmp.path()), want);
}

#[test]
fn header_length_that_lies_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    synth_into(tmp.path(), u64::MAX);
    let file = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let lie = (bytes.len() as u64 * 2).to_le_bytes();
    bytes[..8].copy_from_slice(&lie);
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(
        open_err(tmp.path()),
        format!(
            "{}: header length field is larger than the file: truncated or not a safetensors file",
            file.display()
        )
    );
    std::fs::write(&file, b"tiny").unwrap();
    assert_eq!(
        open_err(tmp.path()),
        format!(
            "{}: file is 4 bytes: too short to be safetensors (truncated download?)",
            file.display()
        )
    );
}

#[test]
fn shapes_inconsistent_with_config_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    synth_into(tmp.path(), u64::MAX);
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = 48.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let err = dir
        .read_experts(0, moeq::model_files::ExpertParam::Down, 0..1)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: tensor 'model.layers.0.mlp.experts.0.down_proj.weight' has shape [64, 32] but config.json implies [64, 48]",
            tmp.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn bad_config_values_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    let cases = [
        (
            r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "vocab_size": 10}"#,
            "key 'num_key_value_heads' must divide num_attention_heads (4), got 3",
        ),
        (
            r#"{"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 2, "num_experts_per_tok": 3, "intermediate_size": 8, "vocab_size": 10}"#,
            "key 'num_experts_per_tok' (3) exceeds num_local_experts (2)",
        ),
        (
            r#"{"model_type": "olmoe", "hidden_size": "64"}"#,
            "key 'hidden_size' must be a non-negative integer, got \"64\"",
        ),
        (
            r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "vocab_size": 10, "rope_scaling": {"rope_type": "magic", "factor": 2.0}}"#,
            "key 'rope_scaling' has unsupported rope type \"magic\" (supported: default, linear, dynamic, yarn, llama3, longrope)",
        ),
        (
            r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 10}"#,
            "key 'moe_intermediate_size' is required",
        ),
    ];
    for (json, want) in cases {
        std::fs::write(&cfg, json).unwrap();
        assert_eq!(open_err(tmp.path()), format!("{}: {want}", cfg.display()));
    }
}

/// gpt-oss's MXFP4 experts: blocks that disagree with config.json, and a NaN scale byte, are
/// named with the tensor (and the expert) at fault.
#[test]
fn mxfp4_experts_that_disagree_or_hold_nan_scales_are_reported() {
    use moeq::model_files::ExpertParam;
    let tmp = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        model_type: ModelType::GptOss,
        layout: DiskLayout::Mxfp4,
        ..SynthOptions::default()
    };
    synth::write(&opts, tmp.path()).unwrap();
    let cfg_path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["intermediate_size"] = 64.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = ModelDir::open(tmp.path())
        .unwrap()
        .read_experts(0, ExpertParam::Down, 0..1)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: tensor 'model.layers.0.mlp.experts.down_proj_blocks' has shape [8, 64, 1, 16] but config.json implies [8, 64, 2, 16]",
            tmp.path().join("model.safetensors").display()
        )
    );
    std::fs::write(&cfg_path, text).unwrap();
    // Scale byte 255 (NaN in E8M0) in expert 3's scales of layer 1's down_proj.
    let file = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let name = "model.layers.1.mlp.experts.down_proj_scales";
    let info = dir.locate(name).unwrap().info(name).unwrap().clone();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[header + info.data_offsets.0 + 3 * 64] = 255;
    drop(dir);
    std::fs::write(&file, &bytes).unwrap();
    let err = ModelDir::open(tmp.path())
        .unwrap()
        .read_experts(1, ExpertParam::Down, 2..5)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}: 'model.layers.1.mlp.experts.down_proj_blocks' expert 3: ",
            tmp.path().display()
        )),
        "{err}"
    );
    assert!(err.contains("NaN") && !err.contains('\n'), "{err}");
}
