//! `datasets:` → train and validation samples.
//!
//! Per dataset: find its files (or synthesize it), read records, format them
//! by `type`, check that something is trained, truncate to `sequence_len`.
//! A bad record stops the run with its `file:line`, or, with
//! `skip_bad_samples: true`, is skipped and counted in a warning: never
//! dropped silently. Datasets are concatenated in config order, then
//! `val_set_size` samples are held out by a seeded draw.

use super::cache;
use super::chat::ChatFormat;
use super::error::{DataError, Location, RecordProblem};
use super::formats;
use super::pack::{pack_rows, PackingStats};
use super::source::{dataset_files, read_records};
use super::synth_task::{RandomTask, ReverseTask};
use super::template::{ChatTemplate, CHATML, NAMED_TEMPLATES};
use super::tokenizer::TokenizerBundle;
use super::{permutation, rng_stream, Sample};
use crate::config::{DatasetConfig, DatasetType, TrainConfig, ValSetSize};
use crate::util::progress::Progress;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// Counts for one `datasets:` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    pub path: String,
    pub records: usize,
    pub samples: usize,
    pub tokens: usize,
    pub truncated: usize,
    pub skipped_bad: usize,
}

/// What prepare() did, for the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub datasets: Vec<DatasetStats>,
    pub train_samples: usize,
    pub val_samples: usize,
    pub train_tokens: usize,
    /// Train positions with a label (what the loss averages over).
    pub train_targets: usize,
    pub truncated: usize,
    pub skipped_bad: usize,
    /// Packing of the first epoch's order, when `sample_packing` is on.
    pub packing: Option<PackingStats>,
    pub from_cache: bool,
}

impl DataStats {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "data: {} train samples ({} tokens, {} trained), {} validation, {} truncated to sequence_len, {} skipped as bad",
            self.train_samples,
            self.train_tokens,
            self.train_targets,
            self.val_samples,
            self.truncated,
            self.skipped_bad
        );
        if let Some(p) = &self.packing {
            s += &format!(
                ", packed {:.2} samples per sequence into {} sequences ({:.1}% full)",
                p.ratio,
                p.rows,
                100.0 * p.fill
            );
        }
        if self.from_cache {
            s += " (from cache)";
        }
        s
    }
}

pub struct PreparedData {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub stats: DataStats,
    /// One line each (skipped records, truncation) for the caller to log.
    pub warnings: Vec<String>,
}

/// Tokenizes every dataset of `config`.
pub fn prepare(config: &TrainConfig, tok: &TokenizerBundle) -> Result<PreparedData, DataError> {
    let built = build_all(config, tok)?;
    finish(config, built, false)
}

/// The samples of `config` as `train` takes them: [`prepare_cached`] in `dataset_prepared_path`
/// when it is set (reused while the datasets, tokenizer and settings are unchanged), else
/// [`prepare`].
pub fn prepare_configured(
    config: &TrainConfig,
    tok: &TokenizerBundle,
) -> Result<PreparedData, DataError> {
    match &config.dataset_prepared_path {
        Some(dir) => prepare_cached(config, tok, dir),
        None => prepare(config, tok),
    }
}

/// Like [`prepare`], reusing the samples of an earlier run with the same
/// datasets (file contents), tokenizer and settings from `cache_dir`.
pub fn prepare_cached(
    config: &TrainConfig,
    tok: &TokenizerBundle,
    cache_dir: &Path,
) -> Result<PreparedData, DataError> {
    let key = cache::key(config, tok)?;
    let file = cache_dir.join(format!("data-{}.bin", &key[..24]));
    if let Some(built) = cache::load(&file) {
        return finish(config, built, true);
    }
    let built = build_all(config, tok)?;
    let mut out = finish(config, built.clone(), false)?;
    if let Err(e) = cache::store(&file, &built) {
        out.warnings.push(format!("data cache not written: {e}"));
    }
    Ok(out)
}

/// Each of `eot_tokens` must be one token of the tokenizer: a turn's end is matched as text,
/// and a text the tokenizer splits would mark pieces of other tokens.
fn check_eot_tokens(config: &TrainConfig, tok: &TokenizerBundle) -> Result<(), DataError> {
    for text in config.eot_tokens.iter().flatten() {
        let n = tok.encode_plain(text)?.len();
        if n != 1 {
            return Err(DataError::Tokenizer {
                path: tok.source.display().to_string(),
                problem: format!(
                    "eot_tokens: '{text}' is {n} tokens of this tokenizer, not one (list the end-of-turn token as the tokenizer spells it, or remove it)"
                ),
            });
        }
    }
    Ok(())
}

/// Samples of all datasets, before the validation split.
#[derive(Clone)]
pub(crate) struct Built {
    pub samples: Vec<Sample>,
    pub datasets: Vec<DatasetStats>,
    pub warnings: Vec<String>,
}

