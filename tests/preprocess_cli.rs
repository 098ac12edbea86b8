//! `moeq preprocess`: the data pipeline of the embedded default config without weights — the
//! statistics train logs, every sample as a JSON line, trained tokens marked — and bad input
//! as one line + exit 2.

mod common;
use common::moeq;

#[test]
fn writes_every_sample_and_marks_trained_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples.jsonl");
    let (code, stdout, stderr) =
        moeq(&["preprocess", "--show", "2", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("data: 3800 train samples"),
        "the statistics line train logs: {stdout}"
    );
    // synth://reverse: " a b c:" untrained, then the reversed answer and EOS trained.
    let shown: Vec<&str> = stdout.lines().filter(|l| l.contains(":⟦")).collect();
    assert_eq!(shown.len(), 2, "{stdout}");
    for line in shown {
        let (prompt, answer) = line.split_once(":⟦").unwrap();
        let answer = answer
            .strip_suffix("<|endoftext|>⟧")
            .expect("EOS trained, last");
        let fwd: Vec<&str> = prompt.split_whitespace().collect();
        let rev: Vec<&str> = answer.split_whitespace().rev().collect();
        assert_eq!(fwd, rev, "the trained part is the prompt reversed: {line}");
    }
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4000);
    let count = |split: &str| lines.iter().filter(|l| l["split"] == split).count();
    assert_eq!((count("train"), count("validation")), (3800, 200));
    for l in &lines {
        let ids = l["input_ids"].as_array().unwrap();
        let labels = l["labels"].as_array().unwrap();
        assert_eq!(ids.len(), labels.len());
        for (id, label) in ids.iter().zip(labels) {
            assert!(
                label == id || label == -100,
                "label is the token or -100: {l}"
            );
        }
        assert!(
            labels.iter().any(|x| x != -100),
            "every sample trains something"
        );
    }
    assert!(
        !tmp.path().join(".samples.jsonl.partial").exists(),
        "no partial file left"
    );
}

#[test]
fn bad_out_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no/such/dir/x.jsonl");
    let (code, _, stderr) = moeq(&["preprocess", "--out", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("does not exist"), "{stderr}");
    let (code, _, stderr) = moeq(&["preprocess", "--out", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a folder"), "{stderr}");
}

/// `dataset_prepared_path`: preprocess tokenizes and keeps the samples there; train reuses
/// them ("from cache" in its data line) and trains as it would have.
#[test]
fn prepared_samples_are_reused_by_train() {
    let tmp = tempfile::tempdir().unwrap();
    let prepared = tmp.path().join("prepared");
    let yaml = moeq::config::TINY_CPU_YAML
        .replace(
            "output_dir: outputs/tiny-cpu",
            &format!("output_dir: {}", tmp.path().join("out").display()),
        )
        .replace("max_steps:", "max_steps: 30\n#")
        + &format!("dataset_prepared_path: {}\n", prepared.display());
    let config = tmp.path().join("c.yaml");
    std::fs::write(&config, yaml).unwrap();
    let cfg = config.to_str().unwrap();
    let (code, stdout, stderr) = moeq(&["preprocess", "--config", cfg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("(from cache)"), "{stdout}");
    let files: Vec<_> = std::fs::read_dir(&prepared).unwrap().collect();
    assert_eq!(files.len(), 1, "one cache file");
    let (code, stdout, stderr) = moeq(&["preprocess", "--config", cfg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(from cache)"), "{stdout}");
    let (code, _, stderr) = moeq(&["train", "--config", cfg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("data: 3800 train samples") && stderr.contains("(from cache)"),
        "{stderr}"
    );
}
