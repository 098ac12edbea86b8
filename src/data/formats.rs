//! The template-free dataset types: completion, alpaca, input_output and pre-tokenized records.
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

/// A pre-tokenized record (axolotl's datasets without `type:`): `input_ids`, optional `labels`
/// (aligned with the ids, -100 where not trained; default every token trained) and optional
/// `attention_mask` (positions with 0 are dropped, as padding). Taken as it is: no special
/// tokens are added. Ids must lie in the tokenizer's `vocab` (dataset `index` for the hint).
pub fn pretokenized(
    record: &Map<String, Json>,
    vocab: usize,
    index: usize,
) -> Result<Sample, RecordProblem> {
    let ints = |field: &str| -> Result<Option<Vec<i64>>, RecordProblem> {
        let Some(v) = record.get(field) else {
            return Ok(None);
        };
        let wrong = |found| RecordProblem::WrongType {
            field: field.to_string(),
            expected: "an array of integers",
            found,
        };
        let Json::Array(items) = v else {
            return Err(wrong(json_kind(v)));
        };
        items
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| wrong(json_kind(x))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let ids = ints("input_ids")?.ok_or_else(|| RecordProblem::MissingField {
        field: "input_ids".into(),
        hint: format!(
            "datasets[{index}] has no type:, so its records must be pre-tokenized; for text set datasets[{index}].type to completion, alpaca, chat_template or input_output"
        ),
    })?;
    let bad = |detail: String| RecordProblem::Tokens { detail };
    let n = ids.len();
    let labels = ints("labels")?.unwrap_or_else(|| ids.clone());
    let mask = ints("attention_mask")?.unwrap_or_else(|| vec![1; n]);
    for (field, len) in [("labels", labels.len()), ("attention_mask", mask.len())] {
        if len != n {
            return Err(bad(format!(
                "{field} has {len} entries for {n} input_ids: they must align one to one"
            )));
        }
    }
    let mut sample = Sample {
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
    };
    for (k, ((&id, &label), &m)) in ids.iter().zip(&labels).zip(&mask).enumerate() {
        let in_vocab = |t: i64| (0..vocab as i64).contains(&t);
        if !in_vocab(id) {
            return Err(bad(format!(
                "input_ids[{k}] = {id} is not a token id of this tokenizer (0..{vocab})"
            )));
        }
        if label != IGNORE_INDEX as i64 && !in_vocab(label) {
            return Err(bad(format!(
                "labels[{k}] = {label} is neither -100 nor a token id of this tokenizer (0..{vocab})"
            )));
        }
        match m {
            0 => continue,
            1 => {}
            _ => {
                return Err(bad(format!(
                    "attention_mask[{k}] = {m}: a mask holds 0 and 1 only"
                )))
            }
        }
        sample.input_ids.push(id as u32);
        sample.labels.push(label as i32);
    }
    if sample.input_ids.is_empty() {
        return Err(RecordProblem::EmptyText {
            field: "input_ids".into(),
        });
    }
    Ok(sample)
}
