//! Dataset types, files and directories, the tokenizer bundle, truncation,
//! the validation split and the cache.

mod data_common;

use data_common::{config, synth_bundle, synth_tokenizer_dir, write};
use moeq::data::{prepare, prepare_cached, TokenizerBundle, ALPACA_NO_INPUT, IGNORE_INDEX};
use serde_json::json;

fn trained(labels: &[i32]) -> Vec<bool> {
    labels.iter().map(|&l| l != IGNORE_INDEX).collect()
}

#[test]
fn completion_trains_everything_and_appends_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let p = write(tmp.path(), "c.jsonl", r#"{"body": "the cat sat"}"#);
    let cfg = config(&format!(
        "datasets:\n  - path: {}\n    type: completion\n    field: body\n",
        p.display()
    ));
    let out = prepare(&cfg, &tok).unwrap();
    let s = &out.train[0];
    let mut want = tok.encode_plain("the cat sat").unwrap();
    want.push(tok.eos.id);
    assert_eq!(s.input_ids, want);
    assert_eq!(s.labels, want.iter().map(|&i| i as i32).collect::<Vec<_>>());
    assert_eq!(tok.eos.text, "<|endoftext|>");
}

#[test]
fn alpaca_masks_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"instruction": "Add the numbers.", "input": "", "output": "It is 5."});
    let p = write(tmp.path(), "a.jsonl", &rec.to_string());
    let yaml = format!(
        "sequence_len: 512\ndatasets:\n  - path: {}\n    type: alpaca\n",
        p.display()
    );
    let s = prepare(&config(&yaml), &tok).unwrap().train.remove(0);
    let prompt = ALPACA_NO_INPUT.replace("{instruction}", "Add the numbers.");
    let n_prompt = tok.encode_plain(&prompt).unwrap().len();
    let mut ids = tok.encode_plain(&format!("{prompt}It is 5.")).unwrap();
    assert_eq!(&ids[..n_prompt], &tok.encode_plain(&prompt).unwrap()[..]);
    ids.push(tok.eos.id);
    assert_eq!(s.input_ids, ids);
    let mask = trained(&s.labels);
    assert!(mask[..n_prompt].iter().all(|&t| !t));
    assert!(
        mask[n_prompt..].iter().all(|&t| t),
        "response and EOS are trained"
    );

    let yaml = format!("train_on_inputs: true\n{yaml}");
    let s = prepare(&config(&yaml), &tok).unwrap().train.remove(0);
    assert!(trained(&s.labels).iter().all(|&t| t));
}

#[test]
fn input_output_segments_keep_their_boundaries() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"segments": [
        {"text": "Q: hello", "label": false},
        {"text": " A: hi", "label": true},
        {"text": " (note)", "label": false},
        {"text": "<|endoftext|>", "label": true},
    ]});
    let p = write(tmp.path(), "io.jsonl", &rec.to_string());
    let yaml = format!(
        "datasets:\n  - path: {}\n    type: input_output\n",
        p.display()
    );
    let s = prepare(&config(&yaml), &tok).unwrap().train.remove(0);
    let parts: Vec<Vec<u32>> = ["Q: hello", " A: hi", " (note)", "<|endoftext|>"]
        .iter()
        .map(|t| tok.encode_plain(t).unwrap())
        .collect();
    assert_eq!(s.input_ids, parts.concat());
    let want: Vec<bool> = parts
        .iter()
        .zip([false, true, false, true])
        .flat_map(|(p, l)| std::iter::repeat_n(l, p.len()))
        .collect();
    assert_eq!(trained(&s.labels), want);
    assert_eq!(*s.input_ids.last().unwrap(), tok.eos.id);
}

