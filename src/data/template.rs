//! Chat templates rendered the way transformers' `apply_chat_template` does.
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
//! `tojson` filter that is Python's `json.dumps` (no HTML escaping, `", "` and
//! `": "` separators, non-ASCII kept), and the globals `raise_exception` and
//! `strftime_now` (pinned by `SOURCE_DATE_EPOCH`: [`now`]). The special tokens (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`) are template variables; a token the tokenizer lacks is
//! undefined, which renders as nothing. minijinja with the same settings, plus
//! minijinja-contrib's pycompat (`.strip()`, `.startswith()`, `.split()`…),
//! renders the published templates byte for byte (tests/data_chat_fixtures.rs).
//!
//! `{% generation %}…{% endgeneration %}` (transformers' assistant-mask
//! extension) is supported: each block is rewritten to an empty `filter`
//! block pair that emits a private-use marker character, so whitespace control
//! stays that of a block tag; the markers are removed after rendering and
//! their byte offsets become the generation spans.

use super::error::DataError;
use super::tokenizer::TokenizerBundle;
use minijinja::value::{Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;
use std::cell::RefCell;

const GEN_OPEN: char = '\u{F0001}';
const GEN_CLOSE: char = '\u{F0002}';

/// The chat templates a config may name, as axolotl names them (`chat_template: llama4`):
/// axolotl's copies of the published templates (src/data/templates/SOURCE.md), rendered as
/// transformers renders them (tests/data_named_templates.rs checks against transformers).
pub const NAMED_TEMPLATES: &[(&str, &str)] = &[
    ("deepseek_v2", include_str!("templates/deepseek_v2.jinja")),
    ("deepseek_v3", include_str!("templates/deepseek_v3.jinja")),
    ("gemma", include_str!("templates/gemma.jinja")),
    ("gemma3", include_str!("templates/gemma3.jinja")),
    ("gemma4", include_str!("templates/gemma4.jinja")),
    ("llama3", include_str!("templates/llama3.jinja")),
    ("llama4", include_str!("templates/llama4.jinja")),
    ("mistral_v1", include_str!("templates/mistral_v1.jinja")),
    ("mistral_v2v3", include_str!("templates/mistral_v2v3.jinja")),
    (
        "mistral_v7_tekken",
        include_str!("templates/mistral_v7_tekken.jinja"),
    ),
    ("phi_3", include_str!("templates/phi_3.jinja")),
    ("phi_4", include_str!("templates/phi_4.jinja")),
    ("qwen3", include_str!("templates/qwen3.jinja")),
    ("qwen3_5", include_str!("templates/qwen3_5.jinja")),
    ("qwen_25", include_str!("templates/qwen_25.jinja")),
];

/// The time templates see through `strftime_now`: the local time, or, when
/// `SOURCE_DATE_EPOCH` is set (the reproducible-builds convention: seconds
/// since 1970, UTC), that time, so that templates which write the date (gpt-oss,
/// Granite) render the same tokens on every day.
pub(crate) fn now() -> Result<chrono::DateTime<chrono::FixedOffset>, String> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .map(|t| t.fixed_offset())
            .ok_or_else(|| {
                format!("SOURCE_DATE_EPOCH={v}: not a number of seconds since 1970 (unset it to use today's date)")
            }),
        Err(_) => Ok(chrono::Local::now().fixed_offset()),
    }
}

/// ChatML, for `chat_template: chatml` (the Qwen family's format).
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

thread_local! {
    /// The message of the last `raise_exception` call on this thread, so a
    /// raised error reads as the template author wrote it.
    static RAISED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template marks assistant output with `{% generation %}`.
    pub has_generation: bool,
}

/// One rendering: the text and, for templates with `{% generation %}`, the
/// byte spans of the generation blocks in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<(usize, usize)>,
}

