//! axolotl's own MoE example configs (`tests/fixtures/axolotl/`, copied unchanged from axolotl;
//! SOURCE.md names the commit and license) through `moeq train`, with only `base_model` (a tiny
//! synthetic model of a supported type), the dataset paths, `output_dir`,
//! `dataset_prepared_path` and a two-step limit changed. Each example either trains or stops
//! with one error line per problem naming what moeq does not do (a config's problems come
//! together); the stops behind the first are pinned too: the test applies each stop's fixes (an
//! 4-bit optimizer becomes `adamw_bnb_8bit`, a refused key is removed, ...) and expects the next
//! stop, down to a config that trains (today every example ends there). When moeq learns a
//! feature, its line here changes.

mod common;
use common::moeq;
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// What the next run of an example must do.
enum Next {
    /// Exit 0 after two steps, with an adapter written.
    Trains,
    /// Exit 2 with one error line per problem, each containing its text (a config's problems
    /// are reported together); then apply the fixes and run again.
    Stops(Vec<(&'static str, Fix)>),
}

enum Fix {
    Remove(&'static str),
    Set(&'static str, &'static str),
}

use Fix::*;
use Next::*;

const LOW_BIT_OPTIMIZER: &str = "key 'optimizer' must be one of";
const DISTRIBUTION: &str = "moeq does its own distribution";

/// The expected chain of every example, by fixture file name.
fn chains() -> Vec<(&'static str, Vec<Next>)> {
    let eight_bit = || (LOW_BIT_OPTIMIZER, Set("optimizer", "adamw_bnb_8bit"));
    let refused = |key| match key {
        "fsdp" | "fsdp_config" | "deepspeed" => (DISTRIBUTION, Remove(key)),
        "nvfp4_merge_aware" => ("key 'nvfp4_merge_aware' is not supported", Remove(key)),
        "model_quantization_config" => (
            "key 'model_quantization_config' is not supported",
            Remove(key),
        ),
        "model_quantization_config_kwargs" => (
            "key 'model_quantization_config_kwargs' is not supported",
            Remove(key),
        ),
        other => panic!("no refusal text for {other}"),
    };
    vec![
        (
            "deepseek-v2--qlora-fsdp-2_5.yaml",
            vec![Stops(vec![refused("fsdp"), refused("fsdp_config")]), Trains],
        ),
        (
            "expert_parallel--qwen3_30ba3b_ep_lora_4gpu.yaml",
            vec![Trains],
        ),
        (
            "gemma4--26b-a4b-moe-qlora.yaml",
            // Its end-of-turn token is not one token of the stand-in model's tokenizer.
            vec![
                Stops(vec![("eot_tokens: '<turn|>' is", Remove("eot_tokens"))]),
                Trains,
            ],
        ),
        ("glm45--glm-45-air-qlora.yaml", vec![Trains]),
        ("glm47-flash--qlora.yaml", vec![Trains]),
        (
            "gpt-oss--gpt-oss-20b-sft-lora-singlegpu.yaml",
            vec![
                Stops(vec![
                    refused("model_quantization_config"),
                    refused("model_quantization_config_kwargs"),
                ]),
                Stops(vec![("eot_tokens: '<|end|>' is", Remove("eot_tokens"))]),
                Trains,
            ],
        ),
        (
            "llama-4--scout-qlora-single-h100-flex.yaml",
            vec![Stops(vec![eight_bit()]), Trains],
        ),
        (
            "minimax--m2-qlora.yaml",
            vec![Stops(vec![refused("fsdp_config")]), Trains],
        ),
        (
            "mistral--mixtral--mixtral.yml",
            vec![
                Stops(vec![refused("deepspeed")]),
                Stops(vec![(
                    "model_config.output_router_logits: true adds the router's load-balancing loss",
                    Remove("model_config"),
                )]),
                Trains,
            ],
        ),
        ("qwen--qwen2-moe-lora.yaml", vec![Trains]),
        ("qwen--qwen2-moe-qlora.yaml", vec![Trains]),
        (
            "qwen3--30b-a3b-nvfp4-lora.yaml",
            vec![Stops(vec![refused("nvfp4_merge_aware")]), Trains],
        ),
        ("qwen3-next--qwen3-next-80b-a3b-qlora.yaml", vec![Trains]),
        ("qwen3.5--35b-a3b-moe-qlora.yaml", vec![Trains]),
    ]
}

/// The tiny model standing in for an example's base model: its own type where moeq has it,
/// else qwen3_moe; 8,192 positions so the examples' sequence lengths fit.
fn tiny_model(root: &Path, example: &str) -> PathBuf {
    let arch = if example.contains("qwen2-moe") {
        "qwen2_moe"
    } else if example.contains("mixtral") {
        "mixtral"
    } else {
        "qwen3_moe"
    };
    let dir = root.join(format!("model-{arch}"));
    if !dir.exists() {
        let (code, _, err) = moeq(&["synth", "--arch", arch, "--out", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["max_position_embeddings"] = 8192.into();
        std::fs::write(&path, config.to_string()).unwrap();
    }
    dir
}

/// Records shaped as each example's dataset is (alpaca rows, chat `messages`, ShareGPT
/// `conversations` of from/value, messages with a reasoning field), enough of them to fill the
/// largest example's first steps (micro-batch 8 of 4,096 packed tokens).
fn datasets(root: &Path) {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
        "small", "birds", "sing", "softly", "near", "old", "river",
    ];
    let mut state = 12345u64;
    let mut text = |n: usize| {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                words[(state >> 33) as usize % words.len()]
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (mut alpaca, mut messages, mut conversations, mut thinking) =
        (String::new(), String::new(), String::new(), String::new());
    for _ in 0..1200 {
        let (q, a, r) = (text(12), text(16), text(8));
        let rec = |v: serde_json::Value| v.to_string() + "\n";
        alpaca += &rec(serde_json::json!({"instruction": q, "input": "", "output": a}));
        messages += &rec(serde_json::json!({"messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]}));
        conversations += &rec(serde_json::json!({"conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": a}]}));
        thinking += &rec(serde_json::json!({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": a, "thinking": r}]}));
    }
    for (name, body) in [
        ("alpaca", alpaca),
        ("messages", messages),
        ("conversations", conversations),
        ("thinking", thinking),
    ] {
        std::fs::write(root.join(format!("{name}.jsonl")), body).unwrap();
    }
}

/// The example with only the allowed changes.
fn adapted(root: &Path, example: &str) -> Mapping {
    let path = Path::new("tests/fixtures/axolotl").join(example);
    let text = std::fs::read_to_string(&path).unwrap();
    let Value::Mapping(mut c) = serde_yaml::from_str(&text).unwrap() else {
        panic!("{example} is not a mapping")
    };
    let s = |v: &Path| Value::String(v.display().to_string());
    c.insert("base_model".into(), s(&tiny_model(root, example)));
    let Some(Value::Sequence(sets)) = c.get_mut("datasets") else {
        panic!("{example} has no datasets")
    };
    for set in sets {
        let Value::Mapping(set) = set else { panic!() };
        let kind = set.get("type").and_then(Value::as_str).unwrap_or("");
        let file = if kind == "alpaca" {
            "alpaca"
        } else if set.get("field_messages").and_then(Value::as_str) == Some("conversations") {
            "conversations"
        } else if set.contains_key("field_thinking") {
            "thinking"
        } else {
            "messages"
        };
        set.insert("path".into(), s(&root.join(format!("{file}.jsonl"))));
    }
    let out = root.join(format!("out-{example}"));
    c.insert("output_dir".into(), s(&out));
    if c.get("dataset_prepared_path").is_some_and(|v| !v.is_null()) {
        c.insert(
            "dataset_prepared_path".into(),
            s(&root.join(format!("prepared-{example}"))),
        );
    }
    c.insert("max_steps".into(), 2.into());
    c
}

fn apply(c: &mut Mapping, fix: &Fix) {
    match *fix {
        Remove(key) => {
            assert!(c.remove(key).is_some(), "no key '{key}' to remove");
        }
        Set(key, value) => {
            c.insert(key.into(), value.into());
        }
    }
}

#[test]
fn axolotl_moe_examples_train_or_stop_with_a_named_reason() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    datasets(root);
    let chains = chains();
    let fixtures: Vec<String> = std::fs::read_dir("tests/fixtures/axolotl")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    for f in &fixtures {
        assert!(
            chains.iter().any(|(n, _)| n == f),
            "fixture {f} has no expected chain"
        );
    }
    assert_eq!(chains.len(), 14, "axolotl's 14 MoE examples");
    for (example, chain) in chains {
        let mut config = adapted(root, example);
        for (i, next) in chain.iter().enumerate() {
            let path = root.join(format!("config-{example}"));
            std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
            let out = root.join(format!("out-{example}"));
            let _ = std::fs::remove_dir_all(&out);
            let (code, _, err) = moeq(&["train", "--config", path.to_str().unwrap()]);
            let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
            let at = format!("{example}, run {}", i + 1);
            match next {
                Trains => {
                    assert_eq!(code, 0, "{at}: expected to train\n{err}");
                    assert!(
                        out.join("adapter_model.safetensors").is_file(),
                        "{at}: no adapter"
                    );
                }
                Stops(problems) => {
                    assert_eq!(code, 2, "{at}: expected to stop\n{err}");
                    assert_eq!(
                        errors.len(),
                        problems.len(),
                        "{at}: one line per problem\n{err}"
                    );
                    for (text, _) in problems {
                        assert!(
                            errors.iter().any(|l| l.contains(text)),
                            "{at}: expected '{text}'\n{err}"
                        );
                    }
                    assert!(!out.join("adapter_model.safetensors").exists());
                }
            }
            if let Stops(problems) = next {
                for (_, fix) in problems {
                    apply(&mut config, fix);
                }
            }
        }
    }
}