#[test]
fn chat_with_the_synthetic_chatml_template() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let yaml = format!(
        "datasets:\n  - path: {}\n    type: chat_template\n    field_messages: conversations\n    message_property_mappings:\n      role: from\n      content: value\n",
        p.display()
    );
    let s = prepare(&config(&yaml), &tok).unwrap().train.remove(0);
    let head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let head_ids = tok.encode_plain(head).unwrap();
    let answer = tok.encode_plain("Hello!<|im_end|>").unwrap();
    let tail = tok.encode_plain("\n").unwrap();
    assert_eq!(
        s.input_ids,
        [head_ids.clone(), answer.clone(), tail.clone()].concat()
    );
    let want: Vec<bool> = std::iter::repeat_n(false, head_ids.len())
        .chain(std::iter::repeat_n(true, answer.len()))
        .chain(std::iter::repeat_n(false, tail.len()))
        .collect();
    assert_eq!(
        trained(&s.labels),
        want,
        "<|im_end|> ends the turn and is trained"
    );
}

#[test]
fn several_datasets_mix_in_config_order() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let a = write(
        tmp.path(),
        "a.jsonl",
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n",
    );
    let b = write(tmp.path(), "b.json", "[{\"text\": \"three\"}]");
    let yaml = format!(
        "datasets:\n  - path: {}\n    type: completion\n  - path: {}\n    type: completion\n",
        a.display(),
        b.display()
    );
    let out = prepare(&config(&yaml), &tok).unwrap();
    let firsts: Vec<u32> = out.train.iter().map(|s| s.input_ids[0]).collect();
    let want: Vec<u32> = ["one", "two", "three"]
        .iter()
        .map(|t| tok.encode_plain(t).unwrap()[0])
        .collect();
    assert_eq!(firsts, want);
    let per: Vec<(usize, usize)> = out
        .stats
        .datasets
        .iter()
        .map(|d| (d.records, d.samples))
        .collect();
    assert_eq!(per, vec![(2, 2), (1, 1)]);
}

#[test]
fn directories_pick_the_split() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let dir = tmp.path().join("ds");
    write(&dir, "data/train-00000-of-00002.jsonl", "{\"text\": \"a\"}");
    write(&dir, "data/train-00001-of-00002.jsonl", "{\"text\": \"b\"}");
    write(
        &dir,
        "data/test.jsonl",
        "{\"text\": \"c\"}\n{\"text\": \"d\"}",
    );
    write(&dir, "README.md", "# not data");
    let count = |extra: &str| {
        let yaml = format!(
            "datasets:\n  - path: {}\n    type: completion\n{extra}",
            dir.display()
        );
        prepare(&config(&yaml), &tok).unwrap().train.len()
    };
    assert_eq!(count(""), 2);
    assert_eq!(count("    split: test\n"), 2);
    assert_eq!(
        count("    data_files: [data/test.jsonl, data/train-00000-of-00002.jsonl]\n"),
        3
    );
    let flat = tmp.path().join("flat");
    write(&flat, "part1.jsonl", "{\"text\": \"a\"}");
    write(
        &flat,
        "part2.json",
        "[{\"text\": \"b\"}, {\"text\": \"c\"}]",
    );
    let yaml = format!(
        "datasets:\n  - path: {}\n    type: completion\n",
        flat.display()
    );
    assert_eq!(
        prepare(&config(&yaml), &tok).unwrap().train.len(),
        3,
        "unsplit files are train"
    );
}

#[test]
fn tokenizer_config_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_tokenizer_dir(&tmp.path().join("m"));
    // AddedToken objects, a list of named templates, ids only in config.json
    let tc = json!({
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false},
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0].content }}"}
        ]
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        json!({"bos_token_id": 510, "pad_token_id": [509]}).to_string(),
    )
    .unwrap();
    let tok = TokenizerBundle::load(&dir, None).unwrap();
    assert_eq!((tok.eos.text.as_str(), tok.eos.id), ("<|im_end|>", 511));
    assert_eq!(
        tok.bos.as_ref().map(|b| b.text.as_str()),
        Some("<|im_start|>")
    );
    assert_eq!(tok.pad.id, 509);
    assert_eq!(
        tok.chat_template.as_deref(),
        Some("{{ messages[0].content }}")
    );
    // chat_template.jinja wins, as in transformers
    std::fs::write(dir.join("chat_template.jinja"), "jinja file").unwrap();
    assert_eq!(
        TokenizerBundle::load(&dir, None)
            .unwrap()
            .chat_template
            .as_deref(),
        Some("jinja file")
    );

    // the YAML's tokenizer_config: a directory or a tokenizer.json file
    let other = synth_tokenizer_dir(&tmp.path().join("other"));
    let by_dir = TokenizerBundle::load(&dir, Some(&other)).unwrap();
    assert_eq!(by_dir.eos.text, "<|endoftext|>");
    let by_file = TokenizerBundle::load(&dir, Some(&other.join("tokenizer.json"))).unwrap();
    assert_eq!(by_file.fingerprint, by_dir.fingerprint);

    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<nope>"}).to_string(),
    )
    .unwrap();
    assert_eq!(
        TokenizerBundle::load(&dir, None).unwrap_err().to_string(),
        format!(
            "{}: eos_token '<nope>' is not in the vocabulary of {}; fix eos_token or use the matching tokenizer.json",
            dir.join("tokenizer_config.json").display(),
            dir.join("tokenizer.json").display()
        )
    );
}

