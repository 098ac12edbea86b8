//! Every config in configs/examples/ trains: on the tiny preset of its architecture (the file
//! name's prefix), two steps, with only base_model, max_steps and output_dir changed — the
//! expert-parallel one through moeq-launch with two CPU ranks.

use std::path::Path;
use std::process::Command;

fn prepared(example: &Path, dir: &Path) -> std::path::PathBuf {
    let name = example.file_stem().unwrap().to_str().unwrap();
    let arch = name.split('-').next().unwrap();
    let text = std::fs::read_to_string(example).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("base_model:") {
                format!("base_model: synth://{arch}/tiny?seed=0")
            } else if l.starts_with("output_dir:") {
                format!("output_dir: {}", dir.join("out").display())
            } else {
                l.to_string()
            }
        })
        .collect();
    lines.push("max_steps: 2".into());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn every_example_trains_on_its_tiny_preset() {
    let mut examples: Vec<_> = std::fs::read_dir("configs/examples")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    for example in &examples {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = prepared(example, tmp.path());
        let parallel = example.to_str().unwrap().contains("expert-parallel");
        let mut cmd = if parallel {
            let mut c = Command::new(env!("CARGO_BIN_EXE_moeq-launch"));
            c.args(["--nproc", "2", "--", env!("CARGO_BIN_EXE_moeq")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_moeq"))
        };
        let out = cmd
            .args(["train", "--config"])
            .arg(&cfg)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}:\n{err}", example.display());
        assert!(
            tmp.path().join("out/adapter_model.safetensors").is_file(),
            "{}: no adapter written",
            example.display()
        );
    }
}
