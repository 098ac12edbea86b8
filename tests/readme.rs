//! README.md stays true: every config key moeq knows is documented, and the two newcomer
//! commands are there.

use moeq::config::{
    IGNORED_AXOLOTL_KEYS, IGNORED_AXOLOTL_PREFIXES, SUPPORTED_KEYS, UNSUPPORTED_AXOLOTL_KEYS,
};

#[test]
fn readme_documents_every_config_key() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let tables = [
        SUPPORTED_KEYS,
        IGNORED_AXOLOTL_KEYS,
        UNSUPPORTED_AXOLOTL_KEYS,
    ];
    let missing: Vec<&str> = tables
        .iter()
        .flat_map(|t| t.iter().map(|(k, _)| *k))
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    assert!(missing.is_empty(), "README.md lacks rows for: {missing:?}");
    let prefixes: Vec<&str> = IGNORED_AXOLOTL_PREFIXES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !readme.contains(&format!("| `{p}*` |")))
        .collect();
    assert!(
        prefixes.is_empty(),
        "README.md lacks rows for: {prefixes:?}"
    );
}

#[test]
fn readme_gives_the_two_commands() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- train --config configs/tiny-cpu.yaml"));
    assert!(readme.contains("\ncargo test "));
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.contains("\ncargo test\n") || ci.contains(" cargo test\n"),
        ".ci/run must run the README's test command"
    );
}
