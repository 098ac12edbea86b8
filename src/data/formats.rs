//! The template-free dataset types: completion, alpaca and input_output.
//! Each turns one JSON record into token ids and aligned labels (see
//! [`Sample`]); chat_template lives in chat.rs.

use super::error::{json_kind, RecordProblem};
use super::tokenizer::TokenizerBundle;
use super::{spans_to_labels, Sample, IGNORE_INDEX};
use serde_json::{Map, Value as Json};

/// The Stanford Alpaca prompts (axolotl's `alpaca` type uses the same text).
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

fn tokenize_err(e: super::DataError) -> RecordProblem {
    RecordProblem::Tokenize {
        detail: e.to_string(),
    }
}

fn string_field<'r>(
    record: &'r Map<String, Json>,
    field: &str,
    hint: &str,
) -> Result<&'r str, RecordProblem> {
    match record.get(field) {
        Some(Json::String(s)) => Ok(s),
        Some(other) => Err(RecordProblem::WrongType {
            field: field.to_string(),
            expected: "a string",
            found: json_kind(other),
        }),
        None => Err(RecordProblem::MissingField {
            field: field.to_string(),
            hint: hint.to_string(),
        }),
    }
}

/// Post-processor prefix (e.g. BOS) + `text` + EOS, every token trained
/// except the untrainable first one. EOS is appended unless the
/// post-processor already ends with it.
fn with_specials(tok: &TokenizerBundle, body: Vec<u32>, body_labels: Vec<i32>) -> Sample {
    let mut input_ids = tok.prefix_ids.clone();
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    input_ids.extend(&body);
    labels.extend(body_labels);
    let mut tail = tok.suffix_ids.clone();
    if tail.last() != Some(&tok.eos.id) {
        tail.push(tok.eos.id);
    }
    for id in tail {
        input_ids.push(id);
        labels.push(if id == tok.eos.id {
            id as i32
        } else {
            IGNORE_INDEX
        });
    }
    Sample { input_ids, labels }
}

/// `type: completion`: the text of `field`, all of it trained, then EOS.
pub fn completion(
    tok: &TokenizerBundle,
    record: &Map<String, Json>,
    field: &str,
) -> Result<Sample, RecordProblem> {
    let text = string_field(
        record,
        field,
        "set datasets[].field to the record's text field",
    )?;
    if text.is_empty() {
        return Err(RecordProblem::EmptyText {
            field: field.to_string(),
        });
    }
    let ids = tok.encode_plain(text).map_err(tokenize_err)?;
    let labels = ids.iter().map(|&i| i as i32).collect();
    Ok(with_specials(tok, ids, labels))
}

/// `type: alpaca`: instruction / input / output in the Alpaca prompt; the
/// response and EOS are trained, the prompt only with `train_on_inputs`.
pub fn alpaca(
    tok: &TokenizerBundle,
    record: &Map<String, Json>,
    train_on_inputs: bool,
) -> Result<Sample, RecordProblem> {
    let hint = "alpaca records have instruction, output and an optional input";
    let instruction = string_field(record, "instruction", hint)?;
    let output = string_field(record, "output", hint)?;
    let input = match record.get("input") {
        None | Some(Json::Null) => "",
        Some(_) => string_field(record, "input", hint)?,
    };
    if output.is_empty() {
        return Err(RecordProblem::EmptyText {
            field: "output".to_string(),
        });
    }
    let prompt = if input.is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    };
    let text = format!("{prompt}{output}");
    let (ids, offsets) = tok.encode(&text, false).map_err(tokenize_err)?;
    let start = if train_on_inputs { 0 } else { prompt.len() };
    let labels = spans_to_labels(&ids, &offsets, &[(start, text.len())]);
    Ok(with_specials(tok, ids, labels))
}

/// `type: input_output`: `segments: [{text, label}]`, each segment tokenized
/// on its own (so segment boundaries are token boundaries) and trained when
/// its `label` is true. No EOS is added: put it in the last segment's text.
pub fn input_output(
    tok: &TokenizerBundle,
    record: &Map<String, Json>,
) -> Result<Sample, RecordProblem> {
    let segments = match record.get("segments") {
        Some(Json::Array(s)) => s,
        Some(other) => {
            return Err(RecordProblem::WrongType {
                field: "segments".into(),
                expected: "a list of {text, label}",
                found: json_kind(other),
            })
        }
        None => return Err(RecordProblem::MissingField {
            field: "segments".into(),
            hint:
                "input_output records are {\"segments\": [{\"text\": ..., \"label\": true|false}]}"
                    .into(),
        }),
    };
    let mut input_ids = tok.prefix_ids.clone();
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    for (i, seg) in segments.iter().enumerate() {
        let here = format!("segments[{i}]");
        let Json::Object(seg) = seg else {
            return Err(RecordProblem::WrongType {
                field: here,
                expected: "an object with text and label",
                found: json_kind(seg),
            });
        };
        let text = string_field(seg, "text", "each segment needs text and label")
            .map_err(|p| prefix_field(p, &here))?;
        let label = match seg.get("label") {
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                return Err(RecordProblem::WrongType {
                    field: format!("{here}.label"),
                    expected: "true or false",
                    found: json_kind(other),
                })
            }
            None => {
                return Err(RecordProblem::MissingField {
                    field: format!("{here}.label"),
                    hint: "each segment needs text and label".into(),
                })
            }
        };
        let ids = tok.encode_plain(text).map_err(tokenize_err)?;
        labels.extend(
            ids.iter()
                .map(|&id| if label { id as i32 } else { IGNORE_INDEX }),
        );
        input_ids.extend(ids);
    }
    Ok(Sample { input_ids, labels })
}

fn prefix_field(p: RecordProblem, here: &str) -> RecordProblem {
    match p {
        RecordProblem::MissingField { field, hint } => RecordProblem::MissingField {
            field: format!("{here}.{field}"),
            hint,
        },
        RecordProblem::WrongType {
            field,
            expected,
            found,
        } => RecordProblem::WrongType {
            field: format!("{here}.{field}"),
            expected,
            found,
        },
        other => other,
    }
}