#[test]
fn truncation_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let long = "word ".repeat(40);
    let p = write(
        tmp.path(),
        "c.jsonl",
        &format!("{{\"text\": \"{long}\"}}\n{{\"text\": \"short\"}}\n"),
    );
    let yaml = format!(
        "sequence_len: 16\ndatasets:\n  - path: {}\n    type: completion\n",
        p.display()
    );
    let out = prepare(&config(&yaml), &tok).unwrap();
    assert_eq!(out.train[0].len(), 16);
    assert_eq!(out.stats.truncated, 1);
    assert_eq!(
        out.warnings,
        vec![format!(
            "{}: truncated 1 of 2 samples to sequence_len 16",
            p.display()
        )]
    );
    assert!(out.stats.summary().contains("1 truncated to sequence_len"));
}

#[test]
fn validation_split_is_seeded_and_disjoint() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let lines: Vec<String> = (0..40)
        .map(|i| format!("{{\"text\": \"item {i}\"}}"))
        .collect();
    let p = write(tmp.path(), "c.jsonl", &lines.join("\n"));
    let run = |extra: &str| {
        let yaml = format!(
            "{extra}datasets:\n  - path: {}\n    type: completion\n",
            p.display()
        );
        prepare(&config(&yaml), &tok).unwrap()
    };
    let a = run("val_set_size: 0.1\nseed: 3\n");
    assert_eq!((a.train.len(), a.val.len()), (36, 4));
    assert!(a.val.iter().all(|v| !a.train.contains(v)));
    assert_eq!(run("val_set_size: 0.1\nseed: 3\n").val, a.val);
    assert_ne!(run("val_set_size: 0.1\nseed: 4\n").val, a.val);
    assert_eq!(run("val_set_size: 7\n").val.len(), 7);
}

#[test]
fn cache_round_trip_and_invalidation() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cache = tmp.path().join("cache");
    let p = write(
        tmp.path(),
        "c.jsonl",
        "{\"text\": \"a b c\"}\n{\"text\": \"d\"}\n",
    );
    let yaml = format!(
        "val_set_size: 1\ndatasets:\n  - path: {}\n    type: completion\n",
        p.display()
    );
    let cfg = config(&yaml);
    let fresh = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(!fresh.stats.from_cache);
    let again = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(again.stats.from_cache);
    assert_eq!(
        (again.train, again.val),
        (fresh.train.clone(), fresh.val.clone())
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    write(
        tmp.path(),
        "c.jsonl",
        "{\"text\": \"a b c\"}\n{\"text\": \"e\"}\n",
    );
    let changed = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(!changed.stats.from_cache, "new file contents, new key");
    let longer = config(&format!("sequence_len: 128\n{yaml}"));
    assert!(
        !prepare_cached(&longer, &tok, &cache)
            .unwrap()
            .stats
            .from_cache
    );
}

