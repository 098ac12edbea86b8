//! The training loop, on every rank of `ctx`: data parallel over the ranks (each its own
//! micro-batches), experts spread over them (each rank loads, quantizes and trains the
//! adapters of its own experts; tokens travel to them), replicated adapters' gradients summed
//! over the ranks. Rank 0 writes metrics and adapters. With one rank this is the
//! single-process trainer.
//!
//! The parts: `build` (model, data, optimizer, resume point), `optimizer_step` (micro-batches,
//! gradient reduction, norm, skip/clip, AdamW), `report` (metrics, evaluation, checkpoints).

use super::build::Run;
use super::error::{failed, TrainError};
use super::ranks::whole_adapter;
use super::report::Report;
use crate::config::TrainConfig;
use crate::data::PreparedData;
use crate::distributed::store::WATCH;
use crate::distributed::RankCtx;
use crate::model_files::ModelDir;
use crate::util::phases;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval: Option<EvalResult>,
    pub seconds: f64,
    pub adapter_dir: PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    pub tokens: usize,
}

/// Trains `config` on the opened base model `dir` with prepared data, on this rank of `ctx`.
pub fn train_ranks(
    config: &TrainConfig,
    dir: &ModelDir,
    data: &PreparedData,
    pad_id: u32,
    ctx: &RankCtx,
) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let mut run = Run::build(config, dir, data, pad_id, ctx)?;
    let mut report = Report::open(&run, started)?;
    let nan_steps = injected_nonfinite_steps()?;
    // Every rank has loaded before the clocks start; the first step may include warm-up.
    run.comm.barrier().map_err(failed)?;
    WATCH.limit(Duration::from_secs(config.collective_timeout_s.max(300)));
    report.start(run.start_step);
    for step in run.start_step..run.total_steps {
        let r = run.optimizer_step(step, nan_steps.contains(&(step + 1)))?;
        match r.lr {
            None => report.skipped(&run, step, &r)?,
            Some(lr) => {
                report.updated(&run, step, &r, lr)?;
                report.evaluate_if_due(&run, step + 1)?;
                report.save_if_due(&run, step + 1)?;
            }
        }
    }
    report.finish();
    if let Some(r) = phases::report(run.total_steps - run.start_step - 1) {
        tracing::info!("{r}");
    }
    if let Some(r) = phases::memory_report() {
        tracing::info!("{r}");
    }
    let full = whole_adapter(&run.adapters, run.ep.then(|| run.experts.group.as_ref()))?;
    if run.rank == 0 {
        super::output::save_final_adapter(config, full.as_ref().unwrap_or(&run.adapters))?;
        // The curves are a convenience: a plot that cannot be drawn costs a warning, not the run.
        match super::plot::plot_run(&config.output_dir, None) {
            Ok(path) => tracing::info!("curves in {}", path.display()),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    run.comm.barrier().map_err(failed)?;
    Ok(Summary {
        steps: run.total_steps,
        first_loss: report.first_loss.unwrap_or(0.0),
        last_loss: report.last_loss,
        eval: report.last_eval,
        seconds: started.elapsed().as_secs_f64(),
        adapter_dir: config.output_dir.clone(),
    })
}

/// Fault injection for tests of the numerics guard: `MOEQ_INJECT_NONFINITE=3,5` makes steps
/// 3 and 5 (1-based) report a NaN loss, as an overflow would.
fn injected_nonfinite_steps() -> Result<Vec<usize>, TrainError> {
    let Ok(v) = std::env::var("MOEQ_INJECT_NONFINITE") else {
        return Ok(Vec::new());
    };
    v.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim().parse().map_err(|_| {
                TrainError::Input(format!(
                    "MOEQ_INJECT_NONFINITE='{v}': expected step numbers like 3,5"
                ))
            })
        })
        .collect()
}
