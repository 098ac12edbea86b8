//! `moeq generate`: text from a model (+ adapter) with a key/value cache (`Model::decode`):
//! greedy by default, or sampled with a temperature and nucleus (top-p) from a seeded stream;
//! stops at an end-of-sequence token (the tokenizer's and generation_config.json's) or after
//! `--max-new-tokens`. Prompts: `--prompt TEXT`, `--chat FILE` (messages through the model's chat
//! template with the generation prompt, as `apply_chat_template(..., add_generation_prompt=True)`),
//! or `--input FILE.jsonl` (lines of `input_ids`, `text` or `messages`). `--out` writes one JSON
//! line per prompt with `output_ids` (the new tokens) and `text`.

use super::eval::open_model;
use super::{CliError, QuantFlags};
use crate::arch::{LoraCtx, Model};
use crate::data::{ChatTemplate, TokenizerBundle};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout), or synth://…
    #[arg(long)]
    model: String,
    /// LoRA adapter directory (moeq's or PEFT's).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text (tokenized as the tokenizer does by itself).
    #[arg(long, group = "source")]
    prompt: Option<String>,
    /// A JSON file of chat messages (a list, or {"messages": [...]}), rendered by the model's
    /// chat template with the generation prompt.
    #[arg(long, group = "source")]
    chat: Option<PathBuf>,
    /// JSONL prompts: `{"input_ids": [...]}`, `{"text": ...}` or `{"messages": [...]}` per line.
    #[arg(long, group = "source")]
    input: Option<PathBuf>,
    /// New tokens at most per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Always the most likely token (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    greedy: bool,
    /// Sample with this temperature (> 0).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample from the smallest set of tokens whose probability reaches this (0 < p ≤ 1).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute dtype: `auto` (bf16 on a GPU, f32 on the CPU), `f32` or `bf16`.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Write one JSON line per prompt here (default: the text to stdout, or JSON lines for
    /// --input).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantFlags,
}

/// How the next token is chosen.
#[derive(Clone, Copy)]
enum Choice {
    Greedy,
    Sample { temperature: f64, top_p: f64 },
}