#[test]
fn train_on_eos_and_roles_to_train() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let im_end = tok.tokenizer.token_to_id("<|im_end|>").unwrap();
    // which <|im_end|> (one per turn, in order) and which content tokens are trained
    let run = |extra: &str| {
        let yaml = format!(
            "datasets:\n  - path: {}\n    type: chat_template\n{extra}",
            p.display()
        );
        let s = prepare(&config(&yaml), &tok).unwrap().train.remove(0);
        let ends: Vec<bool> = s
            .input_ids
            .iter()
            .zip(&s.labels)
            .filter(|(&i, _)| i == im_end)
            .map(|(_, &l)| l != IGNORE_INDEX)
            .collect();
        let content: Vec<bool> = ["a", "b", "c", "d"]
            .iter()
            .map(|c| {
                let id = tok.encode_plain(c).unwrap()[0];
                let at = s.input_ids.iter().position(|&i| i == id).unwrap();
                s.labels[at] != IGNORE_INDEX
            })
            .collect();
        (ends, content)
    };
    let tf = |v: &[u8]| v.iter().map(|&x| x == 1).collect::<Vec<bool>>();
    assert_eq!(run(""), (tf(&[0, 1, 0, 1]), tf(&[0, 1, 0, 1])));
    assert_eq!(
        run("    train_on_eos: last\n"),
        (tf(&[0, 0, 0, 1]), tf(&[0, 1, 0, 1]))
    );
    assert_eq!(
        run("    train_on_eos: none\n"),
        (tf(&[0, 0, 0, 0]), tf(&[0, 1, 0, 1]))
    );
    assert_eq!(
        run("    train_on_eos: all\n"),
        (tf(&[1, 1, 1, 1]), tf(&[0, 1, 0, 1]))
    );
    assert_eq!(
        run("    roles_to_train: [user]\n"),
        (tf(&[1, 0, 1, 0]), tf(&[1, 0, 1, 0]))
    );
}

#[test]
fn cache_keys_on_the_template_file_text() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cache = tmp.path().join("cache");
    let rec = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let t = write(tmp.path(), "t.jinja", moeq::data::CHATML);
    let cfg = config(&format!(
        "val_set_size: 0\nchat_template: {}\ndatasets:\n  - path: {}\n    type: chat_template\n",
        t.display(),
        p.display()
    ));
    let first = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(!first.stats.from_cache);
    assert!(prepare_cached(&cfg, &tok, &cache).unwrap().stats.from_cache);
    // same path, new text: the samples must be rebuilt
    write(
        tmp.path(),
        "t.jinja",
        &format!("{{{{ 'x y ' }}}}{}", moeq::data::CHATML),
    );
    let changed = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(!changed.stats.from_cache, "new template text, new key");
    assert_eq!(
        changed.train[0].len(),
        first.train[0].len() + tok.encode_plain("x y ").unwrap().len()
    );
}

#[test]
fn generation_templates_warn_about_ignored_mask_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let t = write(
        tmp.path(),
        "gen.jinja",
        "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
    );
    let run = |extra: &str| {
        let yaml = format!(
            "chat_template: {}\ndatasets:\n  - path: {}\n    type: chat_template\n{extra}",
            t.display(),
            p.display()
        );
        prepare(&config(&yaml), &tok).unwrap().warnings
    };
    assert_eq!(run(""), Vec::<String>::new());
    assert_eq!(
        run("    roles_to_train: [assistant, user]\n    train_on_eos: all\n"),
        vec![format!("{}: roles_to_train: [assistant, user] and train_on_eos: all ignored: the chat template marks what is trained with {{% generation %}} blocks (remove the setting, or use a template without generation blocks)", p.display())]
    );
    assert_eq!(
        run("    train_on_eos: none\n"),
        vec![format!("{}: train_on_eos: none ignored: the chat template marks what is trained with {{% generation %}} blocks (remove the setting, or use a template without generation blocks)", p.display())]
    );
}

#[test]
fn zero_width_tokens_are_labelled_like_char_to_token() {
    use moeq::data::spans_to_labels;
    // " ab": a whitespace token trimmed to (1,1), then "ab" at [1,3); span [1,3)
    let ids = [5, 6];
    assert_eq!(
        spans_to_labels(&ids, &[(1, 1), (1, 3)], &[(1, 3)]),
        vec![IGNORE_INDEX, 6]
    );
    // zero-width right after the span, and at the very start of the text
    assert_eq!(
        spans_to_labels(&[5, 6, 7], &[(0, 0), (0, 2), (2, 2)], &[(0, 2)]),
        vec![IGNORE_INDEX, 6, IGNORE_INDEX]
    );
    // strictly inside a span it sits between marked tokens, as transformers marks it
    assert_eq!(
        spans_to_labels(&[5, 6, 7], &[(0, 2), (2, 2), (2, 4)], &[(0, 4)]),
        vec![5, 6, 7]
    );
}