fn build_all(config: &TrainConfig, tok: &TokenizerBundle) -> Result<Built, DataError> {
    check_eot_tokens(config, tok)?;
    let mut built = Built {
        samples: Vec::new(),
        datasets: Vec::new(),
        warnings: Vec::new(),
    };
    for (i, ds) in config.datasets.iter().enumerate() {
        build_dataset(i, ds, config, tok, &mut built)?;
    }
    Ok(built)
}

enum Format {
    Completion,
    Alpaca,
    InputOutput,
    Pretokenized,
    Chat(Box<ChatTemplate>),
}

/// The template a chat_template dataset uses: its own, else the top-level
/// one, else the tokenizer's.
fn resolve_template(
    i: usize,
    ds: &DatasetConfig,
    config: &TrainConfig,
    tok: &TokenizerBundle,
) -> Result<ChatTemplate, DataError> {
    let (source, origin) = template_source(i, ds, config, tok)?;
    ChatTemplate::compile(&source, &origin)
}

/// The Jinja source of dataset `i`'s template and where it was chosen. A
/// value is a name (`tokenizer_default`, `chatml`), Jinja source, or a path
/// to a .jinja file (read here, so the cache keys on its text).
pub(crate) fn template_source(
    i: usize,
    ds: &DatasetConfig,
    config: &TrainConfig,
    tok: &TokenizerBundle,
) -> Result<(String, String), DataError> {
    let (choice, origin) = match (&ds.chat_template, &config.chat_template) {
        (Some(t), _) => (Some(t.as_str()), format!("datasets[{i}].chat_template")),
        (None, Some(t)) => (Some(t.as_str()), "chat_template".to_string()),
        (None, None) => (None, tok.source.display().to_string()),
    };
    let from_tokenizer = || {
        tok.chat_template.clone().ok_or_else(|| DataError::ChatTemplate {
            origin: format!("datasets[{i}]"),
            problem: format!(
                "type chat_template needs a chat template and the tokenizer ({}) has none; set chat_template to chatml, Jinja source or a .jinja file",
                tok.source.display()
            ),
        })
    };
    let named = |t: &str| {
        NAMED_TEMPLATES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(_, src)| src.to_string())
    };
    let source = match choice {
        None | Some("tokenizer_default") => from_tokenizer()?,
        Some("chatml") => CHATML.to_string(),
        Some(t) if named(t).is_some() => named(t).unwrap_or_default(),
        Some(t) if t.contains("{{") || t.contains("{%") => t.to_string(),
        Some(t) if Path::new(t).is_file() => {
            std::fs::read_to_string(t).map_err(|e| DataError::Read {
                path: t.to_string(),
                reason: e.to_string(),
            })?
        }
        Some(t) => {
            return Err(DataError::ChatTemplate {
                origin,
                problem: format!(
                    "unknown chat template '{t}' (use tokenizer_default, chatml, {}, Jinja source, or the path of a .jinja file)",
                    NAMED_TEMPLATES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ),
            })
        }
    };
    Ok((source, origin))
}

