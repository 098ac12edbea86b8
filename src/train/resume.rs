//! Saving and resuming the whole training state (`checkpoint` has the files and their rules):
//! which checkpoint to resume, putting it into this rank's adapters and optimizer, and writing
//! one from every rank's parts.

use super::checkpoint;
use super::error::{failed, TrainError};
use super::ranks::{gather_expert_part, whole_adapter};
use super::AdamW;
use crate::config::TrainConfig;
use crate::distributed::Communicator;
use crate::lora::Adapters;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The checkpoint to resume from: `MOEQ_RESUME_FROM_CHECKPOINT` (set by moeq-launch on a
/// restart) or `resume_from_checkpoint`; `auto` is the newest complete checkpoint of
/// output_dir, or none. Rank 0 removes incomplete ones first.
pub(crate) fn resume_point(
    config: &TrainConfig,
    spec: &crate::arch::ArchSpec,
    lead: bool,
) -> Result<Option<checkpoint::Loaded>, TrainError> {
    use crate::config::ResumeFrom;
    let configured = config.resume_from_checkpoint.clone();
    let wanted = match std::env::var("MOEQ_RESUME_FROM_CHECKPOINT") {
        // A restart: the newest checkpoint of this run, else what the config asked for.
        Ok(v) if v == "auto" => match (checkpoint::newest_complete(&config.output_dir), configured)
        {
            (None, Some(c)) => Some(c),
            _ => Some(ResumeFrom::Auto),
        },
        Ok(v) if !v.is_empty() => Some(ResumeFrom::Path(PathBuf::from(v))),
        _ => configured,
    };
    if lead {
        for p in checkpoint::clean_incomplete(&config.output_dir) {
            tracing::warn!("removed {}: an interrupted checkpoint write", p.display());
        }
    }
    let dir = match wanted {
        None => return Ok(None),
        Some(ResumeFrom::Path(p)) => p,
        Some(ResumeFrom::Auto) => match checkpoint::newest_complete(&config.output_dir) {
            Some(p) => p,
            None => {
                tracing::info!(
                    "resume_from_checkpoint: auto, but {} has no complete checkpoint: starting from step 0",
                    config.output_dir.display()
                );
                return Ok(None);
            }
        },
    };
    let loaded = checkpoint::read(&dir, spec).map_err(TrainError::Input)?;
    tracing::info!(
        "resuming from {} (step {})",
        dir.display(),
        loaded.state.step
    );
    Ok(Some(loaded))
}

/// Puts a checkpoint's adapter and optimizer state into this rank's adapters (expert parts
/// re-partitioned by global expert index) and returns the step to continue from.
pub(crate) fn restore(
    r: &checkpoint::Loaded,
    adapters: &Adapters,
    opt: &mut AdamW,
    config: &TrainConfig,
    world: usize,
) -> Result<usize, TrainError> {
    let bad =
        |m: String| TrainError::Input(format!("resume_from_checkpoint: {}: {m}", r.dir.display()));
    let parts = adapters.expert_parts();
    let vars = adapters.vars();
    let names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
    let saved: Vec<&String> = r.adapter.keys().collect();
    if names != saved {
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !r.adapter.contains_key(**n))
            .take(3)
            .collect();
        let extra: Vec<_> = saved
            .iter()
            .filter(|n| !names.contains(n))
            .take(3)
            .collect();
        return Err(bad(format!(
            "its adapter does not match this config's LoRA targets (missing {missing:?}, unexpected {extra:?}): keep lora_target_modules/lora_target_parameters as they were"
        )));
    }
    let local = |name: &str, full: &Tensor| -> Result<Tensor, TrainError> {
        match parts.get(name) {
            Some((e, part)) => e.local(*part, full).map_err(failed),
            None => Ok(full.clone()),
        }
    };
    let mut moments = std::collections::HashMap::new();
    for (name, v) in &vars {
        let t = local(name, &r.adapter[name])?;
        if t.dims() != v.dims() {
            return Err(bad(format!(
                "'{name}' has shape {:?}, this run's adapter {:?} (lora_r differs?)",
                r.adapter[name].dims(),
                v.dims()
            )));
        }
        v.set(&t.to_device(v.device()).map_err(failed)?)
            .map_err(failed)?;
        for suffix in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{name}.{suffix}");
            let m = r
                .moments
                .get(&key)
                .ok_or_else(|| bad(format!("optimizer state lacks '{key}'")))?;
            moments.insert(key, local(name, m)?);
        }
    }
    opt.load_state(r.state.optimizer_step, &moments)
        .map_err(|e| bad(e.to_string()))?;
    let rows = world * config.micro_batch_size * config.gradient_accumulation_steps.max(1);
    if rows != r.state.global_rows() {
        tracing::warn!(
            "resume: this run reads {rows} rows per step ({world} ranks × micro_batch_size {} × gradient_accumulation_steps {}), the checkpoint was written with {} — the data order continues, but steps now mean other batches",
            config.micro_batch_size,
            config.gradient_accumulation_steps,
            r.state.global_rows()
        );
    }
    Ok(r.state.step)
}

