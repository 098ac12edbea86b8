//! A training run from a validated config: resolve and open the base model, check it against
//! the config and the output directory, load the tokenizer and prepare the data, join the job
//! when a launcher started this process, train (`trainer`), and leave the job.

use super::error::TrainError;
use super::output::{check_output_dir, output_bytes_needed};
use super::trainer::{train_ranks, Summary};
use crate::config::TrainConfig;
use crate::data::{prepare_configured, PreparedData, TokenizerBundle};
use crate::distributed::job::Job;
use crate::distributed::{DistEnv, EnvSource, RankCtx};
use crate::model_files::{ModelDir, ModelFilesError, INDEX_FILE};
use crate::synth::{generated_seed, resolve_base_model};
use std::path::Path;

/// Trains `config` as this process of the job `env` describes (one process when no launcher
/// started it). Every rank returns the same summary; rank 0 has written the adapter.
pub fn run(config: &TrainConfig, env: &DistEnv) -> Result<Summary, TrainError> {
    let input = |e: String| TrainError::Input(e);
    let model_dir = resolve_base_model(&config.base_model).map_err(|e| input(e.to_string()))?;
    let dir = open_model(config, &model_dir)?;
    check_output_dir(&config.output_dir, output_bytes_needed(config, &dir.spec)).map_err(input)?;
    if config.sequence_len > dir.spec.max_position_embeddings {
        return Err(input(format!(
            "sequence_len {} is beyond this model's max_position_embeddings {} ({}): lower sequence_len, or use a model configured for longer contexts",
            config.sequence_len,
            dir.spec.max_position_embeddings,
            model_dir.join("config.json").display()
        )));
    }
    let (data, pad_id) = prepare_data(config, &dir, &model_dir)?;
    // Started by a launcher (moeq-launch, torchrun, srun): join the job, even with one rank.
    let job = if env.source != EnvSource::Single {
        Some(Job::join(env).map_err(TrainError::Failed)?)
    } else {
        None
    };
    let ctx = match &job {
        Some(j) => j.rank_ctx(&config.device).map_err(TrainError::Failed)?,
        None => RankCtx::solo(),
    };
    let result = train_ranks(config, &dir, &data, pad_id, &ctx);
    match &result {
        // The other ranks stop with this as the cause instead of waiting for a timeout.
        Err(e) => ctx.comm.abort(&e.to_string()),
        Ok(_) => ctx.comm.finish(),
    }
    drop(ctx);
    if let Some(j) = job {
        j.finish();
    }
    result
}

/// The base model's directory, opened, with weights to train from (or drawn at load time).
fn open_model(config: &TrainConfig, model_dir: &Path) -> Result<ModelDir, TrainError> {
    let mut dir = ModelDir::open(model_dir).map_err(|e| match e {
        ModelFilesError::Io { .. } => TrainError::Failed(e.to_string()),
        other => TrainError::Input(other.to_string()),
    })?;
    if !config.model_config.is_empty() {
        let taken = dir
            .apply_overrides(&config.model_config)
            .map_err(TrainError::Input)?;
        if !taken.is_empty() {
            tracing::info!("model_config overrides config.json: {}", taken.join(", "));
        }
    }
    let seed = generated_seed(&config.base_model).map_err(|e| TrainError::Input(e.to_string()))?;
    if let Some(seed) = seed {
        tracing::info!("frozen weights are drawn at load time (init=device, seed {seed})");
        dir.generate_weights(seed);
    } else if !dir.has_weights() {
        return Err(TrainError::Input(format!(
            "{}: no safetensors weights (model.safetensors or {INDEX_FILE}) to train from",
            model_dir.display(),
        )));
    }
    tracing::info!(
        "config OK; base model {} ({}, {} layers)",
        model_dir.display(),
        dir.spec.model_type.as_str(),
        dir.spec.num_layers
    );
    Ok(dir)
}

/// The tokenizer (checked against the model's vocabulary) and the prepared data; the pad id.
fn prepare_data(
    config: &TrainConfig,
    dir: &ModelDir,
    model_dir: &Path,
) -> Result<(PreparedData, u32), TrainError> {
    let input = |e: String| TrainError::Input(e);
    let tok = TokenizerBundle::load(model_dir, config.tokenizer_config.as_deref())
        .map_err(|e| input(e.to_string()))?;
    // Ids past the embedding table would fail mid-run: the tokenizer must fit the model.
    let tok_vocab = tok.tokenizer.get_vocab_size(true);
    if tok_vocab > dir.spec.vocab_size {
        return Err(input(format!(
            "the tokenizer has {tok_vocab} tokens (with added tokens) but the model's vocab_size is {}: the tokenizer does not belong to {} (set tokenizer_config to the model's tokenizer)",
            dir.spec.vocab_size,
            model_dir.display()
        )));
    }
    let data = prepare_configured(config, &tok).map_err(|e| input(e.to_string()))?;
    for w in &data.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!("{}", data.stats.summary());
    Ok((data, tok.pad.id))
}
