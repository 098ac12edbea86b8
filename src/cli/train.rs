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
    let summary =
        crate::train::trainer::train(&config, &dir, &data, tok.pad.id).map_err(|e| match e {
            crate::train::trainer::TrainError::Input(m) => CliError::Input(m),
            crate::train::trainer::TrainError::Failed(m) => CliError::Failed(m),
        })?;
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
