//! `type: chat_template`: a conversation rendered with the chat template and
//! masked so only the trained roles' output counts towards the loss.
//!
//! The mask is computed on the rendered text, then mapped to tokens: a token
//! is trained when its byte range overlaps a trained span, which is what
//! transformers' `return_assistant_tokens_mask` does (it marks the tokens
//! from the one holding a span's first character to the one holding its
//! last). A template that merges the template's whitespace into the content's
//! first token (Mixtral's `' ' + content`) therefore trains that token.
//!
//! Where the trained spans come from:
//! - a template with `{% generation %}` blocks: those blocks, exactly as
//!   transformers;
//! - any other template, per trained message `i` of the full rendering `T`:
//!   - start: where the assistant's turn begins, i.e. the end of
//!     `render(messages[..i], add_generation_prompt=True)` when that is a
//!     prefix of `T` (the header the generation prompt emits is not trained,
//!     everything the model writes after it is); when it is not, where it
//!     parts from `T`, if that is past the earlier turns' rendering (a prompt
//!     that opens `<think>` where the turn holds `</think>`). Otherwise, and
//!     for non-assistant roles, the first byte of `T` that changes when the
//!     message is replaced by a sentinel (the earlier of the two).
//!   - end: the last byte of `T` that changes when message `i` is replaced by
//!     `{role, content: <sentinel>}`. This finds the content however the
//!     template transforms it (`.strip()`, Qwen3's `<think>` handling,
//!     tool calls) without guessing its text. When the template raises on that
//!     (a tool reply left without its tool call), the same on the conversation
//!     cut after message `i`.
//!   - end of turn: a special token (`<|im_end|>`, `</s>`…) right after the
//!     end is the turn's EOS — or, with `eot_tokens`, one of those texts —;
//!     `train_on_eos` decides whether it is trained.
//!
//! tests/data_chat_fixtures.rs checks both paths against transformers' masks for
//! the Qwen3, Qwen2.5, Mixtral and OLMoE templates, and the texts and token ids
//! of eight more published templates (GLM, DeepSeek-V3.1, gpt-oss, Kimi K2,
//! MiniMax-M2, Granite) with their replies trained.

use super::error::{json_kind, RecordProblem};
use super::template::{ChatTemplate, Rendered};
use super::tokenizer::TokenizerBundle;
use super::{spans_to_labels, Sample};
use crate::config::{DatasetConfig, TrainOnEos};
use serde_json::{Map, Value as Json};

const SENTINEL: &str = "\u{F0003}";
const BASE_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Renders a message list (with or without the generation prompt).
type RenderFn<'a> = dyn Fn(&[Json], bool) -> Result<Rendered, RecordProblem> + 'a;

/// Formats one dataset's conversations.
pub struct ChatFormat<'a> {
    pub template: &'a ChatTemplate,
    pub tok: &'a TokenizerBundle,
    pub ds: &'a DatasetConfig,
    pub train_on_inputs: bool,
    /// The texts that end a turn (`eot_tokens`); none: any special token.
    pub eot_tokens: Option<&'a [String]>,
}

/// A conversation ready for the template.
struct Conversation {
    messages: Vec<Json>,
    roles: Vec<String>,
    extra: Map<String, Json>,
}