fn build_dataset(
    i: usize,
    ds: &DatasetConfig,
    config: &TrainConfig,
    tok: &TokenizerBundle,
    built: &mut Built,
) -> Result<(), DataError> {
    let format = match ds.ds_type {
        DatasetType::Completion => Format::Completion,
        DatasetType::Alpaca => Format::Alpaca,
        DatasetType::InputOutput => Format::InputOutput,
        DatasetType::Pretokenized => Format::Pretokenized,
        DatasetType::ChatTemplate => Format::Chat(Box::new(resolve_template(i, ds, config, tok)?)),
    };
    let chat = match &format {
        Format::Chat(t) => Some(ChatFormat {
            template: t,
            tok,
            ds,
            train_on_inputs: config.train_on_inputs,
            eot_tokens: config.eot_tokens.as_deref(),
        }),
        _ => None,
    };
    if let Some(w) = chat.as_ref().and_then(ChatFormat::ignored_settings_warning) {
        built.warnings.push(w);
    }
    let format_one = |fields: &Map<String, Json>| match &format {
        Format::Completion => formats::completion(tok, fields, &ds.field),
        Format::Alpaca => formats::alpaca(tok, fields, config.train_on_inputs),
        Format::InputOutput => formats::input_output(tok, fields),
        Format::Pretokenized => {
            formats::pretokenized(fields, tok.tokenizer.get_vocab_size(true), i)
        }
        Format::Chat(_) => chat
            .as_ref()
            .map_or(Err(RecordProblem::EmptyAfterMasking), |c| c.sample(fields)),
    };
    let mut stats = DatasetStats {
        path: ds.path.clone(),
        ..DatasetStats::default()
    };
    let mut first_bad: Option<String> = None;
    let mut take = |at: Location, fields: Result<Map<String, Json>, RecordProblem>| {
        stats.records += 1;
        let result = fields
            .and_then(|f| format_one(&f))
            .and_then(|s| fit(s, config.sequence_len));
        match result {
            Ok((s, cut)) => {
                stats.truncated += usize::from(cut);
                stats.samples += 1;
                stats.tokens += s.len();
                built.samples.push(s);
                Ok(())
            }
            Err(problem) if config.skip_bad_samples => {
                stats.skipped_bad += 1;
                first_bad.get_or_insert_with(|| at.error(problem).to_string());
                Ok(())
            }
            Err(problem) => Err(at.error(problem)),
        }
    };
    if ds.path.starts_with("synth://") {
        let records = match RandomTask::parse(&ds.path) {
            Some(task) => task?.records(),
            None => ReverseTask::parse(&ds.path)?.records(&tok.eos.text),
        };
        if ds.ds_type != DatasetType::InputOutput {
            return Err(DataError::Synth {
                uri: ds.path.clone(),
                problem: format!(
                    "synthetic tasks make input_output records; set datasets[{i}].type to input_output (it is {})",
                    ds.ds_type
                ),
            });
        }
        for (k, r) in records.into_iter().enumerate() {
            let at = Location {
                file: ds.path.clone(),
                line: k + 1,
            };
            take(at, Ok(r))?;
        }
    } else {
        let files = dataset_files(i, ds)?;
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let progress = Progress::new(total, &format!("tokenizing {}", ds.path));
        for file in &files {
            let records = read_records(file)?;
            let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            let per = size / records.len().max(1) as u64;
            for r in records {
                take(r.at, r.fields)?;
                progress.inc(per);
            }
        }
        progress.finish();
    }
    if stats.records == 0 {
        return Err(DataError::EmptyDataset {
            path: ds.path.clone(),
        });
    }
    if let Some(first) = first_bad {
        if stats.samples == 0 {
            return Err(DataError::AllSkipped {
                path: ds.path.clone(),
                skipped: stats.skipped_bad,
                first,
            });
        }
        built.warnings.push(format!(
            "{}: skipped {} of {} records as bad (skip_bad_samples: true); first: {first}",
            ds.path, stats.skipped_bad, stats.records
        ));
    }
    if stats.truncated > 0 {
        built.warnings.push(format!(
            "{}: truncated {} of {} samples to sequence_len {}",
            ds.path, stats.truncated, stats.samples, config.sequence_len
        ));
    }
    built.datasets.push(stats);
    Ok(())
}

/// Checks that something is trained, truncates to `sequence_len`; returns
/// the sample and whether it was cut.
fn fit(mut s: Sample, sequence_len: usize) -> Result<(Sample, bool), RecordProblem> {
    if s.num_targets() == 0 {
        return Err(RecordProblem::EmptyAfterMasking);
    }
    let cut = s.len() > sequence_len;
    if cut {
        s.input_ids.truncate(sequence_len);
        s.labels.truncate(sequence_len);
        if s.num_targets() == 0 {
            return Err(RecordProblem::NothingTrainedAfterTruncation { sequence_len });
        }
    }
    Ok((s, cut))
}

/// Validation split and statistics.
fn finish(config: &TrainConfig, built: Built, from_cache: bool) -> Result<PreparedData, DataError> {
    let n = built.samples.len();
    let k = match config.val_set_size {
        ValSetSize::Fraction(f) => (f * n as f64).ceil() as usize,
        ValSetSize::Count(c) => c,
    };
    if k >= n && k > 0 {
        return Err(DataError::ValSplit {
            problem: format!(
                "holding out {k} of {n} samples leaves none to train on; lower val_set_size"
            ),
        });
    }
    let mut held = vec![false; n];
    for i in permutation(n, &mut rng_stream(config.seed, "val-split", 0))
        .into_iter()
        .take(k)
    {
        held[i] = true;
    }
    let (mut train, mut val) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (s, h) in built.samples.into_iter().zip(held) {
        if h {
            val.push(s);
        } else {
            train.push(s);
        }
    }
    let lens: Vec<usize> = train.iter().map(Sample::len).collect();
    let packing = config.sample_packing.then(|| {
        let order = permutation(lens.len(), &mut rng_stream(config.seed, "order", 0));
        PackingStats::of(
            &pack_rows(&order, &lens, config.sequence_len),
            &lens,
            config.sequence_len,
        )
    });
    let stats = DataStats {
        train_samples: train.len(),
        val_samples: val.len(),
        train_tokens: lens.iter().sum(),
        train_targets: train.iter().map(Sample::num_targets).sum(),
        truncated: built.datasets.iter().map(|d| d.truncated).sum(),
        skipped_bad: built.datasets.iter().map(|d| d.skipped_bad).sum(),
        datasets: built.datasets,
        packing,
        from_cache,
    };
    for w in &built.warnings {
        tracing::warn!("{w}");
    }
    Ok(PreparedData {
        train,
        val,
        stats,
        warnings: built.warnings,
    })
}
