//! Config tests. `errors.rs` and `rules.rs` pin every rejection to its
//! exact message (per-key and cross-field respectively); `accepts.rs` covers
//! defaults, warnings and round trips.

use super::*;

mod accepts;
mod errors;
mod rules;

/// The smallest valid config; tests append or replace keys.
const BASE: &str = "\
base_model: synth://qwen3_moe/tiny
datasets:
  - path: data.jsonl
    type: completion
";

fn parse(yaml: &str) -> Result<ConfigOutcome, ConfigError> {
    TrainConfig::from_yaml_str(yaml, "t.yaml")
}

#[track_caller]
fn ok(yaml: &str) -> ConfigOutcome {
    match parse(yaml) {
        Ok(o) => o,
        Err(e) => panic!("expected success, got: {e}"),
    }
}

#[track_caller]
fn err(yaml: &str) -> String {
    match parse(yaml) {
        Ok(o) => panic!("expected an error, got {:?}", o.config),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            assert!(
                msg.starts_with("t.yaml: "),
                "error lacks the source prefix: {msg}"
            );
            msg
        }
    }
}

/// An error for BASE plus `extra` lines.
#[track_caller]
fn err_with(extra: &str) -> String {
    err(&format!("{BASE}{extra}"))
}

#[track_caller]
fn ok_with(extra: &str) -> ConfigOutcome {
    ok(&format!("{BASE}{extra}"))
}
