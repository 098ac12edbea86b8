//! Building a run on one rank: the device, the frozen base (this rank's experts), the model,
//! the adapters, the loader and step count, the optimizer and the resume point. Every rank
//! builds its own; they agree on the step they start from.

use super::error::{failed, TrainError};
use super::resume::{restore, resume_point, save_checkpoint};
use super::setup;
use super::step::{Activations, KEEP_ATTENTION};
use super::{checkpoint, AdamW, AdamWConfig, Schedule};
use crate::arch::{ArchSpec, Model};
use crate::config::{Optimizer, TrainConfig};
use crate::data::{Loader, LoaderOptions, PreparedData};
use crate::distributed::dispatch::{expert_ranges, ExpertParallel};
use crate::distributed::group::{Layout, Subgroup};
use crate::distributed::{Communicator, RankCtx};
use crate::lora::Adapters;
use crate::model_files::frozen::{FrozenBase, SingleProcess};
use crate::model_files::{dense, ModelDir};
use crate::util::{device, phases};
use candle_core::{DType, Device, Tensor, Var};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Everything one rank trains with.
pub(crate) struct Run<'a> {
    pub config: &'a TrainConfig,
    pub spec: &'a ArchSpec,
    pub data: &'a PreparedData,
    pub comm: &'a Arc<dyn Communicator>,
    pub rank: usize,
    pub world: usize,
    pub device: Device,
    /// More than one rank, or started as part of a job: gradients and statistics are reduced.
    pub distributed: bool,
    /// Experts spread over the ranks (each holds and trains its own range).
    pub ep: bool,
    /// With `ep`: the expert-parallel group and the replicas (`ExpertRanks`).
    pub experts: ExpertRanks,
    pub model: Model,
    pub adapters: Adapters,
    /// The adapters' variables by PEFT name, and which of them every rank holds alike
    /// (`replicated`: their gradients are summed over ranks) or only this one (`owned`).
    pub vars: Vec<(String, Var)>,
    pub replicated: Vec<String>,
    pub owned: Vec<String>,
    pub loader_options: LoaderOptions,
    pub loader: Loader,
    pub opt: AdamW,
    pub schedule: Schedule,
    pub activations: Activations,
    /// Micro-batches per optimizer step.
    pub gas: usize,
    pub start_step: usize,
    pub total_steps: usize,
    pub tokens_seen: u64,
}

impl<'a> Run<'a> {
    pub fn build(
        config: &'a TrainConfig,
        dir: &'a ModelDir,
        data: &'a PreparedData,
        pad_id: u32,
        ctx: &'a RankCtx,
    ) -> Result<Run<'a>, TrainError> {
        let comm = &ctx.comm;
        let (rank, world) = (comm.rank(), comm.world_size());
        let spec = &dir.spec;
        let device =
            device::device_for_rank(&config.device, ctx.local_rank).map_err(TrainError::Input)?;
        let dtype = device::compute_dtype(config.bf16, &device);
        tracing::info!("device {:?}, compute dtype {:?}", device, dtype);
        if data.train.is_empty() {
            return Err(TrainError::Input(
                "no training samples: check `datasets` and `val_set_size`".into(),
            ));
        }
        // Expert parallelism spreads the experts over the ranks; without it (`expert_parallel:
        // false`) every rank holds all experts and only the data is split.
        // `expert_parallel_size: 1` is a group of one rank: every rank holds all experts.
        let distributed = ctx.joined || world > 1;
        let ep = distributed
            && config.expert_parallel
            && spec.num_experts > 0
            && config.expert_parallel_size != Some(1);
        let experts = expert_ranks(config, comm, ep)?;
        let held = if ep {
            let group = &experts.group;
            expert_ranges(spec.num_experts, group.world_size())[group.rank()].clone()
        } else {
            0..spec.num_experts
        };
        let model = load_model(
            config,
            dir,
            ctx,
            (&device, dtype),
            ep.then(|| (held.clone(), experts.group.clone())),
        )?;
        let adapters = make_adapters(config, spec, &device, held, rank == 0)?;
        let vars = adapters.vars();
        let expert_names = adapters.expert_var_names();
        let (replicated, owned): (Vec<String>, Vec<String>) = vars
            .iter()
            .map(|(n, _)| n.clone())
            .partition(|n| !ep || !expert_names.contains(n));

