//! What a run reports after each optimizer step: the progress bar, the log line and
//! `metrics.jsonl` record every `logging_steps`, validation every `eval_steps`, checkpoints
//! every `save_steps`, and the rule that stops a run after too many skipped steps.

use super::build::Run;
use super::error::{failed, TrainError};
use super::metrics::{flops_per_token, peak_flops, Metrics};
use super::optimizer_step::StepResult;
use super::ranks::sum_over_ranks;
use super::step::{evaluate, EvalStats};
use super::{checkpoint, EvalResult};
use crate::arch::Model;
use crate::data::{Loader, LoaderOptions, Sample};
use crate::distributed::store::WATCH;
use crate::lora::Adapters;
use crate::util::{logging, mem, progress};
use serde_json::json;
use std::time::Instant;

/// Loss and accuracy of `samples` on this rank.
pub fn eval_set(
    model: &Model,
    adapters: &Adapters,
    samples: &[Sample],
    opts: &LoaderOptions,
) -> Result<EvalResult, TrainError> {
    let mut loader =
        Loader::new(samples.to_vec(), opts.for_eval()).map_err(|e| failed(e.to_string()))?;
    let mut total = EvalStats::default();
    for _ in 0..loader.steps_per_epoch() {
        let batch = loader.next_batch();
        let s = evaluate(model, adapters, &batch).map_err(failed)?;
        WATCH.progress();
        total.loss_sum += s.loss_sum;
        total.labelled += s.labelled;
        total.correct += s.correct;
    }
    let n = total.labelled.max(1) as f64;
    Ok(EvalResult {
        loss: total.loss_sum / n,
        accuracy: total.correct as f64 / n,
        tokens: total.labelled,
    })
}

/// The reporting state of a run (the lead rank writes; every rank takes part in evaluation
/// and checkpoints).
pub(crate) struct Report {
    metrics: Option<Metrics>,
    progress: progress::Steps,
    flops_per_token: f64,
    peak_flops: Option<f64>,
    started: Instant,
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub last_eval: Option<EvalResult>,
    skipped: usize,
    consecutive_skips: usize,
    /// Steps since the last log line: summed mean losses, steps, tokens, start time.
    window: (f64, usize, usize, Instant),
    /// Steps and tokens since the loop started, for the bar's rates.
    run_rate: (u64, u64, Instant),
}

impl Report {
    /// Opens the output directory, the run's log file and `metrics.jsonl` (on the lead rank).
    pub fn open(run: &Run, started: Instant) -> Result<Report, TrainError> {
        let config = run.config;
        let lead = run.rank == 0;
        let metrics = if lead {
            std::fs::create_dir_all(&config.output_dir).map_err(|e| {
                TrainError::Input(format!(
                    "output_dir {}: cannot create it: {e} (choose a writable output_dir)",
                    config.output_dir.display()
                ))
            })?;
            logging::open_log_file().map_err(TrainError::Input)?;
            Some(Metrics::create(&config.output_dir, run.start_step)?)
        } else {
            None
        };
        let progress = progress::Steps::new(if lead { run.total_steps as u64 } else { 0 }, "train");
        Ok(Report {
            metrics,
            progress,
            flops_per_token: flops_per_token(run.spec, config.sequence_len),
            peak_flops: peak_flops(&run.device),
            started,
            first_loss: None,
            last_loss: 0.0,
            last_eval: None,
            skipped: 0,
            consecutive_skips: 0,
            window: (0.0, 0, 0, Instant::now()),
            run_rate: (0, 0, Instant::now()),
        })
    }

    pub fn start(&self, step: usize) {
        self.progress.set(step as u64, "");
    }

    pub fn finish(&self) {
        self.progress.finish();
    }

    /// A skipped step: logged and recorded; after `max_consecutive_skipped_steps` in a row the
    /// last good state is saved and the run stops with an error.
    pub fn skipped(&mut self, run: &Run, step: usize, r: &StepResult) -> Result<(), TrainError> {
        let config = run.config;
        let done = step + 1;
        self.skipped += 1;
        self.consecutive_skips += 1;
        tracing::warn!(
            "step {done}: non-finite loss ({}) or gradient norm ({}): step skipped ({} in a row, max_consecutive_skipped_steps {})",
            r.loss,
            r.grad_norm,
            self.consecutive_skips,
            config.max_consecutive_skipped_steps
        );
        if let Some(m) = self.metrics.as_mut() {
            m.write(&json!({"step": done, "skipped": true, "skipped_steps": self.skipped}))?;
        }
        if self.consecutive_skips >= config.max_consecutive_skipped_steps {
            // Adapters and optimizer are as the last good step left them.
            run.save_checkpoint(done)?;
            return Err(failed(format!(
                "{} consecutive steps (up to step {done}) had a non-finite loss or gradient: stopped; the last good state (optimizer step {}) is in {}; lower learning_rate, set max_grad_norm, or check the data",
                self.consecutive_skips,
                run.opt.steps(),
                checkpoint::path_for(&config.output_dir, done).display()
            )));
        }
        self.progress.set(done as u64, "skipped");
        Ok(())
    }

