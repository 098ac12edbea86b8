//! `moeq train`: validate the config, resolve the base model, prepare the data, then train. The trainer itself
//! arrives with the trainer work; until then this command stops with a clear error after the
//! checks it can already do, and never pretends to train.

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
    let log_file = config.output_dir.join("moeq.log");
    let _guard = crate::util::logging::init(crate::util::logging::LogSetup {
        level: log_level,
        rank: None,
        file: Some(&log_file),
    })
    .map_err(CliError::input)?;
    for w in &outcome.warnings {
        tracing::warn!("{w}");
    }
    let model_dir =
        crate::synth::resolve_base_model(&config.base_model).map_err(CliError::input)?;
    let dir = ModelDir::open(&model_dir).map_err(|e| match e {
        CheckpointError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    })?;
    if !dir.has_weights() {
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
    let tok = crate::data::TokenizerBundle::load(&model_dir, config.tokenizer_config.as_deref())
        .map_err(CliError::input)?;
    let data = crate::data::prepare(&config, &tok).map_err(CliError::input)?;
    for w in &data.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!("{}", data.stats.summary());
    Err(CliError::Failed(
        "moeq train: the trainer is not built yet (config, base model and data were checked; no training was done)".into(),
    ))
}