        let loader_options = LoaderOptions::from_config(config, pad_id, rank, world);
        let resume = resume_point(config, spec, rank == 0)?;
        let loader = match &resume {
            Some(r) => Loader::resume(data.train.clone(), loader_options.clone(), r.state.cursor),
            None => Loader::new(data.train.clone(), loader_options.clone()),
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
        let schedule = Schedule {
            kind: config.lr_scheduler,
            peak_lr: config.learning_rate,
            warmup_steps: config.warmup_steps_for(total_steps),
            total_steps,
            min_lr_ratio: config.cosine_min_lr_ratio.unwrap_or(0.0),
        };
        let mut opt = AdamW::new(
            adapters.vars(),
            AdamWConfig {
                beta1: config.adam_beta1,
                beta2: config.adam_beta2,
                eps: config.adam_epsilon,
                weight_decay: config.weight_decay,
                eight_bit: config.optimizer == Optimizer::AdamW8bit,
            },
        )
        .map_err(failed)?;
        tracing::info!(
            "optimizer: AdamW with {} moments, {:.1} MB of state",
            if config.optimizer == Optimizer::AdamW8bit {
                "8-bit blockwise"
            } else {
                "fp32"
            },
            opt.state_bytes() as f64 / 1e6
        );
        let start_step = match &resume {
            Some(r) => restore(r, &adapters, &mut opt, config, world)?,
            None => 0,
        };
        agree_on_start_step(comm.as_ref(), start_step)?;
        if start_step >= total_steps && resume.is_some() {
            return Err(TrainError::Input(format!(
                "resume_from_checkpoint: the checkpoint is at step {start_step}, and this run has {total_steps} steps: nothing left to train (raise max_steps, or start a new output_dir)"
            )));
        }
        let tokens_seen = resume.as_ref().map_or(0, |r| r.state.tokens_seen);
        let activations =
            Activations::from_config(config.gradient_checkpointing, config.activation_offloading);
        // Keeping the attention outputs is the faster, larger setting.
        KEEP_ATTENTION.set_unless_env(!config.recompute_attention);
        // The CPU's attention is deterministic either way.
        #[cfg(feature = "cuda")]
        crate::ops::cudnn_attn::set_deterministic_unless_env(config.full_determinism);
        if rank == 0 {
            tracing::info!("activations: {}", activations.describe());
            if activations != Activations::Keep {
                tracing::info!(
                    "attention: {}",
                    if KEEP_ATTENTION.get() {
                        "each layer's output kept for its backward"
                    } else {
                        "run again in each layer's recompute"
                    }
                );
            }
            #[cfg(feature = "cuda")]
            if !crate::ops::cudnn_attn::deterministic() {
                tracing::info!(
                    "full_determinism: false — attention's backward adds dq atomically on the GPU; reruns differ in the last bits"
                );
            }
        }
        Ok(Run {
            config,
            spec,
            data,
            comm,
            rank,
            world,
            device,
            distributed,
            ep,
            experts,
            model,
            adapters,
            vars,
            replicated,
            owned,
            loader_options,
            loader,
            opt,
            schedule,
            activations,
            gas,
            start_step,
            total_steps,
            tokens_seen,
        })
    }

    /// Writes `checkpoint-<step>` after `step` steps (every rank must call this).
    pub fn save_checkpoint(&self, step: usize) -> Result<(), TrainError> {
        let state = self.trainer_state(step);
        save_checkpoint(
            self.config,
            &self.adapters,
            &self.opt,
            &state,
            self.comm.as_ref(),
            self.ep.then(|| self.experts.group.as_ref()),
        )
    }

