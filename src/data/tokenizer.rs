//! The model's tokenizer with the special tokens and chat template that
//! transformers would use for it.
//!
//! Sources, in the order transformers reads them: `tokenizer.json` (the
//! `tokenizers` crate runs it), `tokenizer_config.json` (bos/eos/pad/unk as
//! strings or AddedToken objects, `chat_template` as a string or a list of
//! named templates), `chat_template.jinja` (newer checkpoints keep the
//! template there; it wins over the one in tokenizer_config.json), and
//! `config.json` (`bos_token_id`/`eos_token_id`/`pad_token_id`, used only when
//! tokenizer_config.json names no token).

use super::error::DataError;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Token ids and the byte range `[start, end)` of the text each one covers.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// A special token: its text (as templates see it) and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: SpecialToken,
    /// Falls back to `eos` when the model names no pad token.
    pub pad: SpecialToken,
    pub unk: Option<SpecialToken>,
    /// The model's chat template, if it has one.
    pub chat_template: Option<String>,
    /// Texts of the added tokens marked special (`<|im_end|>`, `</s>`…):
    /// a turn that ends in one of these ends with an end-of-turn token.
    pub special_texts: BTreeSet<String>,
    /// Ids the post-processor puts before a text (e.g. Llama's `<s>`).
    pub prefix_ids: Vec<u32>,
    /// Ids the post-processor puts after a text (rare: some add `</s>`).
    pub suffix_ids: Vec<u32>,
    /// sha256 over the files read, for cache keys.
    pub fingerprint: String,
    /// Where tokenizer.json was read from, for messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<(Value, Vec<u8>)>, DataError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let value = serde_json::from_slice(&bytes).map_err(|e| DataError::Tokenizer {
        path: path.display().to_string(),
        problem: format!("not valid JSON: {e}"),
    })?;
    Ok(Some((value, bytes)))
}

/// A special token entry of tokenizer_config.json: a string, an AddedToken
/// object (`{"content": ..., "__type": "AddedToken"}`), or null.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` may be an int or a list of ints (the first is the EOS).
fn config_id(config: Option<&Value>, key: &str) -> Option<u32> {
    let v = config?.get(key)?;
    let n = match v {
        Value::Array(a) => a.first()?.as_u64()?,
        _ => v.as_u64()?,
    };
    u32::try_from(n).ok()
}