#[test]
fn a_corrupt_cache_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cache = tmp.path().join("cache");
    let p = write(
        tmp.path(),
        "c.jsonl",
        "{\"text\": \"a b c\"}\n{\"text\": \"d\"}\n",
    );
    let cfg = config(&format!(
        "val_set_size: 0\ndatasets:\n  - path: {}\n    type: completion\n",
        p.display()
    ));
    let fresh = prepare_cached(&cfg, &tok, &cache).unwrap();
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&file).unwrap();
    // layout: MOEQDATA, u32 version, u64 header length, header JSON, samples
    let header_len = u64::from_le_bytes(good[12..20].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&good[20..20 + header_len]).unwrap();
    let samples = good[20 + header_len..].to_vec();
    let with_header = |header: &serde_json::Value, samples: &[u8]| {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = good[..12].to_vec();
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(samples);
        out
    };
    let mut first_len_huge = samples.clone();
    first_len_huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    header["count"] = json!(1u64 << 60);
    let corrupt = [
        with_header(&header, &samples),
        with_header(
            &json!({"datasets": [], "warnings": [], "count": 2}),
            &first_len_huge,
        ),
        good[..good.len() - 3].to_vec(),
        b"MOEQDATA".to_vec(),
    ];
    for (k, bytes) in corrupt.iter().enumerate() {
        std::fs::write(&file, bytes).unwrap();
        let again = prepare_cached(&cfg, &tok, &cache).unwrap();
        assert!(!again.stats.from_cache, "corrupt file {k} is ignored");
        assert_eq!(again.train, fresh.train);
        assert!(
            prepare_cached(&cfg, &tok, &cache).unwrap().stats.from_cache,
            "and rewritten"
        );
    }
}

