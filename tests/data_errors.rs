//! Bad data: every case stops with one line naming file:line, the problem
//! and the fix, or, with skip_bad_samples: true, is skipped and counted in a
//! warning. Messages are asserted verbatim.

mod data_common;

use data_common::{config, synth_bundle, write};
use moeq::data::{prepare, DataError, PreparedData, TokenizerBundle};
use std::path::Path;

fn run(
    dir: &Path,
    tok: &TokenizerBundle,
    file: &str,
    text: &str,
    ty: &str,
    extra: &str,
) -> Result<PreparedData, DataError> {
    let p = write(dir, file, text);
    let len = if extra.contains("sequence_len") {
        ""
    } else {
        "sequence_len: 256\n"
    };
    let cfg = config(&format!(
        "{len}{extra}datasets:\n  - path: {}\n    type: {ty}\n",
        p.display()
    ));
    prepare(&cfg, tok)
}

fn err(dir: &Path, tok: &TokenizerBundle, file: &str, text: &str, ty: &str) -> (String, String) {
    let path = dir.join(file).display().to_string();
    match run(dir, tok, file, text, ty, "") {
        Ok(_) => panic!("{file} prepared"),
        Err(e) => (e.to_string(), path),
    }
}

#[test]
fn malformed_json_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(
        tmp.path(),
        &tok,
        "a.jsonl",
        "{\"text\": \"ok\"}\n\n{\"text\": \"cut\n",
        "completion",
    );
    assert_eq!(
        e,
        format!("{p}:3: malformed JSON at column 13: EOF while parsing a string (each line must be one complete JSON object)")
    );
}

#[test]
fn malformed_json_array_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(
        tmp.path(),
        &tok,
        "a.json",
        "[\n {\"text\": \"a\"},\n {\"text\": \"b\" \"c\"}\n]",
        "completion",
    );
    assert_eq!(
        e,
        format!("{p}:3: malformed JSON at column 15: expected `,` or `}}` (the file cannot be read past this point; fix it, or write one record per line as .jsonl)")
    );
}

#[test]
fn missing_field() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(
        tmp.path(),
        &tok,
        "a.jsonl",
        "{\"text\": \"a\"}\n{\"body\": \"b\"}\n",
        "completion",
    );
    assert_eq!(
        e,
        format!("{p}:2: missing field 'text' (set datasets[].field to the record's text field)")
    );
    // in a JSON array the line is where the element starts
    let (e, p) = err(
        tmp.path(),
        &tok,
        "b.json",
        "[\n  {\"instruction\": \"i\", \"output\": \"o\"},\n  {\"instruction\": \"j\"}\n]",
        "alpaca",
    );
    assert_eq!(
        e,
        format!("{p}:3: missing field 'output' (alpaca records have instruction, output and an optional input)")
    );
    let (e, p) = err(
        tmp.path(),
        &tok,
        "c.jsonl",
        "{\"segments\": [{\"text\": \"x\"}]}",
        "input_output",
    );
    assert_eq!(
        e,
        format!("{p}:1: missing field 'segments[0].label' (each segment needs text and label)")
    );
}

#[test]
fn wrong_types() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(tmp.path(), &tok, "a.jsonl", "[1, 2]", "completion");
    assert_eq!(
        e,
        format!("{p}:1: expected a JSON object with the record's fields, found a list")
    );
    let (e, p) = err(
        tmp.path(),
        &tok,
        "b.jsonl",
        "{\"messages\": \"hi\"}",
        "chat_template",
    );
    assert_eq!(
        e,
        format!("{p}:1: field 'messages' must be a list of messages, found a string")
    );
}

#[test]
fn unknown_role() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let chat =
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}"#;
    let (e, p) = err(tmp.path(), &tok, "a.jsonl", chat, "chat_template");
    assert_eq!(
        e,
        format!("{p}:1: unknown role 'bot' in messages[1] (known roles: system, user, assistant, tool; rename it in the data or add it to roles_to_train)")
    );
}

#[test]
fn template_raises() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}{{ m.content }}{% endfor %}";
    let p = write(tmp.path(), "t.jinja", template);
    let chat = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}"#;
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        chat,
        "chat_template",
        &format!("chat_template: {}\n", p.display()),
    );
    let data = tmp.path().join("a.jsonl").display().to_string();
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("{data}:1: chat template failed: the template raised 'no system messages'")
    );
}