/// The token `choice` picks from `logits` [V].
fn pick(
    logits: &Tensor,
    choice: Choice,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<u32, CliError> {
    let v: Vec<f32> = logits.to_vec1().map_err(CliError::failed)?;
    // The first of equal maxima, as torch.argmax.
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    let Choice::Sample { temperature, top_p } = choice else {
        return Ok(argmax(&v));
    };
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = v
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // The nucleus: the most likely tokens until their mass reaches top_p (at least one).
    let mut mass = 0.0;
    let keep = probs
        .iter()
        .position(|p| {
            mass += p.1 / total;
            mass >= top_p
        })
        .map_or(probs.len(), |i| i + 1);
    let kept = &probs[..keep];
    let sum: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * sum;
    for &(i, p) in kept {
        if u < p {
            return Ok(i as u32);
        }
        u -= p;
    }
    Ok(kept[keep - 1].0 as u32)
}

/// End-of-sequence ids: the tokenizer's and those of generation_config.json.
fn eos_ids(dir: &Path, tok: &TokenizerBundle) -> Vec<u32> {
    let mut ids = vec![tok.eos.id];
    let file = dir.join("generation_config.json");
    if let Some(v) = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        match v.get("eos_token_id") {
            Some(Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            Some(x) => ids.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    ids
}

/// One prompt's ids from a JSON value: `input_ids`, `text` or `messages`.
fn prompt_ids(
    v: &Value,
    tok: &TokenizerBundle,
    template: &mut Option<ChatTemplate>,
    at: &str,
) -> Result<Vec<u32>, CliError> {
    let bad = |m: String| CliError::Input(format!("{at}: {m}"));
    if let Some(ids) = v.get("input_ids") {
        return ids
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| bad("'input_ids' must be a list of token ids".into()));
    }
    if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
        return Ok(tok.encode(t, true).map_err(|e| bad(e.to_string()))?.0);
    }
    if let Some(Value::Array(messages)) = v.get("messages") {
        if template.is_none() {
            let source = tok.chat_template.clone().ok_or_else(|| {
                bad(format!(
                    "'messages' need a chat template and the tokenizer ({}) has none",
                    tok.source.display()
                ))
            })?;
            *template = Some(
                ChatTemplate::compile(&source, &tok.source.display().to_string())
                    .map_err(CliError::input)?,
            );
        }
        let t = template
            .as_ref()
            .ok_or_else(|| CliError::Failed("chat template".into()))?;
        let rendered = t
            .render(messages, true, tok, &Default::default())
            .map_err(&bad)?;
        return Ok(tok
            .encode(&rendered.text, false)
            .map_err(|e| bad(e.to_string()))?
            .0);
    }
    Err(bad(
        "each prompt needs 'input_ids', 'text' or 'messages'".into()
    ))
}

/// New tokens after `prompt`, up to `max_new` or an end-of-sequence token (kept, as
/// transformers keeps it).
fn continue_prompt(
    model: &Model,
    ctx: &LoraCtx,
    prompt: &[u32],
    (max_new, choice, eos): (usize, Choice, &[u32]),
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Vec<u32>, CliError> {
    let mut cache = model.kv_cache();
    let mut logits = model
        .decode(prompt, &mut cache, ctx)
        .map_err(CliError::failed)?;
    let mut out = Vec::new();
    while out.len() < max_new {
        let next = pick(&logits, choice, rng)?;
        out.push(next);
        if eos.contains(&next) || out.len() == max_new {
            break;
        }
        logits = model
            .decode(&[next], &mut cache, ctx)
            .map_err(CliError::failed)?;
    }
    Ok(out)
}

pub fn run(args: GenerateArgs) -> Result<(), CliError> {
    let choice = match (args.greedy, args.temperature, args.top_p) {
        (_, Some(t), _) if !(t > 0.0 && t.is_finite()) => {
            return Err(CliError::Input(format!(
                "--temperature {t}: must be above 0 (or use --greedy)"
            )))
        }
        (_, _, Some(p)) if !(p > 0.0 && p <= 1.0) => {
            return Err(CliError::Input(format!("--top-p {p}: must be in (0, 1]")))
        }
        (_, None, None) | (true, _, _) => Choice::Greedy,
        (false, t, p) => Choice::Sample {
            temperature: t.unwrap_or(1.0),
            top_p: p.unwrap_or(1.0),
        },
    };
    if args.max_new_tokens == 0 {
        return Err(CliError::Input("--max-new-tokens 0: give 1 or more".into()));
    }
    let root = crate::synth::resolve_base_model(&args.model).map_err(CliError::input)?;
    let dir = crate::model_files::ModelDir::open(&root).map_err(CliError::input)?;
    let tok = TokenizerBundle::load(&root, None).map_err(CliError::input)?;
    let mut template = None;
    let (prompts, jsonl): (Vec<Vec<u32>>, bool) = match (&args.prompt, &args.chat, &args.input) {
        (Some(p), _, _) => (
            vec![prompt_ids(
                &json!({ "text": p }),
                &tok,
                &mut template,
                "--prompt",
            )?],
            false,
        ),
        (_, Some(f), _) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| CliError::Input(format!("{}: {e}", f.display())))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Input(format!("{}: not valid JSON: {e}", f.display())))?;
            let v = match v {
                Value::Array(_) => json!({ "messages": v }),
                other => other,
            };
            let at = f.display().to_string();
            (vec![prompt_ids(&v, &tok, &mut template, &at)?], false)
        }
        (_, _, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| CliError::Input(format!("{}: {e}", f.display())))?;
            let mut out = Vec::new();
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let at = format!("{}:{}", f.display(), i + 1);
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| CliError::Input(format!("{at}: not valid JSON: {e}")))?;
                out.push(prompt_ids(&v, &tok, &mut template, &at)?);
            }
            if out.is_empty() {
                return Err(CliError::Input(format!("{}: no prompts", f.display())));
            }
            (out, true)
        }
        _ => {
            return Err(CliError::Input(
                "give a prompt: --prompt TEXT, --chat FILE or --input FILE.jsonl".into(),
            ))
        }
    };
    if let Some((i, _)) = prompts.iter().enumerate().find(|(_, p)| p.is_empty()) {
        return Err(CliError::Input(format!("prompt {}: no tokens", i + 1)));
    }
    let vocab = dir.spec.vocab_size;
    if let Some(t) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(CliError::Input(format!(
            "token id {t} outside the vocabulary of {vocab}"
        )));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let positions = longest + args.max_new_tokens;
    let (model, adapters) = open_model(
        &dir,
        args.adapter.as_deref(),
        (&args.device, &args.dtype, &args.quant),
        positions,
    )?;
    let ctx = LoraCtx {
        adapters: &adapters,
        live: false,
        dropout: None,
    };
    let eos = eos_ids(&root, &tok);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let started = std::time::Instant::now();
    let mut lines = Vec::new();
    let mut generated = 0;
    for prompt in &prompts {
        let ids = continue_prompt(
            &model,
            &ctx,
            prompt,
            (args.max_new_tokens, choice, &eos),
            &mut rng,
        )?;
        generated += ids.len();
        let text = tok.tokenizer.decode(&ids, true).map_err(CliError::failed)?;
        lines.push((ids, text));
    }
    tracing::info!(
        "{generated} new tokens for {} prompt(s) in {:.1} s ({:.1} tokens/s, {:?} on {:?})",
        prompts.len(),
        started.elapsed().as_secs_f64(),
        generated as f64 / started.elapsed().as_secs_f64().max(1e-9),
        model.dtype,
        model.device
    );
    let json_lines: Vec<String> = lines
        .iter()
        .map(|(ids, text)| json!({ "output_ids": ids, "text": text }).to_string())
        .collect();
    match &args.out {
        Some(path) => {
            let tmp = path.with_extension("partial");
            let fail = |e: std::io::Error| CliError::Failed(format!("{}: {e}", path.display()));
            std::fs::write(&tmp, json_lines.join("\n") + "\n").map_err(fail)?;
            std::fs::rename(&tmp, path).map_err(fail)?;
        }
        None if jsonl => println!("{}", json_lines.join("\n")),
        None => println!("{}", lines[0].1),
    }
    Ok(())
}