    /// The resume state of a checkpoint written after `step` steps.
    fn trainer_state(&self, step: usize) -> checkpoint::TrainerState {
        checkpoint::TrainerState {
            step,
            optimizer_step: self.opt.steps(),
            tokens_seen: self.tokens_seen,
            cursor: self.loader.cursor(),
            world_size: self.world,
            micro_batch_size: self.config.micro_batch_size,
            gradient_accumulation_steps: self.gas,
            seed: self.config.seed,
            model_type: self.spec.model_type.as_str().to_string(),
            num_layers: self.spec.num_layers,
            num_experts: self.spec.num_experts,
            hidden_size: self.spec.hidden_size,
        }
    }
}

/// Names every frozen weight that holds NaN or Inf (bitsandbytes quantizes them without a word):
/// a warning each, or with `strict_weights` an error before training.
fn nonfinite_weights(
    counts: &std::collections::BTreeMap<String, usize>,
    strict: bool,
) -> Result<(), TrainError> {
    let Some((first, n)) = counts.iter().next() else {
        return Ok(());
    };
    if strict {
        let more = match counts.len() {
            1 => String::new(),
            k => format!(" (and {} more tensors)", k - 1),
        };
        return Err(TrainError::Input(format!(
            "frozen weight '{first}' holds {n} NaN/Inf values{more}: repair the checkpoint, or set strict_weights: false to train with them"
        )));
    }
    for (name, n) in counts {
        tracing::warn!(
            "frozen weight '{name}' holds {n} NaN/Inf values: they are quantized as the checkpoint has them (set strict_weights: true to stop instead)"
        );
    }
    Ok(())
}

/// The model on `device` built from the frozen base: all experts, or with expert parallelism
/// only `held` (their quantization statistics gathered over the ranks).
fn load_model(
    config: &TrainConfig,
    dir: &ModelDir,
    ctx: &RankCtx,
    (device, dtype): (&Device, DType),
    spread: Option<(Range<usize>, Arc<dyn Communicator>)>,
) -> Result<Model, TrainError> {
    let (rank, world) = (ctx.comm.rank(), ctx.comm.world_size());
    let held = spread.as_ref().map(|(h, _)| h.clone());
    let spec = &dir.spec;
    let settings = setup::quant_settings(config);
    if let Some(held) = &held {
        tracing::info!(
            "rank {rank} of {world}: experts {}..{} of {}",
            held.start,
            held.end,
            spec.num_experts
        );
    }
    let base = match &held {
        _ if !config.load_in_4bit => {
            dense::load(dir, held.clone(), device, dtype).map_err(|e| e.to_string())
        }
        Some(held) => {
            // The statistics of a parameter come from every expert: from the group's ranks.
            let group = spread
                .as_ref()
                .map(|(_, g)| g.as_ref())
                .unwrap_or(ctx.comm.as_ref());
            let mut gather = setup::CommGather(group);
            setup::load_base(dir, settings, device, Some(held.clone()), &mut gather)
        }
        None => setup::load_base(dir, settings, device, None, &mut SingleProcess),
    }
    .map_err(TrainError::Input)?;
    match base.settings {
        Some(_) => tracing::info!(
            "frozen base: {:.1} MB 4-bit + {:.1} MB dense in {:.1} s",
            base.report.quantized_bytes as f64 / 1e6,
            base.report.dense_bytes as f64 / 1e6,
            base.report.seconds
        ),
        None => tracing::info!(
            "frozen base: {:.1} MB unquantized ({dtype:?}, load_in_4bit: false) in {:.1} s",
            base.report.dense_bytes as f64 / 1e6,
            base.report.seconds
        ),
    }
    nonfinite_weights(&base.report.nonfinite, config.strict_weights)?;
    if let Some(r) = phases::report(1) {
        tracing::info!("loading: {r}");
    }
    phases::mark_memory("1 load", device);
    let building = Instant::now();
    if let Some(d) = std::env::var_os("MOEQ_NF4_DIGEST") {
        write_digest(Path::new(&d), &base, rank, world)?;
    }
    let model = Model::new(spec, &base, dtype, device, config.sequence_len + 1)
        .and_then(|m| match spread {
            Some((_, group)) => {
                m.with_exchange(Arc::new(ExpertParallel::new(group, spec.num_experts)))
            }
            None => Ok(m),
        })
        .map_err(|e| TrainError::Input(e.to_string()))?;
    drop(base);
    let on = if device.is_cuda() {
        "the GPU"
    } else {
        "the CPU"
    };
    tracing::info!(
        "model on {on}: built in {:.1} s",
        building.elapsed().as_secs_f64()
    );
    phases::mark_memory("2 model built", device);
    Ok(model)
}