#[test]
fn empty_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(tmp.path(), &tok, "a.jsonl", "\n\n", "completion");
    assert_eq!(
        e,
        format!("{p}: empty dataset: no records (add records, or remove the entry from datasets)")
    );
}

#[test]
fn empty_after_masking() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let chat = r#"{"messages": [{"role": "user", "content": "only a question"}]}"#;
    let (e, p) = err(tmp.path(), &tok, "a.jsonl", chat, "chat_template");
    assert_eq!(
        e,
        format!("{p}:1: no token counts towards the loss after masking (the record has no trained turn; check roles_to_train or set train_on_inputs: true)")
    );
    let io = r#"{"segments": [{"text": "all prompt", "label": false}]}"#;
    let (e, p) = err(tmp.path(), &tok, "b.jsonl", io, "input_output");
    assert_eq!(
        e,
        format!("{p}:1: no token counts towards the loss after masking (the record has no trained turn; check roles_to_train or set train_on_inputs: true)")
    );
}

#[test]
fn nothing_trained_after_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let long = "word ".repeat(100);
    let io = format!(
        r#"{{"segments": [{{"text": "{long}", "label": false}}, {{"text": " answer", "label": true}}]}}"#
    );
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        &io,
        "input_output",
        "sequence_len: 64\n",
    );
    let (e, p) = (
        r.err().unwrap().to_string(),
        tmp.path().join("a.jsonl").display().to_string(),
    );
    assert_eq!(
        e,
        format!("{p}:1: no trained token is left after truncation to sequence_len 64 (the prompt fills the sequence; raise sequence_len or shorten the record)")
    );
}

#[test]
fn empty_text() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let (e, p) = err(tmp.path(), &tok, "a.jsonl", r#"{"text": ""}"#, "completion");
    assert_eq!(
        e,
        format!("{p}:1: field 'text' is empty (remove the record or give it text)")
    );
}

#[test]
fn paths_that_are_not_data() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let missing = tmp.path().join("nope.jsonl");
    let cfg = config(&format!(
        "datasets:\n  - path: {}\n    type: completion\n",
        missing.display()
    ));
    assert_eq!(
        prepare(&cfg, &tok).err().unwrap().to_string(),
        format!("{}: no such file or directory (datasets[0].path must be a .jsonl or .json file, a directory of them, or synth://<task>)", missing.display())
    );
    let (e, p) = err(tmp.path(), &tok, "a.parquet", "PAR1", "completion");
    assert_eq!(
        e,
        format!("{p}: unsupported data file type (moeq reads .jsonl and .json; convert the file to JSON Lines)")
    );
    let dir = tmp.path().join("ds");
    write(&dir, "test.jsonl", "{\"text\": \"a\"}");
    let cfg = config(&format!(
        "datasets:\n  - path: {}\n    type: completion\n",
        dir.display()
    ));
    assert_eq!(
        prepare(&cfg, &tok).err().unwrap().to_string(),
        format!("{}: no .jsonl or .json file for split 'train' (name files like train.jsonl, or list them in datasets[0].data_files)", dir.display())
    );
}

#[test]
fn skip_bad_samples_warns_with_the_count() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let text =
        "{\"text\": \"one\"}\n{\"body\": 1}\nnot json\n{\"text\": \"two\"}\n{\"text\": \"\"}\n";
    let out = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        text,
        "completion",
        "skip_bad_samples: true\n",
    )
    .unwrap();
    let p = tmp.path().join("a.jsonl").display().to_string();
    assert_eq!(out.train.len(), 2);
    assert_eq!(out.stats.skipped_bad, 3);
    assert_eq!(out.stats.datasets[0].records, 5);
    assert_eq!(
        out.warnings,
        vec![format!("{p}: skipped 3 of 5 records as bad (skip_bad_samples: true); first: {p}:2: missing field 'text' (set datasets[].field to the record's text field)")]
    );
    // all of them bad is still an error
    let r = run(
        tmp.path(),
        &tok,
        "b.jsonl",
        "x\ny\n",
        "completion",
        "skip_bad_samples: true\n",
    );
    let p = tmp.path().join("b.jsonl").display().to_string();
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("{p}: no usable records: all 2 were skipped as bad (first: {p}:1: malformed JSON at column 1: expected value (each line must be one complete JSON object))")
    );
}