impl TokenizerBundle {
    /// Loads the tokenizer of `model_dir`, or of `override_path` (a directory
    /// or a tokenizer.json file: the YAML's `tokenizer_config`) when given.
    /// `config.json` ids are always taken from `model_dir`.
    pub fn load(model_dir: &Path, override_path: Option<&Path>) -> Result<Self, DataError> {
        let (dir, tokenizer_file) = match override_path {
            Some(p) if p.is_file() => (
                p.parent().unwrap_or(Path::new(".")).to_path_buf(),
                p.to_path_buf(),
            ),
            Some(p) => (p.to_path_buf(), p.join("tokenizer.json")),
            None => (model_dir.to_path_buf(), model_dir.join("tokenizer.json")),
        };
        let shown = tokenizer_file.display().to_string();
        let tok_bytes = std::fs::read(&tokenizer_file).map_err(|e| DataError::Tokenizer {
            path: shown.clone(),
            problem: format!(
                "cannot read the tokenizer ({e}); the model directory needs tokenizer.json, or set tokenizer_config"
            ),
        })?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tok_bytes).map_err(|e| DataError::Tokenizer {
                path: shown.clone(),
                problem: format!("not a tokenizers tokenizer.json: {e}"),
            })?;
        // Truncation and padding are the pipeline's job; a tokenizer.json saved
        // with them (some are, with max_length 512) would cut samples silently.
        tokenizer
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                path: shown.clone(),
                problem: e.to_string(),
            })?;
        tokenizer.with_padding(None);

        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json(&model_dir.join("config.json"))?;
        let tc = tok_config.as_ref().map(|(v, _)| v);
        let mc = model_config.as_ref().map(|(v, _)| v);
        let template_file = dir.join("chat_template.jinja");
        let jinja = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file).map_err(|e| DataError::Read {
                    path: template_file.display().to_string(),
                    reason: e.to_string(),
                })?,
            )
        } else {
            None
        };
        let chat_template = match jinja {
            Some(t) => Some(t),
            None => tc
                .and_then(|c| c.get("chat_template"))
                .map(|v| named_template(v, &dir))
                .transpose()?
                .flatten(),
        };

        let resolve = |key: &str, id_key: &str| -> Result<Option<SpecialToken>, DataError> {
            if let Some(text) = token_text(tc.and_then(|c| c.get(key))) {
                let id = tokenizer
                    .token_to_id(&text)
                    .ok_or_else(|| DataError::Tokenizer {
                        path: dir.join("tokenizer_config.json").display().to_string(),
                        problem: format!(
                            "{key} '{text}' is not in the vocabulary of {shown}; fix {key} or use the matching tokenizer.json"
                        ),
                    })?;
                return Ok(Some(SpecialToken { text, id }));
            }
            Ok(config_id(mc, id_key).and_then(|id| {
                tokenizer
                    .id_to_token(id)
                    .map(|text| SpecialToken { text, id })
            }))
        };
        let bos = resolve("bos_token", "bos_token_id")?;
        let eos = resolve("eos_token", "eos_token_id")?.ok_or_else(|| DataError::Tokenizer {
            path: dir.display().to_string(),
            problem: "no end-of-sequence token: tokenizer_config.json has no eos_token and config.json no eos_token_id; add one of them".to_string(),
        })?;
        let pad = resolve("pad_token", "pad_token_id")?.unwrap_or_else(|| eos.clone());
        let unk = resolve("unk_token", "unk_token_id")?;

        let special_texts = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();

        let mut h = Sha256::new();
        for part in [
            Some(&tok_bytes[..]),
            tok_config.as_ref().map(|(_, b)| &b[..]),
            model_config.as_ref().map(|(_, b)| &b[..]),
            chat_template.as_deref().map(str::as_bytes),
        ] {
            let part = part.unwrap_or(b"");
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let fingerprint = format!("{:x}", h.finalize());

        let mut bundle = TokenizerBundle {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            chat_template,
            special_texts,
            prefix_ids: Vec::new(),
            suffix_ids: Vec::new(),
            fingerprint,
            source: tokenizer_file,
        };
        bundle.probe_post_processor()?;
        Ok(bundle)
    }

    /// Finds what the post-processor adds around a text by encoding a probe
    /// with and without special tokens.
    fn probe_post_processor(&mut self) -> Result<(), DataError> {
        let plain = self.encode(" probe", false)?.0;
        let full = self.encode(" probe", true)?.0;
        if let Some(start) = full.windows(plain.len()).position(|w| w == plain) {
            self.prefix_ids = full[..start].to_vec();
            self.suffix_ids = full[start + plain.len()..].to_vec();
        }
        Ok(())
    }

    /// Token ids and byte offsets `[start, end)` of each token in `text`.
    /// `add_special` runs the post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Encoded, DataError> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| DataError::Tokenizer {
                path: self.source.display().to_string(),
                problem: format!("encoding failed: {e}"),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of `text` with no special tokens added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self.encode(text, false)?.0)
    }

    /// Token text of `id`, for messages and debugging.
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of
/// `{name, template}` where transformers uses the one named `default`.
fn named_template(v: &Value, dir: &Path) -> Result<Option<String>, DataError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(items) => {
            let named = |n: &str| {
                items.iter().find_map(|it| {
                    (it.get("name")?.as_str()? == n)
                        .then(|| it.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").map(Some).ok_or_else(|| DataError::Tokenizer {
                path: dir.join("tokenizer_config.json").display().to_string(),
                problem: "chat_template is a list without a template named 'default'; give one in the YAML's chat_template".to_string(),
            })
        }
        _ => Err(DataError::Tokenizer {
            path: dir.join("tokenizer_config.json").display().to_string(),
            problem: "chat_template must be a string or a list of {name, template}".to_string(),
        }),
    }
}