/// Expert parallelism's communicators: the group that spreads the experts (the whole world
/// unless `expert_parallel_size` is smaller) and, with several groups, the ranks that hold the
/// same experts as this one (their expert gradients are summed).
pub(crate) struct ExpertRanks {
    pub group: Arc<dyn Communicator>,
    pub replicas: Option<Arc<dyn Communicator>>,
}

fn expert_ranks(
    config: &TrainConfig,
    comm: &Arc<dyn Communicator>,
    ep: bool,
) -> Result<ExpertRanks, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let size = match config.expert_parallel_size {
        Some(size) if ep => size,
        _ => world,
    };
    if size == world {
        return Ok(ExpertRanks {
            group: comm.clone(),
            replicas: None,
        });
    }
    let layout = Layout::new(size, world).map_err(TrainError::Input)?;
    let group = Subgroup::new(comm.clone(), layout.group_of(rank)).map_err(failed)?;
    let replicas = Subgroup::new(comm.clone(), layout.replicas_of(rank)).map_err(failed)?;
    if rank == 0 {
        tracing::info!(
            "expert parallel: {} groups of {size} ranks, each holding every expert once; expert gradients summed over the groups",
            world / size
        );
    }
    Ok(ExpertRanks {
        group: Arc::new(group),
        replicas: Some(Arc::new(replicas)),
    })
}

/// Model types whose checkpoints transformers 5 converts with qwen2_moe's pattern: for them
/// PEFT 0.21 reads `gate_proj`/`up_proj`/`down_proj` in `target_modules` as the fused experts.
const PEFT_CONVERTS: &[&str] = &[
    "qwen3_moe",
    "olmoe",
    "glm4_moe",
    "glm4_moe_lite",
    "deepseek_v2",
    "deepseek_v3",
];

/// One warning when adapters on dense MLPs or shared experts (`gate_proj`, `up_proj`,
/// `down_proj`) of such a model would not load in PEFT.
fn warn_peft_conversion(spec: &ArchSpec, adapters: &Adapters) {
    let mlp = |n: &str| {
        ["gate_proj", "up_proj", "down_proj"]
            .iter()
            .any(|p| n.ends_with(p))
    };
    let hit = adapters.linear.keys().filter(|n| mlp(n)).count();
    if hit > 0 && PEFT_CONVERTS.contains(&spec.model_type.as_str()) {
        tracing::warn!(
            "lora_target_modules: {hit} adapters on dense-MLP and shared-expert projections (gate_proj, up_proj, down_proj): moeq trains and loads them, but PEFT 0.21 on transformers 5 reads those names of a {} model as its fused experts and will not load this adapter; leave them out for a PEFT-loadable adapter and target the experts with lora_target_parameters",
            spec.model_type.as_str()
        );
    }
}

/// Warns when a hybrid model's linear-attention layers get no adapter (the default targets,
/// q/k/v/o, name only its full-attention layers' projections), naming the projections to add.
fn warn_unadapted_linear_attention(spec: &ArchSpec, adapters: &Adapters) {
    let Some(l) = spec.linear_attn else { return };
    let linear = spec.linear_layers.iter().filter(|&&on| on).count();
    if linear == 0 || adapters.linear.keys().any(|p| p.contains(".linear_attn.")) {
        return;
    }
    let names = match l.projections {
        crate::arch::LinearProjections::Split => {
            "in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj"
        }
        crate::arch::LinearProjections::Grouped => "in_proj_qkvz, in_proj_ba, out_proj",
    };
    let full = spec.linear_layers.len() - linear;
    let others = if adapters.linear.keys().any(|p| p.contains(".self_attn.")) {
        format!(" (only its {full} full-attention layers)")
    } else {
        String::new()
    };
    tracing::warn!(
        "lora_target_modules adapt none of this {} model's {linear} linear-attention layers{others}: add {names} to lora_target_modules, or use all-linear",
        spec.model_type.as_str(),
    );
}