    /// An applied step: progress, and every `logging_steps` (and at the end) the log line and
    /// a metrics record over the steps since the last one.
    pub fn updated(
        &mut self,
        run: &Run,
        step: usize,
        r: &StepResult,
        lr: f64,
    ) -> Result<(), TrainError> {
        self.consecutive_skips = 0;
        let done = step + 1;
        self.first_loss.get_or_insert(r.loss);
        self.last_loss = r.loss;
        let (loss_sum, steps, tokens, since) = &mut self.window;
        *loss_sum += r.loss;
        *steps += 1;
        *tokens += r.tokens;
        let (done_here, tokens_here, since_open) = &mut self.run_rate;
        *done_here += 1;
        *tokens_here += r.tokens as u64;
        let secs = since_open.elapsed().as_secs_f64().max(1e-9);
        self.progress.set(
            done as u64,
            &format!(
                "loss {:.4} lr {lr:.2e} {} tok/s {} steps/s",
                r.loss,
                progress::rate(*tokens_here as f64 / secs),
                progress::rate(*done_here as f64 / secs)
            ),
        );
        if done % run.config.logging_steps.max(1) != 0 && done != run.total_steps {
            return Ok(());
        }
        let loss = *loss_sum / *steps as f64;
        let secs = since.elapsed().as_secs_f64().max(1e-9);
        let tps = *tokens as f64 / secs;
        let mut rec = json!({
            "step": done,
            "loss": loss,
            "lr": lr,
            "grad_norm": r.grad_norm,
            "tokens": *tokens,
            "tokens_per_s": tps,
            "epoch": run.loader.cursor().epoch,
            "elapsed_s": self.started.elapsed().as_secs_f64(),
            "world_size": run.world,
            "skipped_steps": self.skipped,
            "expert_tokens": r.expert_tokens,
        });
        if let Some(p) = self.peak_flops {
            rec["mfu"] = json!(tps * self.flops_per_token / (p * run.world as f64));
            rec["peak_gpu_mem_gb"] = json!(mem::peak_gpu_bytes() as f64 / 1e9);
        }
        if run.rank == 0 {
            tracing::info!(
                "step {done}/{} loss {loss:.4} lr {lr:.3e} grad_norm {:.3} {tps:.0} tok/s",
                run.total_steps,
                r.grad_norm
            );
        }
        if let Some(m) = self.metrics.as_mut() {
            m.write(&rec)?;
        }
        self.window = (0.0, 0, 0, Instant::now());
        Ok(())
    }

    /// Validation over every rank's share of the held-out set, every `eval_steps` and at the end.
    pub fn evaluate_if_due(&mut self, run: &Run, done: usize) -> Result<(), TrainError> {
        let due = run
            .config
            .eval_steps
            .is_some_and(|e| e > 0 && done % e == 0)
            || done == run.total_steps;
        if !due || run.data.val.is_empty() {
            return Ok(());
        }
        let r = eval_set(
            &run.model,
            &run.adapters,
            &run.data.val,
            &run.loader_options,
        )?;
        let g = sum_over_ranks(
            run.comm.as_ref(),
            vec![
                r.loss * r.tokens as f64,
                r.accuracy * r.tokens as f64,
                r.tokens as f64,
            ],
        )?;
        let n = g[2].max(1.0);
        let r = EvalResult {
            loss: g[0] / n,
            accuracy: g[1] / n,
            tokens: g[2] as usize,
        };
        if run.rank == 0 {
            tracing::info!(
                "step {done}: validation loss {:.4}, token accuracy {:.1}% over {} targets",
                r.loss,
                100.0 * r.accuracy,
                r.tokens
            );
        }
        if let Some(m) = self.metrics.as_mut() {
            m.write(&json!({"step": done, "eval_loss": r.loss, "eval_accuracy": r.accuracy, "eval_tokens": r.tokens}))?;
        }
        self.last_eval = Some(r);
        Ok(())
    }

    /// A checkpoint every `save_steps` (the last step's state is the final adapter instead).
    pub fn save_if_due(&self, run: &Run, done: usize) -> Result<(), TrainError> {
        let every = run.config.save_steps;
        if every.is_some_and(|s| s > 0 && done % s == 0) && done != run.total_steps {
            run.save_checkpoint(done)?;
        }
        Ok(())
    }
}
