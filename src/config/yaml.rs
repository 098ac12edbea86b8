//! serde_yaml errors rewritten into moeq's one-line form.

use super::fields::invalid;
use super::ConfigError;

/// Turns serde_yaml's message into one line with the location up front,
/// and names duplicate keys the way the rest of our messages do.
pub(crate) fn error(origin: &str, text: &str, e: &serde_yaml::Error) -> ConfigError {
    let loc = e.location().map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some((line, column)) = loc {
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(err) = duplicate_key(origin, text, &message, loc) {
        return err;
    }
    ConfigError::Syntax {
        origin: origin.to_string(),
        line: loc.map(|(l, _)| l),
        column: loc.map(|(_, c)| c),
        message,
    }
}

/// serde_yaml reports a duplicate at the start of the enclosing mapping and
/// prefixes the mapping's path; we name the full key and, for block
/// mappings, the line of the repeated occurrence.
fn duplicate_key(
    origin: &str,
    text: &str,
    message: &str,
    loc: Option<(usize, usize)>,
) -> Option<ConfigError> {
    const MARK: &str = "duplicate entry with key ";
    let idx = message.find(MARK)?;
    let path = message[..idx].trim_end().trim_end_matches(':');
    let key = message[idx + MARK.len()..]
        .trim()
        .trim_matches(|c| c == '"' || c == '`');
    let full = if path.is_empty() || path == "." {
        key.to_string()
    } else {
        format!("{path}.{key}")
    };
    let at = match loc {
        Some((line, column)) => match repeated_key_line(text, line, column, key) {
            Some(l) => format!(" at line {l} column {column}"),
            None => format!(" in the mapping at line {line} column {column}"),
        },
        None => String::new(),
    };
    Some(invalid(
        origin,
        format!("duplicate key '{full}'{at}; each key may appear only once"),
    ))
}

/// The 1-based line of the second `key:` of the block mapping whose first
/// key sits at (`line`, `column`), if it can be found by indentation alone.
fn repeated_key_line(text: &str, line: usize, column: usize, key: &str) -> Option<usize> {
    let indent = column.checked_sub(1)?;
    let mut seen = 0;
    for (i, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let leading = l.len() - l.trim_start_matches(' ').len();
        let body = l.trim();
        if i + 1 > line && !body.is_empty() && !body.starts_with('#') && leading < indent {
            break;
        }
        let (Some(head), Some(tail)) = (l.get(..indent), l.get(indent..)) else {
            continue;
        };
        if i + 1 > line && !head.chars().all(|c| c == ' ') {
            continue;
        }
        let after = tail
            .strip_prefix(key)
            .or_else(|| tail.strip_prefix(&format!("\"{key}\"")))
            .or_else(|| tail.strip_prefix(&format!("'{key}'")));
        if after.is_some_and(|a| a.trim_start().starts_with(':')) {
            seen += 1;
            if seen == 2 {
                return Some(i + 1);
            }
        }
    }
    None
}
