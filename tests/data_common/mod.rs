//! Helpers shared by the tests/data_*.rs suites.
#![allow(dead_code)]

use moeq::config::TrainConfig;
use moeq::data::TokenizerBundle;
use std::path::{Path, PathBuf};

/// A model directory holding moeq's synthetic tokenizer (tokenizer.json and
/// tokenizer_config.json with the ChatML template, eos `<|endoftext|>`).
pub fn synth_tokenizer_dir(dir: &Path) -> PathBuf {
    let t = moeq::synth::tokenizer::build(2048);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), t.json.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), t.config.to_string()).unwrap();
    dir.to_path_buf()
}

pub fn synth_bundle(tmp: &Path) -> TokenizerBundle {
    let dir = synth_tokenizer_dir(&tmp.join("model"));
    TokenizerBundle::load(&dir, None).unwrap()
}

/// A config from YAML with `base_model: /m` prepended.
pub fn config(yaml: &str) -> TrainConfig {
    TrainConfig::from_yaml_str(&format!("base_model: /m\n{yaml}"), "t.yaml")
        .unwrap()
        .config
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

/// Decoded tokens of `ids`, for readable assertion failures.
pub fn show(tok: &TokenizerBundle, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.token(i).unwrap_or_default())
        .collect()
}
