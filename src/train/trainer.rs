//! The training loop on one device: micro-batches with gradient accumulation, per-layer
//! recompute (`step`), global-norm clipping, AdamW with fp32 state, the LR schedule,
//! metrics (`output_dir/metrics.jsonl`), periodic validation and PEFT adapter saves, on one
//! rank or many. Collective helpers are in `ranks`, checkpoint save/resume in `resume`, the
//! output directory checks in `output`.

use super::checkpoint;
pub use super::error::TrainError;
use super::error::{failed, step_failed};
use super::metrics::{flops_per_token, peak_flops, Metrics};
use super::ranks::{all_reduce_grads, squares, sum_over_ranks, whole_adapter};
use super::resume::{restore, resume_point, save_checkpoint};
use super::setup;
use super::step::{evaluate, forward_backward, Activations, EvalStats, MicroStats};
use super::{AdamW, AdamWConfig, Schedule};
use crate::arch::Model;
use crate::checkpoint::ModelDir;
use crate::config::TrainConfig;
use crate::data::{Loader, LoaderOptions, PreparedData, Sample};
use crate::dist::Communicator;
use crate::lora::Adapters;
use crate::util::phases::timed;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
        crate::dist::store::WATCH.progress();
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

/// Where this process stands in the job: its collectives and its GPU slot on the node.
pub struct RankCtx {
    pub comm: Arc<dyn Communicator>,
    pub local_rank: usize,
    /// Started as part of a job (launcher, torchrun, srun): the distributed path runs even
    /// with one rank, so its collectives are exercised the same way on any world size.
    pub joined: bool,
}

impl RankCtx {
    pub fn solo() -> RankCtx {
        RankCtx {
            comm: Arc::new(crate::dist::Solo),
            local_rank: 0,
            joined: false,
        }
    }
}

/// Trains `config` on the already-opened base model with prepared data, in one process.
pub fn train(
    config: &TrainConfig,
    dir: &ModelDir,
    data: &PreparedData,
    pad_id: u32,
) -> Result<Summary, TrainError> {
    train_ranks(config, dir, data, pad_id, &RankCtx::solo())
}

/// Writes the NF4 digests of this rank's frozen base into `dir` (`MOEQ_NF4_DIGEST`), to compare
/// loads across world sizes.
fn write_digest(
    dir: &Path,
    base: &crate::checkpoint::frozen::FrozenBase,
    rank: usize,
    world: usize,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let path = dir.join(format!("nf4-rank{rank}-of-{world}.json"));
    let text =
        serde_json::to_string_pretty(&crate::checkpoint::frozen::digest(base).map_err(failed)?)
            .map_err(failed)?;
    std::fs::write(&path, text).map_err(|e| failed(format!("{}: {e}", path.display())))
}

