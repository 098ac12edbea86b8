//! `moeq train`: validate the config, resolve the base model, prepare the data, then train
//! (`train::trainer`) and write the PEFT adapter into `output_dir`.

use super::CliError;
use crate::checkpoint::{CheckpointError, ModelDir};
use crate::config::{TrainConfig, TINY_CPU_SOURCE, TINY_CPU_YAML};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training config (axolotl-style YAML). Default: the embedded configs/tiny-cpu.yaml.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: TrainArgs, log_level: Option<&str>) -> Result<(), CliError> {
    let outcome = match &args.config {
        Some(path) => TrainConfig::from_file(path),
        None => TrainConfig::from_yaml_str(TINY_CPU_YAML, TINY_CPU_SOURCE),
    }
    .map_err(CliError::input)?;
    let config = outcome.config;
    let env = crate::dist::resolve(&crate::dist::RankFlags::default(), &|k| {
        std::env::var(k).ok()
    })
    .map_err(CliError::input)?;
    // Started by a launcher (moeq-launch, torchrun, srun): join the job, even with one rank.
    let multi = env.source != crate::dist::EnvSource::Single;
    // Rank 0 keeps the run's log file; every rank logs to stderr with its rank.
    let log_file = config.output_dir.join("moeq.log");
    let _guard = crate::util::logging::init(crate::util::logging::LogSetup {
        level: log_level,
        rank: multi.then_some(env.rank),
        file: (env.rank == 0).then_some(log_file.as_path()),
    })
    .map_err(CliError::input)?;
    for w in &outcome.warnings {
        tracing::warn!("{w}");
    }
    let model_dir =
        crate::synth::resolve_base_model(&config.base_model).map_err(CliError::input)?;
    let mut dir = ModelDir::open(&model_dir).map_err(|e| match e {
        CheckpointError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    })?;
    if let Some(seed) = crate::synth::generated_seed(&config.base_model).map_err(CliError::input)? {
        tracing::info!("frozen weights are drawn at load time (init=device, seed {seed})");
        dir.generate_weights(seed);
    } else if !dir.has_weights() {
        return Err(CliError::Input(format!(
            "{}: no safetensors weights (model.safetensors or {}) to train from",
            model_dir.display(),
            crate::checkpoint::INDEX_FILE
        )));
    }
    tracing::info!(
        "config OK; base model {} ({}, {} layers)",
        model_dir.display(),
        dir.spec.model_type.as_str(),
        dir.spec.num_layers
    );
    crate::train::output::check_output_dir(
        &config.output_dir,
        crate::train::output::output_bytes_needed(&config, &dir.spec),
    )
    .map_err(CliError::Input)?;
    if config.sequence_len > dir.spec.max_position_embeddings {
        return Err(CliError::Input(format!(
            "sequence_len {} is beyond this model's max_position_embeddings {} ({}): lower sequence_len, or use a model configured for longer contexts",
            config.sequence_len,
            dir.spec.max_position_embeddings,
            model_dir.join("config.json").display()
        )));
    }
    let tok = crate::data::TokenizerBundle::load(&model_dir, config.tokenizer_config.as_deref())
        .map_err(CliError::input)?;
    // Ids past the embedding table would fail mid-run: the tokenizer must fit the model.
    let tok_vocab = tok.tokenizer.get_vocab_size(true);
    if tok_vocab > dir.spec.vocab_size {
        return Err(CliError::Input(format!(
            "the tokenizer has {tok_vocab} tokens (with added tokens) but the model's vocab_size is {}: the tokenizer does not belong to {} (set tokenizer_config to the model's tokenizer)",
            dir.spec.vocab_size,
            model_dir.display()
        )));
    }
    let data = crate::data::prepare(&config, &tok).map_err(CliError::input)?;
    for w in &data.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!("{}", data.stats.summary());
    let job = if multi {
        Some(crate::dist::job::Job::join(&env).map_err(CliError::failed)?)
    } else {
        None
    };
    let ctx = match &job {
        Some(j) => j.rank_ctx(&config).map_err(CliError::failed)?,
        None => crate::train::trainer::RankCtx::solo(),
    };
    let result = crate::train::trainer::train_ranks(&config, &dir, &data, tok.pad.id, &ctx);
    match &result {
        // The other ranks stop with this as the cause instead of waiting for a timeout.
        Err(e) => ctx.comm.abort(&e.to_string()),
        Ok(_) => ctx.comm.finish(),
    }
    drop(ctx);
    if let Some(j) = job {
        j.finish();
    }
    let summary = result.map_err(|e| match e {
        crate::train::trainer::TrainError::Input(m) => CliError::Input(m),
        crate::train::trainer::TrainError::Failed(m) => CliError::Failed(m),
    })?;
    if env.rank != 0 {
        return Ok(());
    }
    let mut line = format!(
        "trained {} steps in {:.1} s: loss {:.4} -> {:.4}",
        summary.steps, summary.seconds, summary.first_loss, summary.last_loss
    );
    if let Some(e) = summary.eval {
        line += &format!(
            "; validation loss {:.4}, token accuracy {:.1}%",
            e.loss,
            100.0 * e.accuracy
        );
    }
    tracing::info!("{line}; adapter in {}", summary.adapter_dir.display());
    Ok(())
}