#[test]
fn validation_split_too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}",
        "completion",
        "val_set_size: 2\n",
    );
    assert_eq!(
        r.err().unwrap().to_string(),
        "val_set_size: holding out 2 of 2 samples leaves none to train on; lower val_set_size"
    );
}

#[test]
fn chat_template_missing_or_unknown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_common::synth_tokenizer_dir(&tmp.path().join("m"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = TokenizerBundle::load(&dir, None).unwrap();
    let chat = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let r = run(tmp.path(), &tok, "a.jsonl", chat, "chat_template", "");
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("datasets[0]: type chat_template needs a chat template and the tokenizer ({}) has none; set chat_template to chatml, Jinja source or a .jinja file", dir.join("tokenizer.json").display())
    );
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        chat,
        "chat_template",
        "chat_template: llama9\n",
    );
    assert_eq!(
        r.err().unwrap().to_string(),
        "chat_template: unknown chat template 'llama9' (use tokenizer_default, chatml, deepseek_v2, deepseek_v3, gemma, gemma3, gemma4, llama3, llama4, mistral_v1, mistral_v2v3, mistral_v7_tekken, phi_3, phi_4, qwen3, qwen3_5, qwen_25, Jinja source, or the path of a .jinja file)"
    );
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        chat,
        "chat_template",
        "chat_template: chatml\n",
    )
    .unwrap();
    assert_eq!(r.train.len(), 1);
}

/// `file` with raw bytes (not necessarily UTF-8) as one completion dataset.
fn run_bytes(
    dir: &Path,
    tok: &TokenizerBundle,
    file: &str,
    bytes: &[u8],
    extra: &str,
) -> (Result<PreparedData, DataError>, String) {
    let p = dir.join(file);
    std::fs::write(&p, bytes).unwrap();
    let cfg = config(&format!(
        "sequence_len: 256\n{extra}datasets:\n  - path: {}\n    type: completion\n",
        p.display()
    ));
    (prepare(&cfg, tok), p.display().to_string())
}

#[test]
fn invalid_utf8_is_a_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let text = b"{\"text\": \"one\"}\n{\"text\": \"t\xe9\xff\"}\r\n{\"text\": \"two\"}\n";
    let (r, p) = run_bytes(tmp.path(), &tok, "a.jsonl", text, "");
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("{p}:2: not valid UTF-8 (bad byte at column 12; re-encode the file as UTF-8)")
    );
    let (r, p) = run_bytes(
        tmp.path(),
        &tok,
        "a.jsonl",
        text,
        "skip_bad_samples: true\n",
    );
    let out = r.unwrap();
    assert_eq!((out.train.len(), out.stats.skipped_bad), (2, 1));
    assert_eq!(
        out.warnings,
        vec![format!("{p}: skipped 1 of 3 records as bad (skip_bad_samples: true); first: {p}:2: not valid UTF-8 (bad byte at column 12; re-encode the file as UTF-8)")]
    );
    // a .json array is one document: the file fails, at the bad byte
    let array = b"[{\"text\": \"one\"},\n {\"text\": \"\xff\"}]";
    let (r, p) = run_bytes(
        tmp.path(),
        &tok,
        "b.json",
        array,
        "skip_bad_samples: true\n",
    );
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("{p}: not valid UTF-8 at byte 29 (the file cannot be read; re-encode it as UTF-8)")
    );
}

#[test]
fn invalid_strftime_format_is_a_template_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let p = write(
        tmp.path(),
        "t.jinja",
        "{{ strftime_now('%Q') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    );
    let chat = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let r = run(
        tmp.path(),
        &tok,
        "a.jsonl",
        chat,
        "chat_template",
        &format!("chat_template: {}\n", p.display()),
    );
    let data = tmp.path().join("a.jsonl").display().to_string();
    assert_eq!(
        r.err().unwrap().to_string(),
        format!("{data}:1: chat template failed: strftime_now('%Q'): not a valid strftime format (use chrono's specifiers, e.g. '%d %b %Y') at template line 1")
    );
}
