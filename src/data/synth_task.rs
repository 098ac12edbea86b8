//! `synth://reverse`: the built-in task of the embedded default config.
//!
//! A record is a prompt of `len` distinct single-token symbols and a colon,
//! and the answer is the same symbols reversed, then EOS:
//!
//! ```text
//!  c a f:│ f a c<eos>      prompt (label false) │ answer (label true)
//! ```
//!
//! Each symbol is ` x` for a lowercase letter; with the synthetic tokenizer
//! (and Qwen's) every one is exactly one token, so a target is one symbol.
//! The dataset type is `input_output`. Sequences are unique, so the held-out
//! split (`val_set_size`) holds sequences the model never saw.
//!
//! Teacher-forced accuracy on the answer targets (letters and EOS) with the
//! defaults (10 symbols, lengths 3..=6):
//! - chance, uniform over the 10 symbols and EOS: 9.1%;
//! - a model that learned only the format (EOS after as many symbols as the
//!   prompt had, each symbol one of the prompt's not yet written): 57.5%;
//! - one that learned to reverse: 100%. The first answer symbol is the token
//!   just before the colon, so the curve leaves chance early.
//!
//! Query keys: `n` (records, default 4000), `seed` (0), `min_len` (3),
//! `max_len` (6), `symbols` (10, at most 23).
//!
//! `synth://random?n=N&len=L`: records of `L` symbols drawn uniformly (with
//! repeats) from the first `symbols` (default 23), every token a target —
//! rows of exactly `sequence_len` tokens with `len = sequence_len`, the
//! shape benchmarks compare against stacks fed random token ids. Keys: `n`
//! (1000), `seed` (0), `len` (2048), `symbols` (23).

use super::error::DataError;
use super::rng_stream;
use serde_json::{json, Map, Value as Json};
use std::collections::HashSet;

/// Lowercase letters that are one token with a leading space in the
/// synthetic tokenizer (k, x and z are not).
const ALPHABET: &[u8] = b"abcdefghijlmnopqrstuvwy";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseTask {
    pub n: usize,
    pub seed: u64,
    pub min_len: usize,
    pub max_len: usize,
    pub symbols: usize,
}

impl Default for ReverseTask {
    fn default() -> Self {
        ReverseTask {
            n: 4000,
            seed: 0,
            min_len: 3,
            max_len: 6,
            symbols: 10,
        }
    }
}

fn bad(uri: &str, problem: String) -> DataError {
    DataError::Synth {
        uri: uri.to_string(),
        problem,
    }
}

impl ReverseTask {
    /// Parses `synth://reverse?n=...`.
    pub fn parse(uri: &str) -> Result<ReverseTask, DataError> {
        let rest = uri.strip_prefix("synth://").unwrap_or(uri);
        let (task, query) = rest.split_once('?').unwrap_or((rest, ""));
        if task != "reverse" {
            return Err(bad(
                uri,
                format!("unknown synthetic task '{task}' (moeq has synth://reverse?n=N and synth://random?n=N&len=L)"),
            ));
        }
        let mut t = ReverseTask::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num: u64 = v.parse().map_err(|_| {
                bad(
                    uri,
                    format!("'{k}' must be a non-negative integer, got '{v}'"),
                )
            })?;
            let n = num as usize;
            match k {
                "n" => t.n = n,
                "seed" => t.seed = num,
                "min_len" => t.min_len = n,
                "max_len" => t.max_len = n,
                "symbols" => t.symbols = n,
                _ => {
                    return Err(bad(
                        uri,
                        format!("unknown key '{k}' (synth://reverse takes n, seed, min_len, max_len, symbols)"),
                    ))
                }
            }
        }
        if t.symbols < 2 || t.symbols > ALPHABET.len() {
            return Err(bad(
                uri,
                format!("symbols must be in 2..={}", ALPHABET.len()),
            ));
        }
        if t.min_len < 1 || t.min_len > t.max_len || t.max_len > t.symbols {
            return Err(bad(
                uri,
                format!(
                    "need 1 <= min_len <= max_len <= symbols, got min_len {} max_len {} symbols {}",
                    t.min_len, t.max_len, t.symbols
                ),
            ));
        }
        if t.n == 0 {
            return Err(bad(uri, "n must be at least 1".to_string()));
        }
        let possible: f64 = (t.min_len..=t.max_len)
            .map(|l| {
                (t.symbols - l + 1..=t.symbols)
                    .map(|x| x as f64)
                    .product::<f64>()
            })
            .sum();
        if (t.n as f64) > possible / 2.0 {
            return Err(bad(
                uri,
                format!("n = {} is too many distinct sequences for these settings (at most {:.0}); raise symbols or max_len", t.n, possible / 2.0),
            ));
        }
        Ok(t)
    }

    /// The records, as `input_output` segments. `eos` is the tokenizer's EOS
    /// text, ending the answer.
    pub fn records(&self, eos: &str) -> Vec<Map<String, Json>> {
        let mut rng = rng_stream(self.seed, "synth/reverse", 0);
        let mut seen = HashSet::with_capacity(self.n);
        let mut out = Vec::with_capacity(self.n);
        while out.len() < self.n {
            let len = self.min_len + super::uniform(&mut rng, self.max_len - self.min_len + 1);
            let mut pool: Vec<u8> = ALPHABET[..self.symbols].to_vec();
            let seq: Vec<u8> = (0..len)
                .map(|_| pool.remove(super::uniform(&mut rng, pool.len())))
                .collect();
            if !seen.insert(seq.clone()) {
                continue;
            }
            let words = |s: &mut dyn Iterator<Item = &u8>| {
                s.map(|&c| format!(" {}", c as char)).collect::<String>()
            };
            let prompt = format!("{}:", words(&mut seq.iter()));
            let answer = format!("{}{eos}", words(&mut seq.iter().rev()));
            let record = json!({"segments": [
                {"text": prompt, "label": false},
                {"text": answer, "label": true},
            ]});
            if let Json::Object(m) = record {
                out.push(m);
            }
        }
        out
    }
}

