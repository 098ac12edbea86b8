//! The key set of one mapping: unknown and refused keys recorded as errors (with a suggestion
//! for a misspelling), ignored axolotl keys as warnings.

use super::fields::{describe, invalid, quote_word, Fields};
use super::keys::{lookup, suggest_key};
use serde_yaml::{Mapping, Value};

pub(super) struct KeySet {
    pub supported: &'static [(&'static str, &'static str)],
    pub ignored: &'static [(&'static str, &'static str)],
    /// Families of ignored keys, by prefix.
    pub ignored_prefixes: &'static [(&'static str, &'static str)],
    pub unsupported: &'static [(&'static str, &'static str)],
    /// Completes "see README.md for the supported ...".
    pub readme_what: &'static str,
}

/// Whether an unsupported key asks for something. Blank, false and empty
/// values are how axolotl templates leave a feature off.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.trim().is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        _ => true,
    }
}

/// Records unknown and unsupported keys and warns about ignored ones, in
/// file order so the first complaint is the first one in the file.
/// Returns the keys suggested for misspelt ones: a "missing" complaint about one of them
/// would repeat the misspelling's.
pub(super) fn check_keys(
    f: &Fields,
    prefix: &str,
    map: &Mapping,
    set: &KeySet,
    warnings: &mut Vec<String>,
) -> Vec<String> {
    let origin = f.origin();
    let mut suggested = Vec::new();
    for (k, v) in map {
        let Value::String(key) = k else {
            let place = match prefix.trim_end_matches('.') {
                "" => String::new(),
                p => format!(" in '{p}'"),
            };
            f.record(invalid(
                origin,
                format!("every key{place} must be a string, got {}", describe(k)),
            ));
            continue;
        };
        if lookup(set.supported, key).is_some() {
            continue;
        }
        let by_prefix = set
            .ignored_prefixes
            .iter()
            .find(|(p, _)| key.starts_with(p))
            .map(|(_, why)| *why);
        if let Some(reason) = lookup(set.ignored, key).or(by_prefix) {
            if !v.is_null() {
                warnings.push(format!(
                    "{origin}: key '{prefix}{key}' is accepted for axolotl compatibility but ignored by moeq ({reason})"
                ));
            }
            continue;
        }
        if let Some(why) = lookup(set.unsupported, key) {
            if is_set(v) {
                f.record(invalid(
                    origin,
                    format!("key '{prefix}{key}' is not supported: {why}"),
                ));
            }
            continue;
        }
        let near = suggest_key(key, set.supported, &[set.ignored, set.unsupported]);
        let shown = quote_word(&format!("{prefix}{key}"));
        suggested.extend(near.map(str::to_string));
        let msg = match near {
            Some(n) => format!("unknown key {shown} (did you mean '{n}'?)"),
            None => format!(
                "unknown key {shown} (see README.md for the supported {})",
                set.readme_what
            ),
        };
        f.record(invalid(origin, msg));
    }
    suggested
}
