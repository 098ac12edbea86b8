//! Resumable checkpoints (docs/ARCHITECTURE.md, decision 13): `output_dir/checkpoint-<step>/` holds
//! - the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), keyed by global
//!   expert index: whole, or with the expert adapters in parts (below);
//! - `optimizer.safetensors`: AdamW's fp32 moments `<PEFT name>.exp_avg` / `.exp_avg_sq`, in
//!   the same whole-parameter layout;
//! - `trainer_state.json`: step, optimizer step, tokens seen, the data cursor, the world size
//!   and batch shape it was written with, and what model it belongs to;
//! - `config.yaml`: the resolved config;
//! - `COMPLETE`: the marker, written last.
//!
//! With experts spread over the ranks and an output_dir every rank sees, the expert adapters
//! and their moments are not gathered: each rank of the first expert-parallel group writes its
//! own experts' part (`lora::parts`: `experts-<first>-<end>-of-<total>.safetensors`, keyed by
//! global expert index) and `adapter_model.safetensors` / `optimizer.safetensors` hold the rest;
//! readers join the parts, whatever world size resumes.
//!
//! Rank 0 makes `.checkpoint-<step>.tmp/`, every writer fills it and syncs its files, and after
//! a barrier (every part written) rank 0 syncs it, renames it and writes the marker. A directory without the marker
//! is not a checkpoint: it is ignored and cleaned up. Dropout masks are keyed by the seed, the
//! micro-batch's global index and the module name, so no random-number state needs saving.

use crate::arch::ArchSpec;
use crate::data::DataCursor;
use crate::lora::{peft, Adapters};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MARKER: &str = "COMPLETE";
/// Written first into every checkpoint moeq writes: only directories carrying it are cleaned
/// up when incomplete (another tool's `checkpoint-N` in output_dir is left alone).
const OURS: &str = ".moeq-checkpoint";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Training steps done (the next step to run).
    pub step: usize,
    /// Updates the optimizer applied (fewer than `step` when steps were skipped).
    pub optimizer_step: usize,
    pub tokens_seen: u64,
    pub cursor: DataCursor,
    pub world_size: usize,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
    pub model_type: String,
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden_size: usize,
}

impl TrainerState {
    /// Rows of data one optimizer step reads, all ranks together.
    pub fn global_rows(&self) -> usize {
        self.world_size * self.micro_batch_size * self.gradient_accumulation_steps
    }
}

/// What a checkpoint restores.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    /// Adapter tensors by PEFT name, whole.
    pub adapter: BTreeMap<String, Tensor>,
    /// Optimizer moments by `<PEFT name>.exp_avg` / `.exp_avg_sq`, whole.
    pub moments: BTreeMap<String, Tensor>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| io(path, e))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

pub fn path_for(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes everything but the marker into `checkpoint-<step>` (via a temporary directory and a
/// rename). `adapters` and `moments` are whole (gathered).
pub fn write_files(
    output_dir: &Path,
    adapters: &Adapters,
    moments: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    base_model: &str,
    config_yaml: &str,
) -> Result<PathBuf, String> {
    let tmp = begin(output_dir, state.step)?;
    let tensors: BTreeMap<String, Tensor> = peft::named_tensors(adapters)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    write_lead(
        &tmp,
        adapters,
        &tensors,
        moments,
        state,
        (base_model, config_yaml),
    )?;
    finish(output_dir, state.step)
}

/// The temporary directory a checkpoint of `step` is written into.
pub fn tmp_path(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!(".checkpoint-{}.tmp", step))
}

/// Makes the temporary directory of `step`'s checkpoint, empty but for moeq's mark (holding
/// `token`: what the other ranks look for to know they see the same directory).
pub fn begin_with(output_dir: &Path, step: usize, token: &str) -> Result<PathBuf, String> {
    let tmp = tmp_path(output_dir, step);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    write_synced(&tmp.join(OURS), token.as_bytes())?;
    sync_dir(output_dir);
    Ok(tmp)
}

fn begin(output_dir: &Path, step: usize) -> Result<PathBuf, String> {
    begin_with(output_dir, step, "")
}

/// What `begin_with` wrote as the token of `step`'s temporary directory, as this rank sees
/// it (None: no such directory here).
pub fn token(output_dir: &Path, step: usize) -> Option<String> {
    std::fs::read_to_string(tmp_path(output_dir, step).join(OURS)).ok()
}

/// Rank 0's files: the adapter's config (from `adapters`, every target) with `tensors`, the
/// optimizer `moments`, the trainer state and `(base model, resolved config)`.
pub fn write_lead(
    tmp: &Path,
    adapters: &Adapters,
    tensors: &BTreeMap<String, Tensor>,
    moments: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    (base_model, config_yaml): (&str, &str),
) -> Result<(), String> {
    peft::save_with(adapters, base_model, tmp, tensors).map_err(|e| io(tmp, e))?;
    peft::write_f32(&tmp.join(OPTIMIZER), moments).map_err(|e| io(&tmp.join(OPTIMIZER), e))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
    write_synced(&tmp.join(STATE), text.as_bytes())?;
    write_synced(&tmp.join("config.yaml"), config_yaml.as_bytes())
}

/// One rank's expert part (`lora::parts`): its experts' adapter tensors and moments.
pub fn write_part(
    tmp: &Path,
    experts: &std::ops::Range<usize>,
    total: usize,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), String> {
    let path = tmp.join(crate::lora::parts::file_name(experts, total));
    peft::write_f32(&path, tensors).map_err(|e| io(&path, e))
}

/// Syncs the temporary directory of `step` and renames it to `checkpoint-<step>` (replacing
/// one of that name).
pub fn finish(output_dir: &Path, step: usize) -> Result<PathBuf, String> {
    let (tmp, dir) = (tmp_path(output_dir, step), path_for(output_dir, step));
    sync_dir(&tmp);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    sync_dir(output_dir);
    Ok(dir)
}

/// Marks a checkpoint written by `write_files` complete.
pub fn mark_complete(dir: &Path) -> Result<(), String> {
    write_synced(&dir.join(MARKER), b"ok\n")?;
    sync_dir(dir);
    Ok(())
}

pub fn is_complete(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// `checkpoint-<step>` directories of `output_dir`, by step.
fn listed(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint of `output_dir`.
pub fn newest_complete(output_dir: &Path) -> Option<PathBuf> {
    listed(output_dir)
        .into_iter()
        .rev()
        .find(|(_, p)| is_complete(p))
        .map(|(_, p)| p)
}

/// Removes checkpoints without their marker and temporary directories left by an interrupted
/// write. Returns what was removed.
pub fn clean_incomplete(output_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (_, p) in listed(output_dir) {
        if p.join(OURS).exists() && !is_complete(&p) && std::fs::remove_dir_all(&p).is_ok() {
            removed.push(p);
        }
    }
    if let Ok(entries) = std::fs::read_dir(output_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".checkpoint-")
                && name.ends_with(".tmp")
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed.push(e.path());
            }
        }
    }
    removed
}