/// `synth://random`: rows of random symbols, every token a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomTask {
    pub n: usize,
    pub seed: u64,
    pub len: usize,
    pub symbols: usize,
}

impl RandomTask {
    /// Parses `synth://random?n=...&len=...`; `None` when `uri` names another task.
    pub fn parse(uri: &str) -> Option<Result<RandomTask, DataError>> {
        let rest = uri.strip_prefix("synth://").unwrap_or(uri);
        let (task, query) = rest.split_once('?').unwrap_or((rest, ""));
        if task != "random" {
            return None;
        }
        let mut t = RandomTask {
            n: 1000,
            seed: 0,
            len: 2048,
            symbols: ALPHABET.len(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Ok(num) = v.parse::<u64>() else {
                return Some(Err(bad(
                    uri,
                    format!("'{k}' must be a non-negative integer, got '{v}'"),
                )));
            };
            match k {
                "n" => t.n = num as usize,
                "seed" => t.seed = num,
                "len" => t.len = num as usize,
                "symbols" => t.symbols = num as usize,
                _ => {
                    return Some(Err(bad(
                        uri,
                        format!("unknown key '{k}' (synth://random takes n, seed, len, symbols)"),
                    )))
                }
            }
        }
        if t.n == 0 || t.len == 0 || !(1..=ALPHABET.len()).contains(&t.symbols) {
            return Some(Err(bad(
                uri,
                format!(
                    "need n >= 1, len >= 1 and symbols in 1..={}, got n {} len {} symbols {}",
                    ALPHABET.len(),
                    t.n,
                    t.len,
                    t.symbols
                ),
            )));
        }
        Some(Ok(t))
    }

    /// The records, as `input_output` records of one labelled segment.
    pub fn records(&self) -> Vec<Map<String, Json>> {
        let mut rng = rng_stream(self.seed, "synth/random", 0);
        (0..self.n)
            .filter_map(|_| {
                let text: String = (0..self.len)
                    .map(|_| {
                        format!(
                            " {}",
                            ALPHABET[super::uniform(&mut rng, self.symbols)] as char
                        )
                    })
                    .collect();
                match json!({"segments": [{"text": text, "label": true}]}) {
                    Json::Object(m) => Some(m),
                    _ => None,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_keys() {
        assert_eq!(
            ReverseTask::parse("synth://reverse").unwrap(),
            ReverseTask::default()
        );
        let t = ReverseTask::parse("synth://reverse?n=10&seed=3&symbols=5&min_len=2&max_len=4")
            .unwrap();
        assert_eq!(
            (t.n, t.seed, t.symbols, t.min_len, t.max_len),
            (10, 3, 5, 2, 4)
        );
        let e = ReverseTask::parse("synth://reverse?m=3").unwrap_err();
        assert_eq!(
            e.to_string(),
            "synth://reverse?m=3: unknown key 'm' (synth://reverse takes n, seed, min_len, max_len, symbols)"
        );
        let e = ReverseTask::parse("synth://sort?n=3").unwrap_err();
        assert_eq!(
            e.to_string(),
            "synth://sort?n=3: unknown synthetic task 'sort' (moeq has synth://reverse?n=N and synth://random?n=N&len=L)"
        );
    }

    #[test]
    fn records_are_unique_reversals() {
        let t = ReverseTask {
            n: 200,
            ..ReverseTask::default()
        };
        let recs = t.records("<e>");
        assert_eq!(recs.len(), 200);
        let first = &recs[0]["segments"];
        let prompt = first[0]["text"].as_str().unwrap();
        let answer = first[1]["text"].as_str().unwrap();
        let syms: Vec<&str> = prompt.trim_end_matches(':').split_whitespace().collect();
        let rev: Vec<&str> = answer.trim_end_matches("<e>").split_whitespace().collect();
        assert_eq!(syms.iter().rev().copied().collect::<Vec<_>>(), rev);
        let distinct: HashSet<String> = recs
            .iter()
            .map(|r| r["segments"][0]["text"].to_string())
            .collect();
        assert_eq!(distinct.len(), 200);
        assert_eq!(t.records("<e>"), recs, "same seed, same records");
    }

    /// The accuracy figures in the module documentation.
    #[test]
    fn documented_baselines() {
        let t = ReverseTask::default();
        let (mut format_only, mut targets) = (0.0, 0.0);
        for len in t.min_len..=t.max_len {
            let harmonic: f64 = (1..=len).map(|k| 1.0 / k as f64).sum();
            format_only += harmonic + 1.0;
            targets += (len + 1) as f64;
        }
        assert_eq!(format!("{:.1}", 100.0 * format_only / targets), "57.5");
        assert_eq!(format!("{:.1}", 100.0 / (t.symbols + 1) as f64), "9.1");
    }
}