/// The adapters of the configured targets (expert adapters for the `held` experts); warns
/// (on the lead rank) about target modules that match nothing.
fn make_adapters(
    config: &TrainConfig,
    spec: &ArchSpec,
    device: &Device,
    held: Range<usize>,
    lead: bool,
) -> Result<Adapters, TrainError> {
    let adapters = Adapters::for_experts(
        spec,
        setup::lora_settings(config),
        config.seed,
        device,
        held,
    )
    .map_err(failed)?;
    if adapters.linear.is_empty() && adapters.experts.is_empty() {
        return Err(TrainError::Input(
            "no LoRA targets matched: set lora_target_modules (q_proj, k_proj, …) and/or lora_target_parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj)".into(),
        ));
    }
    if lead {
        warn_peft_conversion(spec, &adapters);
    }
    for m in &adapters.settings.target_modules {
        let matched = adapters
            .linear
            .keys()
            .any(|p| crate::arch::target_matches(p, m));
        if !lead || m == "all-linear" || matched {
            continue;
        }
        let expert_name =
            ["gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"].contains(&m.as_str());
        let hint = if expert_name && spec.num_experts > 0 {
            " (the experts of this model are fused 3-D parameters: target them with lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj])"
        } else {
            ""
        };
        tracing::warn!(
            "lora_target_modules: '{m}' matches no module of this {} model{hint}",
            spec.model_type.as_str()
        );
    }
    if lead {
        warn_unadapted_linear_attention(spec, &adapters);
    }
    tracing::info!(
        "LoRA: {} linear and {} expert adapters, {} trainable parameters ({} on this rank)",
        adapters.linear.len(),
        adapters.experts.len(),
        adapters.num_params_global(),
        adapters.num_params()
    );
    if let Some(dir) = &config.lora_model_dir {
        super::resume::start_from_adapter(&adapters, dir, spec)?;
        tracing::info!("LoRA: starting from the adapter in {}", dir.display());
    }
    Ok(adapters)
}

/// Every rank must continue from the same step (output_dir on a filesystem they share).
fn agree_on_start_step(comm: &dyn Communicator, start_step: usize) -> Result<(), TrainError> {
    let rank = comm.rank();
    let steps = comm
        .all_gather(&Tensor::new(&[start_step as f64], &Device::Cpu).map_err(failed)?)
        .and_then(|v| {
            v.iter()
                .map(|t| t.to_vec1::<f64>())
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .map_err(failed)?;
    match steps
        .iter()
        .enumerate()
        .find(|(_, s)| s[0] as usize != start_step)
    {
        Some((r, s)) => Err(TrainError::Input(format!(
            "resume: rank {rank} continues from step {start_step} but rank {r} from step {}: output_dir must be on a filesystem every rank sees the same way",
            s[0]
        ))),
        None => Ok(()),
    }
}

/// Writes the NF4 digests of this rank's frozen base into `dir` (`MOEQ_NF4_DIGEST`), to compare
/// loads across world sizes.
fn write_digest(
    dir: &Path,
    base: &FrozenBase,
    rank: usize,
    world: usize,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let path = dir.join(format!("nf4-rank{rank}-of-{world}.json"));
    let digest = crate::model_files::frozen::digest(base).map_err(failed)?;
    let text = serde_json::to_string_pretty(&digest).map_err(failed)?;
    std::fs::write(&path, text).map_err(|e| failed(format!("{}: {e}", path.display())))
}
