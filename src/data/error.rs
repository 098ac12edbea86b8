//! Data errors. Display is one line: where (`file:line`, 1-based lines for
//! JSONL and for the first line of a record in a JSON array), what is wrong,
//! and what to do about it. Tests assert these messages verbatim.

use std::fmt;

/// Something wrong with one record. With `skip_bad_samples: true` these are
/// skipped (and counted, with a warning); otherwise they stop the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordProblem {
    /// The line is not valid JSON.
    MalformedJson { column: usize, detail: String },
    /// The line has bytes that are not UTF-8; `column` is the 1-based
    /// character where the first bad byte sits.
    NotUtf8 { column: usize },
    /// Valid JSON, but not an object.
    NotAnObject { found: &'static str },
    /// A required field is absent; `hint` names the config key that chooses it.
    MissingField { field: String, hint: String },
    /// A field has the wrong JSON type.
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    /// A text field that must not be empty is empty.
    EmptyText { field: String },
    /// A message role moeq does not know.
    UnknownRole {
        at: String,
        role: String,
        known: String,
    },
    /// The chat template raised or failed to render.
    Template { detail: String },
    /// Formatting and masking left no token that counts towards the loss.
    EmptyAfterMasking,
    /// Truncation to `sequence_len` cut away every trained token.
    NothingTrainedAfterTruncation { sequence_len: usize },
    /// The tokenizer failed on the text.
    Tokenize { detail: String },
    /// A pre-tokenized record's ids, labels or mask do not fit together or the vocabulary.
    Tokens { detail: String },
}

impl fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RecordProblem::*;
        match self {
            MalformedJson { column, detail } => write!(
                f,
                "malformed JSON at column {column}: {detail} (each line must be one complete JSON object)"
            ),
            NotUtf8 { column } => write!(
                f,
                "not valid UTF-8 (bad byte at column {column}; re-encode the file as UTF-8)"
            ),
            NotAnObject { found } => {
                write!(f, "expected a JSON object with the record's fields, found {found}")
            }
            MissingField { field, hint } => write!(f, "missing field '{field}' ({hint})"),
            WrongType {
                field,
                expected,
                found,
            } => write!(f, "field '{field}' must be {expected}, found {found}"),
            EmptyText { field } => write!(
                f,
                "field '{field}' is empty (remove the record or give it text)"
            ),
            UnknownRole { at, role, known } => write!(
                f,
                "unknown role '{role}' in {at} (known roles: {known}; rename it in the data or add it to roles_to_train)"
            ),
            Template { detail } => write!(f, "chat template failed: {detail}"),
            EmptyAfterMasking => write!(
                f,
                "no token counts towards the loss after masking (the record has no trained turn; check roles_to_train or set train_on_inputs: true)"
            ),
            NothingTrainedAfterTruncation { sequence_len } => write!(
                f,
                "no trained token is left after truncation to sequence_len {sequence_len} (the prompt fills the sequence; raise sequence_len or shorten the record)"
            ),
            Tokenize { detail } => write!(f, "tokenizer failed: {detail}"),
            Tokens { detail } => write!(f, "{detail}"),
        }
    }
}

/// Every error of the data pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// One bad record, located by file and line.
    #[error("{file}:{line}: {problem}")]
    Record {
        file: String,
        line: usize,
        problem: RecordProblem,
    },
    /// A JSON file that cannot be parsed past `line` (a `.json` array is one
    /// document, so one syntax error loses the rest of the file).
    #[error("{file}:{line}: malformed JSON at column {column}: {detail} (the file cannot be read past this point; fix it, or write one record per line as .jsonl)")]
    JsonFile {
        file: String,
        line: usize,
        column: usize,
        detail: String,
    },
    /// A `.json` array file with bytes that are not UTF-8 (one document, so
    /// no record of it can be read).
    #[error(
        "{file}: not valid UTF-8 at byte {offset} (the file cannot be read; re-encode it as UTF-8)"
    )]
    NotUtf8File { file: String, offset: usize },
    /// A dataset with no records at all.
    #[error("{path}: empty dataset: no records (add records, or remove the entry from datasets)")]
    EmptyDataset { path: String },
    /// Every record of a dataset was skipped as bad.
    #[error("{path}: no usable records: all {skipped} were skipped as bad (first: {first})")]
    AllSkipped {
        path: String,
        skipped: usize,
        first: String,
    },
    /// `path:` names nothing on disk.
    #[error("{path}: no such file or directory (datasets[{index}].path must be a .jsonl or .json file, a directory of them, or synth://<task>)")]
    NotFound { index: usize, path: String },
    /// A file moeq cannot read as records.
    #[error("{path}: unsupported data file type (moeq reads .jsonl and .json; convert the file to JSON Lines)")]
    UnsupportedFile { path: String },
    /// A directory dataset with no file for the requested split.
    #[error("{path}: no .jsonl or .json file for split '{split}' (name files like {split}.jsonl, or list them in datasets[{index}].data_files)")]
    NoDataFiles {
        index: usize,
        path: String,
        split: String,
    },
    /// A file or directory that exists but could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    /// A problem with the tokenizer files.
    #[error("{path}: {problem}")]
    Tokenizer { path: String, problem: String },
    /// A chat template that does not compile, or no template where one is needed.
    #[error("{origin}: {problem}")]
    ChatTemplate { origin: String, problem: String },
    /// A `synth://` URI moeq does not understand.
    #[error("{uri}: {problem}")]
    Synth { uri: String, problem: String },
    /// The held-out split leaves nothing to train on.
    #[error("val_set_size: {problem}")]
    ValSplit { problem: String },
    /// Loader settings that cannot produce a batch.
    #[error("data loader: {problem}")]
    Loader { problem: String },
}

impl DataError {
    /// Whether `skip_bad_samples: true` may skip this error.
    pub fn is_record_error(&self) -> bool {
        matches!(self, DataError::Record { .. })
    }
}

/// Where a record came from: a file and its 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
}

impl Location {
    pub fn error(&self, problem: RecordProblem) -> DataError {
        DataError::Record {
            file: self.file.clone(),
            line: self.line,
            problem,
        }
    }
}

/// A JSON value's kind, as error messages name it.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}
