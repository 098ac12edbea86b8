//! The repository's structure stays as docs/ARCHITECTURE.md describes it: no source file past
//! 600 lines, and dependencies between the folders of src/ point one way.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn files_of(folder: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(folder);
    let mut paths = Vec::new();
    sources(&root, &mut paths);
    assert!(!paths.is_empty(), "no sources under {}", root.display());
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

#[test]
fn no_source_file_is_longer_than_600_lines() {
    let long: Vec<String> = files_of("")
        .iter()
        .filter(|(_, text)| text.lines().count() > 600)
        .map(|(p, text)| format!("{} ({} lines)", p.display(), text.lines().count()))
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

/// (folder, modules it must not import): the model knows no ranks and no training, the
/// distributed layer nothing above it, ops no model and no training, data no model.
#[test]
fn dependencies_point_one_way() {
    let rules: &[(&str, &[&str])] = &[
        ("arch", &["distributed", "train", "gpu_check", "cli"]),
        ("lora", &["distributed", "train", "gpu_check", "cli"]),
        ("distributed", &["train", "gpu_check", "cli"]),
        (
            "ops",
            &["arch", "lora", "train", "distributed", "model_files"],
        ),
        (
            "quant",
            &["arch", "lora", "train", "distributed", "model_files"],
        ),
        ("data", &["arch", "lora", "train", "distributed"]),
        (
            "config",
            &["arch", "train", "distributed", "data", "model_files"],
        ),
    ];
    let mut wrong = Vec::new();
    for (folder, banned) in rules {
        for (path, text) in files_of(folder) {
            for b in *banned {
                if text.contains(&format!("crate::{b}::")) || text.contains(&format!("crate::{b};"))
                {
                    wrong.push(format!("{} imports {b}", path.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}