impl ChatFormat<'_> {
    pub fn sample(&self, record: &Map<String, Json>) -> Result<Sample, RecordProblem> {
        let conv = self.conversation(record)?;
        let render = |messages: &[Json], agp: bool| {
            self.template
                .render(messages, agp, self.tok, &conv.extra)
                .map_err(|detail| RecordProblem::Template { detail })
        };
        let full = render(&conv.messages, false)?;
        let text = &full.text;
        let spans = if self.train_on_inputs {
            vec![(0, text.len())]
        } else if self.template.has_generation {
            full.generation.clone()
        } else {
            self.auto_spans(&conv, text, &render)?
        };
        let (ids, offsets) = self
            .tok
            .encode(text, false)
            .map_err(|e| RecordProblem::Tokenize {
                detail: e.to_string(),
            })?;
        let labels = spans_to_labels(&ids, &offsets, &spans);
        Ok(Sample {
            input_ids: ids,
            labels,
        })
    }

    /// With `{% generation %}` blocks the template alone says what is
    /// trained (as in transformers), so `roles_to_train` and `train_on_eos`
    /// do nothing: a warning when either is set to something else than its
    /// default, once per dataset.
    pub fn ignored_settings_warning(&self) -> Option<String> {
        if !self.template.has_generation || self.train_on_inputs {
            return None;
        }
        let mut set = Vec::new();
        if self.ds.roles_to_train != ["assistant"] {
            set.push(format!(
                "roles_to_train: [{}]",
                self.ds.roles_to_train.join(", ")
            ));
        }
        if self.ds.train_on_eos != TrainOnEos::Turn {
            set.push(format!("train_on_eos: {}", self.ds.train_on_eos));
        }
        (!set.is_empty()).then(|| {
            format!(
                "{}: {} ignored: the chat template marks what is trained with {{% generation %}} blocks (remove the setting, or use a template without generation blocks)",
                self.ds.path,
                set.join(" and ")
            )
        })
    }

    /// Reads the message list, applying `message_property_mappings` and the
    /// usual role aliases (ShareGPT's `human`/`gpt`).
    fn conversation(&self, record: &Map<String, Json>) -> Result<Conversation, RecordProblem> {
        let field = &self.ds.field_messages;
        let list = record
            .get(field)
            .ok_or_else(|| RecordProblem::MissingField {
                field: field.clone(),
                hint: "set field_messages to the record's list of messages".to_string(),
            })?;
        let Json::Array(items) = list else {
            return Err(RecordProblem::WrongType {
                field: field.clone(),
                expected: "a list of messages",
                found: json_kind(list),
            });
        };
        let map = |k: &str| {
            self.ds
                .message_property_mappings
                .get(k)
                .cloned()
                .unwrap_or_else(|| k.to_string())
        };
        let (role_key, content_key) = (map("role"), map("content"));
        let mut known: Vec<&str> = BASE_ROLES.to_vec();
        for r in &self.ds.roles_to_train {
            if !known.contains(&r.as_str()) {
                known.push(r);
            }
        }
        let mut messages = Vec::with_capacity(items.len());
        let mut roles = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let here = format!("{field}[{i}]");
            let Json::Object(m) = item else {
                return Err(RecordProblem::WrongType {
                    field: here,
                    expected: "an object with role and content",
                    found: json_kind(item),
                });
            };
            let role = match m.get(&role_key) {
                Some(Json::String(r)) => r.as_str(),
                Some(other) => {
                    return Err(RecordProblem::WrongType {
                        field: format!("{here}.{role_key}"),
                        expected: "a string",
                        found: json_kind(other),
                    })
                }
                None => {
                    return Err(RecordProblem::MissingField {
                        field: format!("{here}.{role_key}"),
                        hint: "map the role's name with message_property_mappings".to_string(),
                    })
                }
            };
            let role = match role {
                "human" => "user",
                "gpt" => "assistant",
                r => r,
            };
            if !known.contains(&role) {
                return Err(RecordProblem::UnknownRole {
                    at: here,
                    role: role.to_string(),
                    known: known.join(", "),
                });
            }
            let content = m.get(&content_key);
            if content.is_none() && !m.contains_key("tool_calls") {
                return Err(RecordProblem::MissingField {
                    field: format!("{here}.{content_key}"),
                    hint: "map the content's name with message_property_mappings".to_string(),
                });
            }
            let mut msg = Map::new();
            msg.insert("role".into(), Json::String(role.to_string()));
            msg.insert("content".into(), content.cloned().unwrap_or(Json::Null));
            // The reasoning trace under the name the template reads (axolotl's
            // field_thinking → template_thinking_key); the field's own name is dropped then.
            let (thinking, thinking_key) =
                (&self.ds.field_thinking, &self.ds.template_thinking_key);
            let renamed = thinking != thinking_key
                && *thinking != role_key
                && *thinking != content_key
                && m.get(thinking).is_some_and(|v| !v.is_null());
            if renamed {
                msg.insert(thinking_key.clone(), m[thinking].clone());
            }
            for (k, v) in m {
                if *k != role_key && *k != content_key && !(renamed && k == thinking) {
                    msg.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            roles.push(role.to_string());
            messages.push(Json::Object(msg));
        }
        let mut extra = Map::new();
        if let Some(tools) = record.get("tools") {
            extra.insert("tools".into(), tools.clone());
        }
        Ok(Conversation {
            messages,
            roles,
            extra,
        })
    }

    /// Trained byte spans of `text` for a template without generation blocks.
    fn auto_spans(
        &self,
        conv: &Conversation,
        text: &str,
        render: &RenderFn,
    ) -> Result<Vec<(usize, usize)>, RecordProblem> {
        let trained: Vec<bool> = conv
            .roles
            .iter()
            .map(|r| self.ds.roles_to_train.iter().any(|t| t == r))
            .collect();
        let last_trained = trained.iter().rposition(|&t| t);
        let mut spans = Vec::new();
        for i in 0..conv.messages.len() {
            let eos_policy = self.ds.train_on_eos;
            if !trained[i] && eos_policy != TrainOnEos::All {
                continue;
            }
            let mut swapped = conv.messages.clone();
            let mut sentinel = Map::new();
            sentinel.insert("role".into(), Json::String(conv.roles[i].clone()));
            sentinel.insert("content".into(), Json::String(SENTINEL.to_string()));
            swapped[i] = Json::Object(sentinel);
            let (prefix, end) = match render(&swapped, false) {
                Ok(other) => {
                    let (prefix, suffix) = common_ends(text, &other.text);
                    (prefix, text.len() - suffix)
                }
                // A template that raises on the swapped conversation (MiniMax-M2: a tool reply
                // whose assistant tool call is gone): the conversation up to the message, when
                // it renders as the start of the whole.
                Err(e) => {
                    let upto = render(&conv.messages[..=i], false)?.text;
                    if !text.starts_with(&upto) {
                        return Err(e);
                    }
                    let other = render(&swapped[..=i], false)?.text;
                    let (prefix, suffix) = common_ends(&upto, &other);
                    (prefix, upto.len() - suffix)
                }
            };
            let mut start = prefix;
            if conv.roles[i] == "assistant" && i > 0 {
                let head = render(&conv.messages[..i], true)?.text;
                if text.starts_with(&head) {
                    start = head.len();
                } else {
                    // The generation prompt is not the turn's own header (GLM-4.7-Flash's
                    // prompt opens `<think>` where a finished turn writes `</think>`): the
                    // turn starts where the two part, if that is past the earlier turns.
                    let before = render(&conv.messages[..i], false)?.text;
                    let shared = common_ends(text, &head).0;
                    if text.starts_with(&before) && shared >= before.len() {
                        start = start.min(shared);
                    }
                }
            }
            let end = end.max(start);
            if trained[i] {
                spans.push((start, end));
            }
            let eos_trained = match eos_policy {
                TrainOnEos::All => true,
                TrainOnEos::Turn => trained[i],
                TrainOnEos::Last => Some(i) == last_trained,
                TrainOnEos::None => false,
            };
            if let (true, Some(len)) = (eos_trained, self.special_at(&text[end..])) {
                spans.push((end, end + len));
            }
        }
        Ok(spans)
    }

    /// Length of the longest end-of-turn text that `rest` starts with: one of `eot_tokens`
    /// where set, else any special token.
    fn special_at(&self, rest: &str) -> Option<usize> {
        let texts: Box<dyn Iterator<Item = &String>> = match self.eot_tokens {
            Some(eot) => Box::new(eot.iter()),
            None => Box::new(self.tok.special_texts.iter()),
        };
        texts
            .filter(|s| !s.is_empty() && rest.starts_with(s.as_str()))
            .map(String::len)
            .max()
    }
}

/// Bytes `a` shares with `b` at its start and at its end, on char
/// boundaries, never overlapping.
fn common_ends(a: &str, b: &str) -> (usize, usize) {
    let mut prefix = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(prefix) {
        prefix -= 1;
    }
    let max_suffix = a.len().min(b.len()) - prefix.min(a.len().min(b.len()));
    let mut suffix = a
        .bytes()
        .rev()
        .zip(b.bytes().rev())
        .take(max_suffix)
        .take_while(|(x, y)| x == y)
        .count();
    while !a.is_char_boundary(a.len() - suffix) {
        suffix -= 1;
    }
    (prefix, suffix)
}

#[cfg(test)]
mod tests {
    use super::common_ends;

    #[test]
    fn common_ends_do_not_overlap() {
        assert_eq!(common_ends("abXcd", "abYcd"), (2, 2));
        assert_eq!(common_ends("abcd", "abYcd"), (2, 2));
        assert_eq!(common_ends("aa", "aaa"), (2, 0));
        assert_eq!(common_ends("xé", "xè"), (1, 0));
    }
}
