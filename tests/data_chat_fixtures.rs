//! Chat templates against transformers: the Qwen3, Qwen2.5, Mixtral (current
//! and first) and OLMoE templates render the same text, the same token ids and
//! the same assistant mask as `apply_chat_template(..., return_assistant_tokens_mask=True)`;
//! the published templates of GLM-4.6, GLM-4.7-Flash, DeepSeek-V3.1, gpt-oss,
//! Kimi K2, MiniMax-M2 and Granite 3.3 / 4.0 the same text and token ids as
//! `apply_chat_template(..., tokenize=True)`, and each assistant reply is trained.
//! Expected values: tests/fixtures/data/chat/cases.json, written by
//! tests/fixtures/data/gen_chat_fixtures.py (which says how it derives masks and
//! where the templates come from).

mod data_common;

use data_common::{config, show, write};
use moeq::data::{prepare, ChatTemplate, TokenizerBundle, IGNORE_INDEX};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/chat")
}

/// The fixtures' cases; the first call also pins the date templates see
/// (`strftime_now`) to the one they were generated with, before any test renders.
fn cases() -> Value {
    static PINNED: std::sync::Once = std::sync::Once::new();
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    PINNED.call_once(|| {
        let epoch = cases["date_epoch"]
            .as_u64()
            .expect("cases.json: date_epoch");
        std::env::set_var("SOURCE_DATE_EPOCH", epoch.to_string());
    });
    cases
}

/// The fixtures were made from the tokenizer `moeq synth` writes today.
#[test]
fn fixtures_match_the_synthetic_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_common::synth_tokenizer_dir(tmp.path());
    let bytes = std::fs::read(dir.join("tokenizer.json")).unwrap();
    // transformers' save_pretrained reformats tokenizer.json, so compare the vocabulary.
    let ours: Value = serde_json::from_slice(&bytes).unwrap();
    for v in cases()["variants"].as_array().unwrap() {
        let saved = std::fs::read(
            fixtures()
                .join(v["tokenizer"].as_str().unwrap())
                .join("tokenizer.json"),
        )
        .unwrap();
        let saved: Value = serde_json::from_slice(&saved).unwrap();
        assert_eq!(
            saved["model"]["vocab"], ours["model"]["vocab"],
            "rerun gen_chat_fixtures.py"
        );
        assert_eq!(
            saved["model"]["merges"], ours["model"]["merges"],
            "rerun gen_chat_fixtures.py"
        );
    }
}

fn check_variant(v: &Value, template_key: &str) {
    let name = v["variant"].as_str().unwrap();
    let tok_dir = fixtures().join(v["tokenizer"].as_str().unwrap());
    let template_path = fixtures().join(v[template_key].as_str().unwrap());
    let tok = TokenizerBundle::load(&tok_dir, None).unwrap();
    let source = std::fs::read_to_string(&template_path).unwrap();
    let template = ChatTemplate::compile(&source, name).unwrap();
    let cases = v["cases"].as_array().unwrap();

    // rendering, byte for byte
    for c in cases {
        let record = c["record"].as_object().unwrap();
        let messages = record["messages"].as_array().unwrap();
        let mut extra = serde_json::Map::new();
        if let Some(tools) = record.get("tools") {
            extra.insert("tools".into(), tools.clone());
        }
        let got = template.render(messages, false, &tok, &extra).unwrap();
        assert_eq!(
            got.text,
            c["text"].as_str().unwrap(),
            "{name}/{}: text",
            c["name"]
        );
    }

    // ids and masks through prepare()
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = cases.iter().map(|c| c["record"].to_string()).collect();
    let data = write(tmp.path(), "chats.jsonl", &lines.join("\n"));
    let cfg = config(&format!(
        "sequence_len: 4096\ndatasets:\n  - path: {}\n    type: chat_template\n    chat_template: {}\n",
        data.display(),
        template_path.display()
    ));
    let prepared = prepare(&cfg, &tok).unwrap_or_else(|e| panic!("{name} ({template_key}): {e}"));
    assert_eq!(prepared.train.len(), cases.len());
    for (c, s) in cases.iter().zip(&prepared.train) {
        let case = format!("{name}/{} ({template_key})", c["name"]);
        let ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(s.input_ids, ids, "{case}: ids");
        let Some(mask) = c.get("assistant_mask") else {
            assert_replies_trained(&tok, c, &s.labels, &case);
            continue;
        };
        let want: Vec<i32> = ids
            .iter()
            .zip(mask.as_array().unwrap())
            .map(|(&id, m)| {
                if m.as_u64() == Some(1) {
                    id as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        if s.labels != want {
            let marks = |l: &[i32]| -> String {
                l.iter()
                    .zip(show(&tok, &ids))
                    .map(|(&x, t)| {
                        if x == IGNORE_INDEX {
                            t
                        } else {
                            format!("[{t}]")
                        }
                    })
                    .collect()
            };
            panic!(
                "{case}: mask differs\n want: {}\n  got: {}",
                marks(&want),
                marks(&s.labels)
            );
        }
    }
}

/// Without an expected mask (templates transformers cannot mask): the trained
/// tokens decode to text that holds every non-empty assistant reply (its answer:
/// templates move a `<think>` block about), in order, and no user message.
fn assert_replies_trained(tok: &TokenizerBundle, c: &Value, labels: &[i32], case: &str) {
    let trained: Vec<u32> = labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    let text = tok.tokenizer.decode(&trained, false).unwrap();
    let mut at = 0;
    for m in c["record"]["messages"].as_array().unwrap() {
        let content = m["content"].as_str().unwrap();
        let content = content.rsplit("</think>").next().unwrap().trim();
        if content.is_empty() {
            continue;
        }
        match m["role"].as_str().unwrap() {
            "assistant" => {
                let Some(found) = text[at..].find(content) else {
                    panic!("{case}: reply {content:?} is not trained; trained text: {text:?}")
                };
                at += found + content.len();
            }
            "user" => assert!(
                !text.contains(content),
                "{case}: user message {content:?} is trained; trained text: {text:?}"
            ),
            _ => {}
        }
    }
}

#[test]
fn original_templates_match_transformers() {
    for v in cases()["variants"].as_array().unwrap() {
        check_variant(v, "template");
    }
}

#[test]
fn generation_tagged_templates_match_transformers() {
    for v in cases()["variants"].as_array().unwrap() {
        if v.get("tagged_template").is_some() {
            check_variant(v, "tagged_template");
        }
    }
}

#[test]
fn fixture_set_covers_the_published_templates() {
    let c = cases();
    let names: Vec<&str> = c["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "qwen3",
            "qwen2.5",
            "mixtral",
            "mixtral-legacy",
            "olmoe",
            "glm-4.6",
            "glm-4.7-flash",
            "deepseek-v3.1",
            "gpt-oss",
            "kimi-k2",
            "minimax-m2",
            "granite-3.3",
            "granite-4.0"
        ]
    );
    let total: usize = c["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["cases"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, 98);
}
