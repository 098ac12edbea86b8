//! Finding a dataset's files and reading them as records.
//!
//! `.jsonl` files (and `.json` files that do not start with `[`, as the Hub
//! writes them) are JSON Lines: one object per line, blank lines ignored. A `.json` file that starts
//! with `[` is one array of objects; each record is located by the line its
//! element starts on. A directory is searched for the split's files the way
//! the Hugging Face `json` loader names them: `train.jsonl`,
//! `train-00000-of-00002.jsonl`, `data/train.json`…

use super::error::{json_kind, DataError, Location, RecordProblem};
use crate::config::DatasetConfig;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// One record: where it is and its fields, or what is wrong with it.
pub struct Record {
    pub at: Location,
    pub fields: Result<Map<String, Json>, RecordProblem>,
}

const OTHER_SPLITS: [&str; 5] = ["test", "validation", "valid", "eval", "dev"];

fn is_data_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json")
    )
}

fn list_dir(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Read {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() && depth > 0 {
            list_dir(&p, depth - 1, out)?;
        } else if p.is_file() && is_data_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether `p` belongs to `split` by its file name or a folder name.
fn in_split(root: &Path, p: &Path, split: &str) -> bool {
    let rel = p.strip_prefix(root).unwrap_or(p);
    rel.components().any(|c| {
        let name = c.as_os_str().to_string_lossy();
        let stem = name.split('.').next().unwrap_or_default();
        stem == split
            || stem
                .strip_prefix(split)
                .is_some_and(|rest| rest.starts_with(['-', '_']))
    })
}

/// The files of dataset entry `index`, sorted.
pub fn dataset_files(index: usize, ds: &DatasetConfig) -> Result<Vec<PathBuf>, DataError> {
    let root = PathBuf::from(&ds.path);
    if root.is_file() {
        if !is_data_file(&root) {
            return Err(DataError::UnsupportedFile {
                path: ds.path.clone(),
            });
        }
        return Ok(vec![root]);
    }
    if !root.is_dir() {
        return Err(DataError::NotFound {
            index,
            path: ds.path.clone(),
        });
    }
    let root = match &ds.name {
        Some(name) => root.join(name),
        None => root,
    };
    if let Some(files) = &ds.data_files {
        let mut out = Vec::new();
        for f in files {
            let p = root.join(f);
            if !p.is_file() {
                return Err(DataError::NotFound {
                    index,
                    path: p.display().to_string(),
                });
            }
            if !is_data_file(&p) {
                return Err(DataError::UnsupportedFile {
                    path: p.display().to_string(),
                });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let mut all = Vec::new();
    list_dir(&root, 2, &mut all)?;
    all.sort();
    let split = ds.split.as_deref().unwrap_or("train");
    let mut chosen: Vec<PathBuf> = all
        .iter()
        .filter(|p| in_split(&root, p, split))
        .cloned()
        .collect();
    // Like the Hub loader: files named for no split at all are the train split.
    if chosen.is_empty()
        && split == "train"
        && !all
            .iter()
            .any(|p| OTHER_SPLITS.iter().any(|s| in_split(&root, p, s)))
    {
        chosen = all;
    }
    if chosen.is_empty() {
        return Err(DataError::NoDataFiles {
            index,
            path: root.display().to_string(),
            split: split.to_string(),
        });
    }
    Ok(chosen)
}

/// serde_json's message without its " at line L column C" tail.
fn json_detail(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn object(v: Json) -> Result<Map<String, Json>, RecordProblem> {
    match v {
        Json::Object(m) => Ok(m),
        other => Err(RecordProblem::NotAnObject {
            found: json_kind(&other),
        }),
    }
}

/// Reads every record of one file. JSON Lines are decoded line by line, so
/// a line that is not UTF-8 is one bad record (skippable), not a bad file.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::Read {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json && bytes.trim_ascii_start().starts_with(b"[") {
        let text = std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8File {
            file: file.clone(),
            offset: e.valid_up_to(),
        })?;
        return read_array(&file, text);
    }
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let at = Location {
            file: file.clone(),
            line: i + 1,
        };
        let line = match std::str::from_utf8(raw) {
            Ok(line) => line,
            Err(e) => {
                let column = raw[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b & 0xC0 != 0x80)
                    .count()
                    + 1;
                out.push(Record {
                    at,
                    fields: Err(RecordProblem::NotUtf8 { column }),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let fields = match serde_json::from_str::<Json>(line) {
            Ok(v) => object(v),
            Err(e) => Err(RecordProblem::MalformedJson {
                column: e.column(),
                detail: json_detail(&e),
            }),
        };
        out.push(Record { at, fields });
    }
    Ok(out)
}

/// A `.json` array: parsed whole, then each element located by scanning for
/// where it starts.
fn read_array(file: &str, text: &str) -> Result<Vec<Record>, DataError> {
    let values: Vec<Json> = serde_json::from_str(text).map_err(|e| DataError::JsonFile {
        file: file.to_string(),
        line: e.line(),
        column: e.column(),
        detail: json_detail(&e),
    })?;
    let lines = element_lines(text);
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| Record {
            at: Location {
                file: file.to_string(),
                line: lines.get(i).copied().unwrap_or(1),
            },
            fields: object(v),
        })
        .collect())
}

/// 1-based line on which each top-level element of a JSON array starts.
fn element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut in_string, mut escaped, mut expect_element) = (false, false, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expect_element && !c.is_whitespace() && c != ']' {
            lines.push(line);
            expect_element = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect_element = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::element_lines;

    #[test]
    fn array_elements_are_located() {
        let text = "[\n  {\"a\": \"x,]\"},\n  {\"b\": [1, 2]}, {\"c\": 3}\n]";
        assert_eq!(element_lines(text), vec![2, 3, 3]);
    }
}
