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

/// Writes `checkpoint-<step>` (every rank must call this), then applies `save_total_limit`.
/// With experts spread over ranks that all see output_dir, each rank of the first
/// expert-parallel group writes its own experts' part (`checkpoint::write_part`) and rank 0 the
/// rest; otherwise the expert adapters and moments are gathered and rank 0 writes everything.
/// The marker is written after a barrier, once every part is synced.
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
    let moments = opt.state().map_err(failed)?;
    let split = match spread_over {
        Some(group) if group.world_size() > 1 => shares_output_dir(config, state.step, comm)?,
        _ => false,
    };
    let written = if split {
        write_in_parts(config, adapters, moments, state, comm, spread_over)?
    } else {
        write_gathered(
            config,
            adapters,
            moments,
            state,
            comm.rank() == 0,
            spread_over,
        )?
    };
    comm.barrier().map_err(failed)?;
    if let Some(dir) = written {
        let dir = match dir {
            Written::Renamed(dir) => dir,
            Written::InTmp => {
                checkpoint::finish(&config.output_dir, state.step).map_err(TrainError::Failed)?
            }
        };
        checkpoint::mark_complete(&dir).map_err(TrainError::Failed)?;
        tracing::info!("saved checkpoint {}", dir.display());
        if let Some(limit) = config.save_total_limit {
            checkpoint::prune(&config.output_dir, limit, &dir);
        }
    }
    watch.resume(paused);
    Ok(())
}

/// Where rank 0's files of a checkpoint are before the marker.
enum Written {
    /// Still in the temporary directory (other ranks' parts join them there).
    InTmp,
    /// Renamed to `checkpoint-<step>`.
    Renamed(std::path::PathBuf),
}

/// Each rank of the first expert-parallel group (ranks 0..G, every expert once) writes its
/// experts' adapters and moments into the temporary directory; rank 0 the rest.
fn write_in_parts(
    config: &TrainConfig,
    adapters: &Adapters,
    moments: Vec<(String, Tensor)>,
    state: &checkpoint::TrainerState,
    comm: &dyn Communicator,
    spread_over: Option<&dyn Communicator>,
) -> Result<Option<Written>, TrainError> {
    let parts = adapters.expert_parts();
    let of_experts = |name: &String| {
        let base = name.rsplit_once('.').map_or(name.as_str(), |(n, _)| n);
        parts.contains_key(name) || parts.contains_key(base)
    };
    let tensors = adapters
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()));
    let (mine, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = tensors.partition(|(k, _)| of_experts(k));
    let (my_moments, rest_moments): (BTreeMap<_, _>, BTreeMap<_, _>) =
        moments.into_iter().partition(|(k, _)| of_experts(k));
    let tmp = checkpoint::tmp_path(&config.output_dir, state.step);
    let group = spread_over.map_or(1, |g| g.world_size());
    let held = parts
        .values()
        .next()
        .filter(|(e, _)| e.num_experts > 0)
        .map(|(e, _)| (e.first..e.first + e.num_experts, e.total));
    if let (true, Some((experts, total))) = (comm.rank() < group, held) {
        let mut all = mine;
        all.extend(my_moments);
        checkpoint::write_part(&tmp, &experts, total, &all).map_err(TrainError::Failed)?;
    }
    if comm.rank() != 0 {
        return Ok(None);
    }
    let yaml = serde_yaml::to_string(config).map_err(failed)?;
    let texts = (config.base_model.as_str(), yaml.as_str());
    checkpoint::write_lead(&tmp, adapters, &rest, &rest_moments, state, texts)
        .map_err(TrainError::Failed)?;
    Ok(Some(Written::InTmp))
}

/// Expert adapters and moments gathered over `spread_over` (every rank), then written whole
/// by rank 0 (`lead`).
fn write_gathered(
    config: &TrainConfig,
    adapters: &Adapters,
    moments: Vec<(String, Tensor)>,
    state: &checkpoint::TrainerState,
    lead: bool,
    spread_over: Option<&dyn Communicator>,
) -> Result<Option<Written>, TrainError> {
    let full = whole_adapter(adapters, spread_over)?;
    let parts = adapters.expert_parts();
    let mut whole = BTreeMap::new();
    for (key, t) in moments {
        let name = key.rsplit_once('.').map_or(key.as_str(), |(n, _)| n);
        let t = match (spread_over, parts.get(name)) {
            (Some(group), Some((e, part))) => {
                gather_expert_part(e, *part, &t, group).map_err(failed)?
            }
            _ => t,
        };
        whole.insert(key, t);
    }
    if !lead {
        return Ok(None);
    }
    let yaml = serde_yaml::to_string(config).map_err(failed)?;
    let dir = checkpoint::write_files(
        &config.output_dir,
        full.as_ref().unwrap_or(adapters),
        &whole,
        state,
        &config.base_model,
        &yaml,
    )
    .map_err(TrainError::Failed)?;
    Ok(Some(Written::Renamed(dir)))
}

/// Whether every rank sees the checkpoint's temporary directory that rank 0 makes here (every
/// rank must call this): rank 0 writes a token into it, each rank reads what it sees, and all
/// compare. No: output_dir is not one shared filesystem, or `MOEQ_GATHER_CHECKPOINTS=1` asks
/// for whole checkpoints (PEFT-loadable as they are): rank 0 then writes everything.
fn shares_output_dir(
    config: &TrainConfig,
    step: usize,
    comm: &dyn Communicator,
) -> Result<bool, TrainError> {
    let lead = comm.rank() == 0;
    let token = format!(
        "{step} {} {}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    if lead {
        checkpoint::begin_with(&config.output_dir, step, &token).map_err(TrainError::Failed)?;
    }
    comm.barrier().map_err(failed)?;
    // Rank 0's token as a number every rank compares its reading with.
    let hash = |s: &str| {
        let d = <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes());
        (u64::from_le_bytes(d[..8].try_into().unwrap_or_default()) >> 12) as f64
    };
    // MOEQ_GATHER_CHECKPOINTS=1 asks for whole checkpoints (every rank says no).
    let gather = std::env::var("MOEQ_GATHER_CHECKPOINTS").is_ok_and(|v| v == "1");
    let seen = match checkpoint::token(&config.output_dir, step) {
        Some(t) if !gather => hash(&t),
        _ => -1.0,
    };
    let all = comm
        .all_gather(&Tensor::new(&[seen], &candle_core::Device::Cpu).map_err(failed)?)
        .and_then(|v| {
            v.iter()
                .map(|t| t.to_vec1::<f64>())
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .map_err(failed)?;
    let shared = all.iter().all(|v| v[0] == all[0][0] && v[0] >= 0.0);
    if !shared && lead && !gather {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "checkpoints: some ranks do not see {} as rank 0 does (not one shared filesystem): rank 0 gathers the expert adapters and writes every checkpoint alone",
                config.output_dir.display()
            )
        });
    }
    Ok(shared)
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