/// Rewrites `{%- generation -%}` / `{% endgeneration %}` (any whitespace
/// control) into filter blocks that emit the markers.
fn rewrite_generation(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The closing `%}` is searched after the opening `{%`, so `{%}` is
        // an unclosed tag (minijinja reports it), never a backwards slice.
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..end];
        let left = if inner.starts_with(['-', '+']) {
            &inner[..1]
        } else {
            ""
        };
        let inner = &inner[left.len()..];
        let right = if inner.ends_with(['-', '+']) {
            &inner[inner.len() - 1..]
        } else {
            ""
        };
        let word = inner[..inner.len() - right.len()].trim();
        let filter = match word {
            "generation" => Some("moeq_generation_open"),
            "endgeneration" => Some("moeq_generation_close"),
            _ => None,
        };
        match filter {
            Some(f) => {
                found = true;
                out.push_str(&format!("{{%{left} filter {f} %}}{{% endfilter {right}%}}"));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`.
fn py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let (item_sep, newline) = match indent {
        Some(n) => (",", Some(" ".repeat(n))),
        None => (", ", None),
    };
    let open = |out: &mut String, d: usize| {
        if let Some(pad) = &newline {
            out.push('\n');
            out.push_str(&pad.repeat(d));
        }
    };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                py_json(item, indent, depth + 1, out);
            }
            open(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(item, indent, depth + 1, out);
            }
            open(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in errors.
    pub fn compile(source: &str, origin: &str) -> Result<ChatTemplate, DataError> {
        let (source, has_generation) = rewrite_generation(source);
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| DataError::ChatTemplate {
                origin: origin.to_string(),
                problem: e.to_string(),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("moeq_generation_open", |_: String| GEN_OPEN.to_string());
        env.add_filter("moeq_generation_close", |_: String| GEN_CLOSE.to_string());
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            RAISED.with(|r| *r.borrow_mut() = Some(msg.clone()));
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // chrono reports a bad format as a fmt error (to_string() would
        // panic on it): a template error instead.
        env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
            use std::fmt::Write;
            let now = now().map_err(|e| Error::new(ErrorKind::InvalidOperation, e))?;
            let mut out = String::new();
            write!(out, "{}", now.format(&fmt)).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now('{fmt}'): not a valid strftime format (use chrono's specifiers, e.g. '%d %b %Y')"),
                )
            })?;
            Ok(out)
        });
        env.add_template_owned("chat_template", source)
            .map_err(|e| DataError::ChatTemplate {
                origin: origin.to_string(),
                problem: format!("the chat template does not compile: {e}"),
            })?;
        Ok(ChatTemplate {
            env,
            has_generation,
        })
    }

    /// Renders `messages` (JSON objects with at least `role`) as
    /// `apply_chat_template(messages, tokenize=False, ...)` would. `extra`
    /// holds further template variables (e.g. `tools`). Errors are one line.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tok: &TokenizerBundle,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<Rendered, String> {
        let mut ctx = extra.clone();
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let specials = [
            ("bos_token", tok.bos.as_ref()),
            ("eos_token", Some(&tok.eos)),
            ("pad_token", Some(&tok.pad)),
            ("unk_token", tok.unk.as_ref()),
        ];
        for (name, t) in specials {
            if let Some(t) = t {
                ctx.insert(name.into(), Json::String(t.text.clone()));
            }
        }
        RAISED.with(|r| r.borrow_mut().take());
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| e.to_string())?;
        let raw = template
            .render(Value::from(Serde(&Json::Object(ctx))))
            .map_err(|e| match RAISED.with(|r| r.borrow_mut().take()) {
                Some(msg) => format!("the template raised '{msg}'"),
                None => {
                    let line = e
                        .line()
                        .map(|l| format!(" at template line {l}"))
                        .unwrap_or_default();
                    format!("{}{line}", e.detail().unwrap_or(&e.kind().to_string()))
                }
            })?;
        Ok(split_markers(&raw))
    }
}

/// Removes the generation markers and returns their spans.
fn split_markers(raw: &str) -> Rendered {
    if !raw.contains([GEN_OPEN, GEN_CLOSE]) {
        return Rendered {
            text: raw.to_string(),
            generation: Vec::new(),
        };
    }
    let mut text = String::with_capacity(raw.len());
    let mut generation = Vec::new();
    let mut open = None;
    for c in raw.chars() {
        match c {
            GEN_OPEN => open = Some(text.len()),
            GEN_CLOSE => {
                if let Some(start) = open.take() {
                    generation.push((start, text.len()));
                }
            }
            _ => text.push(c),
        }
    }
    Rendered { text, generation }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_filter_blocks() {
        let (s, found) = rewrite_generation("a{%- generation %}b{% endgeneration -%}c{% if x %}");
        assert!(found);
        assert_eq!(
            s,
            "a{%- filter moeq_generation_open %}{% endfilter %}b{% filter moeq_generation_close %}{% endfilter -%}c{% if x %}"
        );
    }

    #[test]
    fn degenerate_tags_do_not_panic() {
        for source in ["{%}", "{%-%}", "{%+%}", "{%-}", "a{%%}b", "{%- -%}"] {
            let (s, found) = rewrite_generation(source);
            assert_eq!((s.as_str(), found), (source, false));
            let err = ChatTemplate::compile(source, "t")
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.starts_with("t: the chat template does not compile: ")),
                "{source}: {err:?}"
            );
        }
        let (s, found) = rewrite_generation("{%-generation-%}");
        assert!(found);
        assert_eq!(s, "{%- filter moeq_generation_open %}{% endfilter -%}");
    }

    #[test]
    fn python_json_formatting() {
        let v: Json = serde_json::json!({"b": [1, 2.5, "é\n"], "a": {}, "c": []});
        let mut out = String::new();
        py_json(&v, None, 0, &mut out);
        assert_eq!(out, r#"{"b": [1, 2.5, "é\n"], "a": {}, "c": []}"#);
        let mut out = String::new();
        py_json(&serde_json::json!({"a": [1]}), Some(2), 0, &mut out);
        assert_eq!(out, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn transformers_globals() {
        let tmp = std::env::temp_dir().join(format!("moeq-template-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let t = crate::synth::tokenizer::build(64);
        std::fs::write(tmp.join("tokenizer.json"), t.json.to_string()).unwrap();
        std::fs::write(tmp.join("tokenizer_config.json"), t.config.to_string()).unwrap();
        let tok = TokenizerBundle::load(&tmp, None).unwrap();
        let source = "{{ strftime_now('%Y') }}|{{ messages[0].content.strip().upper() }}|{{ eos_token }}|{{ bos_token }}|{{ messages | tojson }}";
        let t = ChatTemplate::compile(source, "t").unwrap();
        let msgs = vec![serde_json::json!({"role": "user", "content": " hi <é> "})];
        let out = t
            .render(&msgs, false, &tok, &Default::default())
            .unwrap()
            .text;
        let (year, rest) = out.split_once('|').unwrap();
        assert!(year.len() == 4 && year.starts_with("20"), "{year}");
        assert_eq!(
            rest,
            r#"HI <É>|<|endoftext|>||[{"role": "user", "content": " hi <é> "}]"#
        );
        std::fs::remove_dir_all(&tmp).ok();
    }

    #[test]
    fn markers_are_removed() {
        let r = split_markers("x\u{F0001}yz\u{F0002}w");
        assert_eq!(r.text, "xyzw");
        assert_eq!(r.generation, vec![(1, 3)]);
    }
}
