//! A real byte-level BPE tokenizer for synthetic checkpoints, built like Qwen2's: NFC
//! normalizer, Qwen's split regex, byte-level alphabet of 256 symbols, merges learned
//! deterministically from an embedded corpus, and ChatML special tokens. Any text
//! round-trips, because every byte has a token.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
const SPECIALS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// Qwen2's pre-tokenizer pattern (tokenizer.json of the Qwen2/Qwen3 family).
const SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ChatML, as the Qwen family renders it (without tool calls).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const CORPUS: &str = include_str!("corpus.txt");

/// Total vocabulary of the synthetic tokenizer: 256 bytes, learned merges, 3 specials.
pub const VOCAB_SIZE: usize = 512;

pub struct SynthTokenizer {
    /// tokenizer.json contents.
    pub json: Value,
    /// tokenizer_config.json contents.
    pub config: Value,
    pub endoftext_id: u32,
    pub im_start_id: u32,
    pub im_end_id: u32,
}

/// GPT-2's reversible byte → printable-unicode map used by byte-level BPE.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// Words of the corpus as the byte-level pre-tokenizer would roughly see them: split before
/// each space-led word, so merges never cross a word start.
fn corpus_words(table: &[char]) -> BTreeMap<Vec<String>, usize> {
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut current = String::new();
    let mut flush = |w: &mut String| {
        if !w.is_empty() {
            let symbols = w.bytes().map(|b| table[b as usize].to_string()).collect();
            *words.entry(symbols).or_insert(0) += 1;
            w.clear();
        }
    };
    for ch in CORPUS.chars() {
        let boundary = ch.is_whitespace() || !ch.is_alphanumeric();
        let prev_alnum = current.chars().last().is_some_and(|c| c.is_alphanumeric());
        if boundary || (!prev_alnum && !current.trim().is_empty()) {
            flush(&mut current);
        }
        current.push(ch);
    }
    flush(&mut current);
    words
}

/// Classic BPE training; ties broken by the lexicographically smallest pair, so the result
/// depends only on the corpus.
fn learn_merges(table: &[char], count: usize) -> Vec<(String, String)> {
    let mut words: Vec<(Vec<String>, usize)> = corpus_words(table).into_iter().collect();
    let mut merges = Vec::with_capacity(count);
    while merges.len() < count {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (symbols, freq) in &words {
            for w in symbols.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_insert(0) += freq;
            }
        }
        let Some((best, _)) = pairs
            .into_iter()
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then_with(|| pb.cmp(pa)))
        else {
            break;
        };
        let (a, b) = (best.0.to_string(), best.1.to_string());
        let joined = format!("{a}{b}");
        for (symbols, _) in words.iter_mut() {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = joined.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    merges
}

pub fn build(model_max_length: usize) -> SynthTokenizer {
    let table = bytes_to_unicode();
    let merge_count = VOCAB_SIZE - 256 - SPECIALS.len();
    let merges = learn_merges(&table, merge_count);
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    let mut vocab_map = serde_json::Map::new();
    for (id, tok) in vocab.iter().enumerate() {
        vocab_map.insert(tok.clone(), json!(id));
    }
    let first_special = vocab.len();
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(k, content)| {
            json!({"id": first_special + k, "content": content, "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        }
    });
    let decoder: serde_json::Map<String, Value> = added
        .iter()
        .map(|t| {
            let mut entry = t.clone();
            let id = entry["id"].to_string();
            if let Some(obj) = entry.as_object_mut() {
                obj.remove("id");
            }
            (id, entry)
        })
        .collect();
    let config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null
    });
    let id = |k: usize| (first_special + k) as u32;
    SynthTokenizer {
        json,
        config,
        endoftext_id: id(0),
        im_start_id: id(1),
        im_end_id: id(2),
    }
}
