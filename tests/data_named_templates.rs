//! The named chat templates (`chat_template: llama4`, ...) render as transformers renders them:
//! each embedded template and conversation against transformers' `render_jinja_template`
//! (tests/fixtures/data/named_templates.json, from gen_named_templates.py), byte for byte, and a
//! conversation a template refuses (gemma: a system turn) is refused here too.

mod data_common;

use moeq::data::{ChatTemplate, TokenizerBundle, NAMED_TEMPLATES};
use serde_json::Value;

#[test]
fn named_templates_render_as_transformers_does() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/named_templates.json"
    );
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_common::synth_tokenizer_dir(tmp.path());
    let tok = TokenizerBundle::load(&dir, None).unwrap();
    assert!(
        tok.bos.is_none(),
        "the synthetic tokenizer has no bos token"
    );
    let mut extra = serde_json::Map::new();
    extra.insert("bos_token".into(), "<|endoftext|>".into());
    // Templates that print today's date: the fixture was made on a fixed day.
    let today = |fmt: &str| chrono::Local::now().format(fmt).to_string();
    let dates = [
        (today("%d %b %Y"), "02 Dec 2026"),
        (today("%Y-%m-%d"), "2026-12-02"),
    ];
    let names: Vec<&str> = NAMED_TEMPLATES.iter().map(|(n, _)| *n).collect();
    let fixture_names: Vec<&str> = expected
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .filter(|k| *k != "transformers")
        .collect();
    assert_eq!(names, fixture_names, "rerun gen_named_templates.py");
    for (name, source) in NAMED_TEMPLATES {
        let template = ChatTemplate::compile(source, name).unwrap();
        for case in expected[name]["cases"].as_array().unwrap() {
            let messages = case["messages"].as_array().unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render(messages, gen, &tok, &extra);
            match (got, case.get("text")) {
                (Ok(r), Some(want)) => {
                    let mut text = r.text;
                    for (now, fixed) in &dates {
                        text = text.replace(now.as_str(), fixed);
                    }
                    assert_eq!(
                        text,
                        want.as_str().unwrap(),
                        "{name}, generation prompt {gen}"
                    );
                }
                (Err(e), None) => {
                    let want = case["error"].as_str().unwrap();
                    assert!(
                        e.contains(want),
                        "{name}: error '{e}', transformers: '{want}'"
                    );
                }
                (got, want) => {
                    panic!("{name}, generation prompt {gen}: moeq {got:?}, transformers {want:?}")
                }
            }
        }
    }
}