/// Trains on every rank of `ctx`: data parallel over the ranks (each its own micro-batches),
/// experts spread over them (each rank loads, quantizes and trains the adapters of its own
/// experts; tokens travel to them), replicated adapters' gradients summed over the ranks.
/// Rank 0 writes metrics and adapters. With one rank this is the single-process trainer.
pub fn train_ranks(
    config: &TrainConfig,
    dir: &ModelDir,
    data: &PreparedData,
    pad_id: u32,
    ctx: &RankCtx,
) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let comm = &ctx.comm;
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let device =
        setup::device_for_rank(&config.device, ctx.local_rank).map_err(TrainError::Input)?;
    let dtype = setup::compute_dtype(config.bf16, &device);
    let spec = &dir.spec;
    tracing::info!("device {:?}, compute dtype {:?}", device, dtype);
    if data.train.is_empty() {
        return Err(TrainError::Input(
            "no training samples: check `datasets` and `val_set_size`".into(),
        ));
    }
    if !config.load_in_4bit {
        return Err(TrainError::Input(
            "load_in_4bit: false (a 16-bit frozen base, `adapter: lora`) is not supported yet: set `load_in_4bit: true` and `adapter: qlora`".into(),
        ));
    }
    let settings = setup::quant_settings(config);
    // Expert parallelism spreads the experts over the ranks; without it (`expert_parallel:
    // false`) every rank holds all experts and only the data is split.
    let distributed = ctx.joined || world > 1;
    let ep = distributed && config.expert_parallel && spec.num_experts > 0;
    let held = if ep {
        crate::dist::dispatch::expert_ranges(spec.num_experts, world)[rank].clone()
    } else {
        0..spec.num_experts
    };
    let base = if ep {
        tracing::info!(
            "rank {rank} of {world}: experts {}..{} of {}",
            held.start,
            held.end,
            spec.num_experts
        );
        setup::load_base(
            dir,
            settings,
            &device,
            Some(held.clone()),
            &mut setup::CommGather(comm.as_ref()),
        )
    } else {
        setup::load_base(
            dir,
            settings,
            &device,
            None,
            &mut crate::checkpoint::frozen::SingleProcess,
        )
    }
    .map_err(TrainError::Input)?;
    tracing::info!(
        "frozen base: {:.1} MB 4-bit + {:.1} MB dense in {:.1} s",
        base.report.quantized_bytes as f64 / 1e6,
        base.report.dense_bytes as f64 / 1e6,
        base.report.seconds
    );
    if let Some(r) = crate::util::phases::report(1) {
        tracing::info!("loading: {r}");
    }
    crate::util::phases::mark_memory("1 load", &device);
    let building = std::time::Instant::now();
    if let Some(d) = std::env::var_os("MOEQ_NF4_DIGEST") {
        write_digest(Path::new(&d), &base, rank, world)?;
    }
    let model = Model::new(spec, &base, dtype, &device, config.sequence_len + 1)
        .and_then(|m| {
            if ep {
                m.with_parallel(comm.clone())
            } else {
                Ok(m)
            }
        })
        .map_err(|e| TrainError::Input(e.to_string()))?;
    drop(base);
    tracing::info!(
        "model on {}: built in {:.1} s",
        if device.is_cuda() {
            "the GPU"
        } else {
            "the CPU"
        },
        building.elapsed().as_secs_f64()
    );
    crate::util::phases::mark_memory("2 model built", &device);
    let adapters = Adapters::for_experts(
        spec,
        setup::lora_settings(config),
        config.seed,
        &device,
        held,
    )
    .map_err(failed)?;
    if adapters.linear.is_empty() && adapters.experts.is_empty() {
        return Err(TrainError::Input(
            "no LoRA targets matched: set lora_target_modules (q_proj, k_proj, …) and/or lora_target_parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj)".into(),
        ));
    }
    for m in &adapters.settings.target_modules {
        if lead
            && m != "all-linear"
            && !adapters
                .linear
                .keys()
                .any(|p| p.rsplit('.').next() == Some(m.as_str()))
        {
            let hint = if ["gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]
                .contains(&m.as_str())
                && spec.num_experts > 0
            {
                " (the experts of this model are fused 3-D parameters: target them with lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj])"
            } else {
                ""
            };
            tracing::warn!(
                "lora_target_modules: '{m}' matches no module of this {} model{hint}",
                spec.model_type.as_str()
            );
        }
    }
    tracing::info!(
        "LoRA: {} linear and {} expert adapters, {} trainable parameters ({} on this rank)",
        adapters.linear.len(),
        adapters.experts.len(),
        adapters.num_params_global(),
        adapters.num_params()
    );

    let opts = LoaderOptions::from_config(config, pad_id, rank, world);
    let resume = resume_point(config, spec, lead)?;
    let mut loader = match &resume {
        Some(r) => Loader::resume(data.train.clone(), opts.clone(), r.state.cursor),
        None => Loader::new(data.train.clone(), opts.clone()),
    }
    .map_err(|e| TrainError::Input(e.to_string()))?;
    let gas = config.gradient_accumulation_steps.max(1);
    let total_steps = match config.max_steps {
        Some(s) => s,
        None => loader.steps_in_epochs(config.num_epochs).div_ceil(gas),
    };
    if total_steps == 0 {
        return Err(TrainError::Input(format!(
            "no whole training step: {} rows of training data, but one step takes micro_batch_size {} × {world} ranks; lower micro_batch_size or add data",
            loader.steps_per_epoch(),
            config.micro_batch_size
        )));
    }
    let warmup = config.warmup_steps.unwrap_or_else(|| {
        (config.warmup_ratio.unwrap_or(0.0) * total_steps as f64).ceil() as usize
    });
    let schedule = Schedule {
        kind: config.lr_scheduler,
        peak_lr: config.learning_rate,
        warmup_steps: warmup,
        total_steps,
    };
    let mut opt = AdamW::new(
        adapters.vars(),
        AdamWConfig {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
    )
    .map_err(failed)?;
    let start_step = match &resume {
        Some(r) => restore(r, &adapters, &mut opt, config, world)?,
        None => 0,
    };
    // Every rank must continue from the same step (output_dir on a filesystem they share).
    let steps = comm
        .all_gather(&Tensor::new(&[start_step as f64], &Device::Cpu).map_err(failed)?)
        .and_then(|v| {
            v.iter()
                .map(|t| t.to_vec1::<f64>())
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .map_err(failed)?;
    if let Some((r, s)) = steps
        .iter()
        .enumerate()
        .find(|(_, s)| s[0] as usize != start_step)
    {
        return Err(TrainError::Input(format!(
            "resume: rank {rank} continues from step {start_step} but rank {r} from step {}: output_dir must be on a filesystem every rank sees the same way",
            s[0]
        )));
    }
    if start_step >= total_steps && resume.is_some() {
        return Err(TrainError::Input(format!(
            "resume_from_checkpoint: the checkpoint is at step {start_step}, and this run has {total_steps} steps: nothing left to train (raise max_steps, or start a new output_dir)"
        )));
    }
    let mut tokens_seen = resume.as_ref().map_or(0, |r| r.state.tokens_seen);
    drop(resume);
    let mut metrics = if lead {
        std::fs::create_dir_all(&config.output_dir).map_err(|e| {
            TrainError::Input(format!(
                "output_dir {}: cannot create it: {e} (choose a writable output_dir)",
                config.output_dir.display()
            ))
        })?;
        crate::util::logging::open_log_file().map_err(TrainError::Input)?;
        Some(Metrics::create(&config.output_dir, start_step)?)
    } else {
        None
    };
    let flops_tok = flops_per_token(spec, config.sequence_len);
    let peak = peak_flops(&device);
    let progress =
        crate::util::progress::Steps::new(if lead { total_steps as u64 } else { 0 }, "train");

    let vars = adapters.vars();
    let expert_names = adapters.expert_var_names();
    let (replicated, owned): (Vec<String>, Vec<String>) = vars
        .iter()
        .map(|(n, _)| n.clone())
        .partition(|n| !ep || !expert_names.contains(n));
    let (mut first_loss, mut last_loss) = (None, 0.0);
    let (mut window_loss, mut window_steps, mut window_tokens) = (0.0, 0usize, 0usize);
    let mut window_start = Instant::now();
    let mut last_eval = None;
    let trainer_state =
        |step: usize, optimizer_step: usize, tokens_seen: u64, cursor| checkpoint::TrainerState {
            step,
            optimizer_step,
            tokens_seen,
            cursor,
            world_size: world,
            micro_batch_size: config.micro_batch_size,
            gradient_accumulation_steps: gas,
            seed: config.seed,
            model_type: spec.model_type.as_str().to_string(),
            num_layers: spec.num_layers,
            num_experts: spec.num_experts,
            hidden_size: spec.hidden_size,
        };
    let (mut skipped, mut consecutive_skips) = (0usize, 0usize);
    let activations = Activations::from_checkpointing(config.gradient_checkpointing);
    if lead {
        tracing::info!("activations: {}", activations.describe());
    }
    let injected_nonfinite = injected_nonfinite_steps()?;
    // Watchdog (multi-process jobs): the first step may include warm-up, later ones not.
    let watch = &crate::dist::store::WATCH;
    let steady = std::time::Duration::from_secs(config.collective_timeout_s);
    // Every rank has loaded before the clocks start.
    comm.barrier().map_err(failed)?;
    watch.limit(steady.max(std::time::Duration::from_secs(300)));
    progress.set(start_step as u64, "");
    for step in start_step..total_steps {
        let batches: Vec<_> = (0..gas).map(|_| loader.next_batch()).collect();
        let local_denom: usize = batches.iter().map(|b| b.num_targets()).sum();
        let denom = sum_over_ranks(comm.as_ref(), vec![local_denom as f64])?[0] as usize;
        let mut grads = BTreeMap::new();
        let mut stats = MicroStats::default();
        for (micro, batch) in batches.iter().enumerate() {
            let key = Some((config.seed, ((step * gas + micro) * world + rank) as u64));
            let s = forward_backward(
                &model,
                &adapters,
                batch,
                denom,
                key,
                activations,
                &mut grads,
            )
            .map_err(|e| step_failed(e, config.gradient_checkpointing))?;
            watch.progress();
            stats.loss_sum += s.loss_sum;
            stats.labelled += s.labelled;
            stats.tokens += s.tokens;
            if stats.expert_tokens.is_empty() {
                stats.expert_tokens = s.expert_tokens;
            } else {
                for (acc, add) in stats.expert_tokens.iter_mut().zip(&s.expert_tokens) {
                    for (a, b) in acc.iter_mut().zip(add) {
                        *a += b;
                    }
                }
            }
        }
        if distributed {
            // An adapter no token reached still takes part (zero gradient), as the whole
            // parameter would in one process.
            for (name, v) in &vars {
                if !grads.contains_key(name) {
                    grads.insert(name.clone(), v.as_tensor().zeros_like().map_err(failed)?);
                }
            }
            all_reduce_grads(comm.as_ref(), &mut grads, &replicated).map_err(failed)?;
            // Global loss, token counts and expert load.
            let mut v = vec![stats.loss_sum, stats.labelled as f64, stats.tokens as f64];
            v.extend(stats.expert_tokens.iter().flatten().map(|&c| c as f64));
            let g = sum_over_ranks(comm.as_ref(), v)?;
            stats.loss_sum = g[0];
            stats.labelled = g[1] as usize;
            stats.tokens = g[2] as usize;
            let mut at = 3;
            for row in stats.expert_tokens.iter_mut() {
                for c in row.iter_mut() {
                    *c = g[at] as u64;
                    at += 1;
                }
            }
        }
        if step == start_step {
            watch.limit(steady);
        }
        crate::util::mem::sample_gpu_peak(&device);
        // Global gradient norm: replicated gradients (equal on every rank) plus every rank's
        // own expert gradients.
        let sq = timed("gradient norm", &device, || squares(&grads, &replicated))
            .map_err(failed)?
            + sum_over_ranks(
                comm.as_ref(),
                vec![squares(&grads, &owned).map_err(failed)?],
            )?[0];
        let grad_norm = sq.sqrt();
        if injected_nonfinite.contains(&(step + 1)) {
            stats.loss_sum = f64::NAN;
        }
        if !grad_norm.is_finite() || !stats.loss_sum.is_finite() {
            // Skipped: no update; the batch is consumed. Every rank sees the same global
            // numbers, so all skip together.
            let done = step + 1;
            skipped += 1;
            consecutive_skips += 1;
            let loss = stats.loss_sum / stats.labelled.max(1) as f64;
            tracing::warn!(
                "step {done}: non-finite loss ({loss}) or gradient norm ({grad_norm}): step skipped ({consecutive_skips} in a row, max_consecutive_skipped_steps {})",
                config.max_consecutive_skipped_steps
            );
            if let Some(m) = metrics.as_mut() {
                m.write(&json!({"step": done, "skipped": true, "skipped_steps": skipped}))?;
            }
            if consecutive_skips >= config.max_consecutive_skipped_steps {
                // Adapters and optimizer are as the last good step left them.
                let state = trainer_state(done, opt.steps(), tokens_seen, loader.cursor());
                save_checkpoint(config, &adapters, &opt, &state, comm.as_ref(), ep)?;
                return Err(failed(format!(
                    "{consecutive_skips} consecutive steps (up to step {done}) had a non-finite loss or gradient: stopped; the last good state (optimizer step {}) is in {}; lower learning_rate, set max_grad_norm, or check the data",
                    opt.steps(),
                    checkpoint::path_for(&config.output_dir, done).display()
                )));
            }
            progress.set(done as u64, "skipped");
            continue;
        }
        consecutive_skips = 0;
        let clip = if config.max_grad_norm > 0.0 && grad_norm > config.max_grad_norm {
            config.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let mut store = GradStore::default();
        for (name, v) in &vars {
            if let Some(g) = grads.get(name) {
                let g: Tensor = if clip < 1.0 {
                    (g * clip).map_err(failed)?
                } else {
                    g.clone()
                };
                store.insert(v.as_tensor(), g);
            }
        }
        let lr = schedule.lr(step);
        timed("optimizer", &device, || opt.step(&store, lr)).map_err(failed)?;
        crate::util::phases::mark_memory("6 optimizer", &device);
        if step == start_step {
            crate::util::phases::reset();
        }

        let loss = stats.loss_sum / stats.labelled.max(1) as f64;
        first_loss.get_or_insert(loss);
        last_loss = loss;
        window_loss += loss;
        window_steps += 1;
        window_tokens += stats.tokens;
        tokens_seen += stats.tokens as u64;
        let done = step + 1;
        progress.set(done as u64, &format!("loss {loss:.4} lr {lr:.2e}"));
        if done % config.logging_steps.max(1) == 0 || done == total_steps {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            let mut rec = json!({
                "step": done,
                "loss": window_loss / window_steps as f64,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": window_tokens,
                "tokens_per_s": tps,
                "epoch": loader.cursor().epoch,
                "elapsed_s": started.elapsed().as_secs_f64(),
                "world_size": world,
                "skipped_steps": skipped,
                "expert_tokens": stats.expert_tokens,
            });
            if let Some(p) = peak {
                rec["mfu"] = json!(tps * flops_tok / (p * world as f64));
                rec["peak_gpu_mem_gb"] = json!(crate::util::mem::peak_gpu_bytes() as f64 / 1e9);
            }
            if lead {
                tracing::info!(
                    "step {done}/{total_steps} loss {:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {tps:.0} tok/s",
                    window_loss / window_steps as f64
                );
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&rec)?;
            }
            (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
            window_start = Instant::now();
        }
        let eval_due =
            config.eval_steps.is_some_and(|e| e > 0 && done % e == 0) || done == total_steps;
        if eval_due && !data.val.is_empty() {
            let r = eval_set(&model, &adapters, &data.val, &opts)?;
            let g = sum_over_ranks(
                comm.as_ref(),
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
            if lead {
                tracing::info!(
                    "step {done}: validation loss {:.4}, token accuracy {:.1}% over {} targets",
                    r.loss,
                    100.0 * r.accuracy,
                    r.tokens
                );
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&json!({"step": done, "eval_loss": r.loss, "eval_accuracy": r.accuracy, "eval_tokens": r.tokens}))?;
            }
            last_eval = Some(r);
        }
        if config.save_steps.is_some_and(|s| s > 0 && done % s == 0) && done != total_steps {
            let state = trainer_state(done, opt.steps(), tokens_seen, loader.cursor());
            save_checkpoint(config, &adapters, &opt, &state, comm.as_ref(), ep)?;
        }
    }
    progress.finish();
    if let Some(r) = crate::util::phases::report(total_steps - start_step - 1) {
        tracing::info!("{r}");
    }
    if let Some(r) = crate::util::phases::memory_report() {
        tracing::info!("{r}");
    }
    let full = whole_adapter(&adapters, comm.as_ref(), ep)?;
    if lead {
        super::output::save_final_adapter(config, full.as_ref().unwrap_or(&adapters))?;
    }
    comm.barrier().map_err(failed)?;
    Ok(Summary {
        steps: total_steps,
        first_loss: first_loss.unwrap_or(0.0),
        last_loss,
        eval: last_eval,
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