/// Writes `checkpoint-<step>` (every rank must call this): whole adapter and optimizer state
/// gathered, files written by rank 0, marker after a barrier, then `save_total_limit`.
pub(crate) fn save_checkpoint(
    config: &TrainConfig,
    adapters: &Adapters,
    opt: &AdamW,
    state: &checkpoint::TrainerState,
    comm: &dyn Communicator,
    spread_over: Option<&dyn Communicator>,
) -> Result<(), TrainError> {
    // Writing gigabytes may take longer than a collective may: no stall limit meanwhile.
    let watch = &crate::distributed::store::WATCH;
    let paused = watch.pause();
    let full = whole_adapter(adapters, spread_over)?;
    let parts = adapters.expert_parts();
    let mut moments = BTreeMap::new();
    for (key, t) in opt.state().map_err(failed)? {
        let name = key.rsplit_once('.').map_or(key.as_str(), |(n, _)| n);
        let whole = match (spread_over, parts.get(name)) {
            (Some(group), Some((e, part))) => {
                gather_expert_part(e, *part, &t, group).map_err(failed)?
            }
            _ => t,
        };
        moments.insert(key, whole);
    }
    let lead = comm.rank() == 0;
    let written = if lead {
        let yaml = serde_yaml::to_string(config).map_err(failed)?;
        Some(
            checkpoint::write_files(
                &config.output_dir,
                full.as_ref().unwrap_or(adapters),
                &moments,
                state,
                &config.base_model,
                &yaml,
            )
            .map_err(TrainError::Failed)?,
        )
    } else {
        None
    };
    comm.barrier().map_err(failed)?;
    if let Some(dir) = written {
        checkpoint::mark_complete(&dir).map_err(TrainError::Failed)?;
        tracing::info!("saved checkpoint {}", dir.display());
        if let Some(limit) = config.save_total_limit {
            checkpoint::prune(&config.output_dir, limit, &dir);
        }
    }
    watch.resume(paused);
    Ok(())
}

/// Puts the adapter in `dir` (`lora_model_dir`: moeq's or PEFT's files) into this rank's
/// adapters (expert parts cut to the experts it holds). Its rank, alpha, scaling and targets
/// must be the config's, so training continues the same function.
pub(crate) fn start_from_adapter(
    adapters: &Adapters,
    dir: &std::path::Path,
    spec: &crate::arch::ArchSpec,
) -> Result<(), TrainError> {
    let bad = |m: String| TrainError::Input(format!("lora_model_dir {}: {m}", dir.display()));
    let loaded = crate::lora::peft::load(dir, spec, &candle_core::Device::Cpu).map_err(bad)?;
    let (have, want) = (&loaded.settings, &adapters.settings);
    if have.r != want.r {
        return Err(bad(format!(
            "the adapter has r = {}, this config lora_r {}: set lora_r: {}",
            have.r, want.r, have.r
        )));
    }
    if have.alpha != want.alpha || have.use_rslora != want.use_rslora {
        return Err(bad(format!(
            "the adapter scales by lora_alpha {} (rslora {}), this config by {} (rslora {}): set lora_alpha and peft_use_rslora as the adapter's",
            have.alpha, have.use_rslora, want.alpha, want.use_rslora
        )));
    }
    let saved = loaded.vars();
    let names: Vec<&String> = saved.iter().map(|(n, _)| n).collect();
    let vars = adapters.vars();
    let ours: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
    if names != ours {
        let only = |a: &[&String], b: &[&String]| -> Vec<String> {
            a.iter()
                .filter(|n| !b.contains(n))
                .take(2)
                .map(|n| n.to_string())
                .collect()
        };
        return Err(bad(format!(
            "its LoRA targets differ from this config's (only in the adapter: {:?}; only in the config: {:?}): set lora_target_modules and lora_target_parameters as in its adapter_config.json",
            only(&names, &ours),
            only(&ours, &names)
        )));
    }
    let parts = adapters.expert_parts();
    for ((name, v), (_, w)) in vars.iter().zip(&saved) {
        let full = w.as_tensor();
        let t = match parts.get(name) {
            Some((e, part)) => e.local(*part, full).map_err(failed)?,
            None => full.clone(),
        };
        v.set(&t.to_device(v.device()).map_err(failed)?)
            .map_err(failed)?;
    }
    Ok(())
}
