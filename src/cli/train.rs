//! `moeq train`: read the config and this process's place in the job, set up logging, run
//! (`train::run`: the model, the data, the loop, the PEFT adapter in `output_dir`) and print
//! the summary.

use super::CliError;
use crate::config::{TrainConfig, TINY_CPU_SOURCE, TINY_CPU_YAML};
use crate::distributed::{resolve, EnvSource, RankFlags};
use crate::train::TrainError;
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
    let env =
        resolve(&RankFlags::default(), &|k| std::env::var(k).ok()).map_err(CliError::input)?;
    let multi = env.source != EnvSource::Single;
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
    let summary = crate::train::run(&config, &env).map_err(|e| match e {
        TrainError::Input(m) => CliError::Input(m),
        TrainError::Failed(m) => CliError::Failed(m),
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