/// Pre-tokenized records (a dataset without `type:`, as axolotl reads it): ids taken as they
/// are, labels as given (default: every token), positions masked out by `attention_mask`
/// dropped; no special tokens added.
#[test]
fn pretokenized_records_are_taken_as_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let p = write(
        tmp.path(),
        "t.jsonl",
        concat!(
            r#"{"input_ids": [5, 6, 7, 8]}"#,
            "\n",
            r#"{"input_ids": [9, 10, 11, 12], "labels": [-100, -100, 11, 12]}"#,
            "\n",
            r#"{"input_ids": [13, 14, 0, 0], "labels": [13, 14, -100, -100], "attention_mask": [1, 1, 0, 0]}"#,
            "\n"
        ),
    );
    let cfg = config(&format!("datasets:\n  - path: {}\n", p.display()));
    let out = prepare(&cfg, &tok).unwrap();
    let got: Vec<(Vec<u32>, Vec<i32>)> = out
        .train
        .iter()
        .map(|s| (s.input_ids.clone(), s.labels.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (vec![5, 6, 7, 8], vec![5, 6, 7, 8]),
            (vec![9, 10, 11, 12], vec![-100, -100, 11, 12]),
            (vec![13, 14], vec![13, 14]),
        ]
    );
    let bad = |line: &str| {
        let p = write(tmp.path(), "bad.jsonl", line);
        let cfg = config(&format!("datasets:\n  - path: {}\n", p.display()));
        let e = prepare(&cfg, &tok).err().unwrap().to_string();
        e.strip_prefix(&format!("{}:1: ", p.display()))
            .unwrap_or(&e)
            .to_string()
    };
    assert_eq!(
        bad(r#"{"text": "words"}"#),
        "missing field 'input_ids' (datasets[0] has no type:, so its records must be pre-tokenized; for text set datasets[0].type to completion, alpaca, chat_template or input_output)"
    );
    assert_eq!(
        bad(r#"{"input_ids": [1, 2], "labels": [1]}"#),
        "labels has 1 entries for 2 input_ids: they must align one to one"
    );
    let vocab = tok.tokenizer.get_vocab_size(true);
    assert_eq!(
        bad(&format!(r#"{{"input_ids": [1, {vocab}]}}"#)),
        format!("input_ids[1] = {vocab} is not a token id of this tokenizer (0..{vocab})")
    );
    assert_eq!(
        bad(r#"{"input_ids": [1, "a"]}"#),
        "field 'input_ids' must be an array of integers, found a string"
    );
}

#[test]
fn eot_tokens_name_the_end_of_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let im_end = tok.tokenizer.token_to_id("<|im_end|>").unwrap();
    let yaml = |top: &str| {
        format!(
            "val_set_size: 0\n{top}datasets:\n  - path: {}\n    type: chat_template\n",
            p.display()
        )
    };
    // Which <|im_end|> (one per turn) are trained.
    let ends = |top: &str| -> Vec<bool> {
        let s = prepare(&config(&yaml(top)), &tok).unwrap().train.remove(0);
        s.input_ids
            .iter()
            .zip(&s.labels)
            .filter(|(&i, _)| i == im_end)
            .map(|(_, &l)| l != IGNORE_INDEX)
            .collect()
    };
    // Naming the template's end of turn changes nothing; naming another token (here the
    // tokenizer's <|endoftext|>, which follows no turn) leaves every turn without a trained end.
    assert_eq!(ends(""), [false, true, false, true]);
    assert_eq!(
        ends("eot_tokens: ['<|im_end|>']\n"),
        [false, true, false, true]
    );
    assert_eq!(ends("eot_tokens: ['<|endoftext|>']\n"), [false; 4]);
    // A text the tokenizer splits is refused, naming it.
    let err = prepare(
        &config(&yaml("eot_tokens: ['<|im_end|> and more']\n")),
        &tok,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("eot_tokens: '<|im_end|> and more' is") && err.contains("not one"),
        "{err}"
    );
    // The cache keys on it.
    let cache = tmp.path().join("cache");
    let plain = config(&yaml(""));
    prepare_cached(&plain, &tok, &cache).unwrap();
    assert!(
        prepare_cached(&plain, &tok, &cache)
            .unwrap()
            .stats
            .from_cache
    );
    let named = config(&yaml("eot_tokens: ['<|endoftext|>']\n"));
    assert!(
        !prepare_cached(&named, &tok, &cache)
            .unwrap()
            .stats
            .from_cache
    );
}

/// axolotl's reasoning fields: the trace under `field_thinking` reaches the template as
/// `template_thinking_key` (both `reasoning_content` by default), the field's own name does not.
#[test]
fn thinking_fields_hand_the_trace_to_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let rec = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "thinking": "why"},
    ]});
    let p = write(tmp.path(), "chat.jsonl", &rec.to_string());
    let t = write(
        tmp.path(),
        "think.jinja",
        "{% for m in messages %}{{ m.role }}:{% if m.reasoning_content %} <{{ m.reasoning_content }}>{% endif %}{% if m.thinking %} ({{ m.thinking }}){% endif %} {{ m.content }}\n{% endfor %}",
    );
    let text = |extra: &str| {
        let yaml = format!(
            "val_set_size: 0\nchat_template: {}\ndatasets:\n  - path: {}\n    type: chat_template\n{extra}",
            t.display(),
            p.display()
        );
        prepare(&config(&yaml), &tok)
            .unwrap()
            .train
            .remove(0)
            .input_ids
    };
    let ids = |s: &str| tok.encode_plain(s).unwrap();
    // Defaults: the record's `thinking` is not the trace's field; it passes as itself.
    assert_eq!(text(""), ids("user: a\nassistant: (why) b\n"));
    // Renamed to the template's `reasoning_content`, and no longer under its own name.
    assert_eq!(
        text("    field_thinking: thinking\n"),
        ids("user: a\nassistant: <why> b\n")
    );
    // gpt-oss's example: the template reads `thinking` itself.
    assert_eq!(
        text("    field_thinking: thinking\n    template_thinking_key: thinking\n"),
        ids("user: a\nassistant: (why) b\n")
    );
}
