//! `moeq preprocess`: the data pipeline exactly as `train` runs it (formats, chat templates,
//! label masks, truncation, the validation split, packing statistics) without loading any
//! weights; prints the statistics, writes the samples as JSONL (`--out`) and shows samples with
//! their trained tokens marked (`--show N`), as axolotl's `preprocess --debug` does. With
//! `dataset_prepared_path` the tokenized samples are kept there for `train` to reuse.

use super::CliError;
use crate::config::{TrainConfig, TINY_CPU_SOURCE, TINY_CPU_YAML};
use crate::data::{Sample, TokenizerBundle, IGNORE_INDEX};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct PreprocessArgs {
    /// Training config (axolotl-style YAML). Default: the embedded configs/tiny-cpu.yaml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write every sample as one JSON line: {"split", "input_ids", "labels"} (labels -100
    /// where a token is not trained), the training split first.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print this many training samples with the trained tokens marked.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

pub fn run(args: PreprocessArgs) -> Result<(), CliError> {
    let outcome = match &args.config {
        Some(path) => TrainConfig::from_file(path),
        None => TrainConfig::from_yaml_str(TINY_CPU_YAML, TINY_CPU_SOURCE),
    }
    .map_err(CliError::input)?;
    for w in &outcome.warnings {
        tracing::warn!("{w}");
    }
    let config = outcome.config;
    if let Some(out) = &args.out {
        check_out(out)?;
    }
    let model_dir =
        crate::synth::resolve_base_model(&config.base_model).map_err(CliError::input)?;
    let tok = TokenizerBundle::load(&model_dir, config.tokenizer_config.as_deref())
        .map_err(CliError::input)?;
    // What train refuses, preprocess reports and goes on: the data can still be looked at.
    if let Ok(dir) = crate::model_files::ModelDir::open(&model_dir) {
        let tok_vocab = tok.tokenizer.get_vocab_size(true);
        if tok_vocab > dir.spec.vocab_size {
            tracing::warn!(
                "the tokenizer has {tok_vocab} tokens (with added tokens) but the model's vocab_size is {}: train will refuse this pair (set tokenizer_config to the model's tokenizer)",
                dir.spec.vocab_size
            );
        }
    }
    let data = crate::data::prepare_configured(&config, &tok).map_err(CliError::input)?;
    for w in &data.warnings {
        tracing::warn!("{w}");
    }
    println!("{}", data.stats.summary());
    if args.show > 0 {
        show(&tok, &data.train, args.show)?;
    }
    if let Some(out) = &args.out {
        write_jsonl(out, &data.train, &data.val)?;
        println!(
            "wrote {} samples to {}",
            data.train.len() + data.val.len(),
            out.display()
        );
    }
    Ok(())
}

/// `--out` must name a file in an existing folder, not a folder.
fn check_out(out: &Path) -> Result<(), CliError> {
    if out.is_dir() {
        return Err(CliError::Input(format!(
            "--out {}: is a folder; name the JSONL file to write",
            out.display()
        )));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        if !p.is_dir() {
            return Err(CliError::Input(format!(
                "--out {}: the folder {} does not exist; create it or write elsewhere",
                out.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// The samples as JSON lines, written beside `out` and renamed onto it once complete (a failed
/// run leaves no partial file).
fn write_jsonl(out: &Path, train: &[Sample], val: &[Sample]) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::Failed(format!("writing {}: {e}", out.display()));
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("samples");
    let tmp = out.with_file_name(format!(".{name}.partial"));
    let file = std::fs::File::create(&tmp).map_err(fail)?;
    let mut w = std::io::BufWriter::new(file);
    for (split, samples) in [("train", train), ("validation", val)] {
        for s in samples {
            let line = serde_json::json!({
                "split": split,
                "input_ids": s.input_ids,
                "labels": s.labels,
            });
            writeln!(w, "{line}").map_err(fail)?;
        }
    }
    w.flush().map_err(fail)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(fail)
}

/// The first `n` samples, each token's text with the trained ones marked: green on a
/// terminal, else between ⟦ and ⟧.
fn show(tok: &TokenizerBundle, samples: &[Sample], n: usize) -> Result<(), CliError> {
    let colour = std::io::stdout().is_terminal();
    if !colour {
        println!("(trained tokens between ⟦ and ⟧)");
    }
    for (i, s) in samples.iter().take(n).enumerate() {
        let trained = s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        println!(
            "--- sample {i}: {} tokens, {trained} trained",
            s.input_ids.len()
        );
        println!("{}", marked(tok, s, colour)?);
    }
    Ok(())
}

/// One sample's text, token by token, runs of trained tokens marked.
fn marked(tok: &TokenizerBundle, s: &Sample, colour: bool) -> Result<String, CliError> {
    let (open, close) = if colour {
        ("\x1b[32m", "\x1b[0m")
    } else {
        ("⟦", "⟧")
    };
    let mut text = String::new();
    let mut inside = false;
    for (&id, &label) in s.input_ids.iter().zip(&s.labels) {
        let trained = label != IGNORE_INDEX;
        if trained != inside {
            text += if trained { open } else { close };
            inside = trained;
        }
        text += &tok
            .tokenizer
            .decode(&[id], false)
            .map_err(|e| CliError::Failed(format!("decoding token {id}: {e}")))?;
    }
    if inside {
        text += close;
    }
    Ok(text)
}