/// Keeps the newest `limit` complete checkpoints, and always `keep` (the one just written,
/// which may be older than others left by an earlier run).
pub fn prune(output_dir: &Path, limit: usize, keep: &Path) {
    let complete: Vec<PathBuf> = listed(output_dir)
        .into_iter()
        .filter(|(_, p)| is_complete(p) && p.join(OURS).exists() && p != keep)
        .map(|(_, p)| p)
        .collect();
    let limit = limit.saturating_sub(1);
    let excess = complete.len().saturating_sub(limit);
    for path in complete.into_iter().take(excess) {
        // The marker goes first: a half-removed checkpoint is never taken for a complete one.
        let _ = std::fs::remove_file(path.join(MARKER));
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!("save_total_limit: cannot remove {}: {e}", path.display());
        }
    }
}

/// Reads a complete checkpoint and checks that it belongs to a model of `spec`.
pub fn read(dir: &Path, spec: &ArchSpec) -> Result<Loaded, String> {
    if !dir.is_dir() {
        return Err(format!(
            "resume_from_checkpoint: {} does not exist (use `auto` for the newest checkpoint of output_dir)",
            dir.display()
        ));
    }
    if !is_complete(dir) {
        return Err(format!(
            "resume_from_checkpoint: {} has no {MARKER} marker: it was not written completely (pick an older checkpoint, or `auto`)",
            dir.display()
        ));
    }
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| io(&state_path, format!("unreadable: {e}")))?;
    let mine = (
        spec.model_type.as_str().to_string(),
        spec.num_layers,
        spec.num_experts,
        spec.hidden_size,
    );
    let theirs = (
        state.model_type.clone(),
        state.num_layers,
        state.num_experts,
        state.hidden_size,
    );
    if mine != theirs {
        return Err(format!(
            "resume_from_checkpoint: {} was written for a {} model with {} layers, {} experts, hidden size {}; this run's base model is a {} with {} layers, {} experts, hidden size {} (point base_model at the checkpoint's model, or start without resuming)",
            dir.display(), theirs.0, theirs.1, theirs.2, theirs.3, mine.0, mine.1, mine.2, mine.3
        ));
    }
    let mut adapter = peft::read_f32(&dir.join("adapter_model.safetensors"))?;
    let mut moments = peft::read_f32(&dir.join(OPTIMIZER))?;
    for (name, t) in crate::lora::parts::join(dir)?.unwrap_or_default() {
        let moment = name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq");
        let into = if moment { &mut moments } else { &mut adapter };
        if into.insert(name.clone(), t).is_some() {
            return Err(format!(
                "{}: '{name}' is both in an expert part and in the whole files: the checkpoint is damaged",
                dir.display()
            ));
        }
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        adapter,
        moments,
        state,
    })
}
