//! `moeq inspect`: what a model directory holds and what QLoRA training of it will need.
//! Works from config.json alone (weights absent) and from full checkpoints.

use super::{human_bytes, human_count, CliError};
use crate::arch::{
    estimate, ArchSpec, Component, FrozenFormat, LoraPlan, QkNorm, RouterSpec, Scoring,
};
use crate::config::{TargetModules, TrainConfig};
use crate::model_files::{ModelDir, ModelFilesError};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face model directory (config.json, optionally safetensors weights).
    dir: PathBuf,
    /// Take LoRA targets, rank and quantization settings from this training config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// GPUs the run spreads the experts over (as `moeq-launch --nproc`): the memory estimate
    /// is per GPU.
    #[arg(long, alias = "gpus", default_value_t = 1)]
    nproc: usize,
}

struct Settings {
    lora: LoraPlan,
    format: FrozenFormat,
    /// Whether the experts are spread over the GPUs (`expert_parallel`), and over how many
    /// (`expert_parallel_size`; None: all).
    expert_parallel: bool,
    expert_parallel_size: Option<usize>,
    /// The config's `model_config` overrides of config.json (applied as `train` applies them).
    model_config: serde_json::Map<String, serde_json::Value>,
    source: String,
}

fn settings(config: Option<&PathBuf>) -> Result<Settings, CliError> {
    let Some(path) = config else {
        return Ok(Settings {
            lora: LoraPlan {
                r: 16,
                // Every attention projection either form has (latent attention: q_proj or
                // q_a/q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).
                modules: ["q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
                    .map(String::from)
                    .to_vec(),
                parameters: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"].map(String::from).to_vec(),
            },
            format: FrozenFormat::FourBit {
                blocksize: 64,
                double_quant: true,
            },
            expert_parallel: true,
            expert_parallel_size: None,
            model_config: Default::default(),
            source: "defaults: r=16 on the attention projections and both expert parameters; pass --config for a run's settings".into(),
        });
    };
    let outcome = TrainConfig::from_file(path).map_err(CliError::input)?;
    let c = outcome.config;
    let modules = match &c.lora_target_modules {
        TargetModules::AllLinear => vec!["all-linear".to_string()],
        TargetModules::Named(m) => m.clone(),
    };
    Ok(Settings {
        lora: LoraPlan {
            r: c.lora_r,
            modules,
            parameters: c.lora_target_parameters.clone(),
        },
        format: match c.load_in_4bit {
            true => FrozenFormat::FourBit {
                blocksize: c.quant_blocksize,
                double_quant: c.bnb_4bit_use_double_quant,
            },
            false => FrozenFormat::SixteenBit,
        },
        expert_parallel: c.expert_parallel,
        expert_parallel_size: c.expert_parallel_size,
        model_config: c.model_config.clone(),
        source: format!("from {}", path.display()),
    })
}

pub fn run(args: InspectArgs) -> Result<(), CliError> {
    if args.nproc == 0 {
        return Err(CliError::Input(
            "--nproc 0: give the number of GPUs, 1 or more".into(),
        ));
    }
    let settings = settings(args.config.as_ref())?;
    let mut dir = ModelDir::open(&args.dir).map_err(|e| match e {
        ModelFilesError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    })?;
    if !settings.model_config.is_empty() {
        dir.apply_overrides(&settings.model_config)
            .map_err(CliError::Input)?;
    }
    print!(
        "{}",
        report(&dir, &settings, args.nproc).map_err(CliError::input)?
    );
    Ok(())
}

fn report(dir: &ModelDir, s: &Settings, nproc: usize) -> Result<String, ModelFilesError> {
    let spec: &ArchSpec = &dir.spec;
    let mut o = String::new();
    let arch = spec
        .architectures
        .first()
        .map(String::as_str)
        .unwrap_or("-");
    let _ = writeln!(
        o,
        "model       {} ({}, {arch})",
        dir.root.display(),
        spec.model_type.as_str()
    );
    let dense = spec.num_layers - spec.num_moe_layers();
    let _ = writeln!(
        o,
        "shape       {} layers ({} MoE, {dense} dense), hidden {}, heads {}/{} x {}, vocab {}, tied embeddings: {}",
        spec.num_layers, spec.num_moe_layers(), spec.hidden_size, spec.num_heads, spec.num_kv_heads,
        spec.head_dim, spec.vocab_size, spec.tie_word_embeddings
    );
    let shared = match spec.shared_expert {
        None => "none".to_string(),
        Some(x) if x.gated => format!("I={} with sigmoid gate", x.intermediate_size),
        Some(x) => format!("I={} summed", x.intermediate_size),
    };
    let _ = writeln!(
        o,
        "experts     {} per MoE layer, top-{} ({}), expert I={}; shared expert: {shared}",
        spec.num_experts,
        spec.router.top_k,
        router_words(&spec.router),
        spec.expert_intermediate_size
    );
    let _ = writeln!(o, "attention   {}", attention_words(spec));
    if let Some(l) = spec.linear_attn {
        let linear = spec.linear_layers.iter().filter(|&&x| x).count();
        let _ = writeln!(
            o,
            "linear      Gated DeltaNet on {linear} of {} layers (full attention{} on the others): {} key heads x {}, {} value heads x {}, conv {}",
            spec.num_layers,
            if spec.attn_output_gate { " with an output gate" } else { "" },
            l.key_heads,
            l.key_head_dim,
            l.value_heads,
            l.value_head_dim,
            l.conv_kernel
        );
    }
    let _ = writeln!(
        o,
        "parameters  {} total, {} active per token ({} without the input embedding, {} without both embedding tables)",
        human_count(spec.total_params()),
        human_count(spec.active_params()),
        human_count(spec.active_params_without(&[Component::Embedding])),
        human_count(spec.active_params_without(&[Component::Embedding, Component::LmHead]))
    );
    if spec.mtp_layers > 0 {
        let _ = writeln!(
            o,
            "mtp         {} multi-token-prediction layer(s) in the checkpoint: not counted, not loaded, not trained",
            spec.mtp_layers
        );
    }
    let on_disk: Option<BTreeMap<String, u64>> = if dir.has_weights() {
        let layout = dir.layout().map(|l| l.label()).unwrap_or("-");
        let dtype = spec.torch_dtype.as_deref().unwrap_or("unknown dtype");
        let _ = writeln!(
            o,
            "weights     {} shard(s), {dtype}, expert layout {layout}",
            dir.shards().len()
        );
        Some(dir.disk_bytes()?)
    } else {
        let _ = writeln!(
            o,
            "weights     none (config.json only): sizes below are computed for bf16"
        );
        None
    };
    let mut by_component: BTreeMap<Component, (u64, u64)> = BTreeMap::new();
    for p in spec.params() {
        let bytes = match &on_disk {
            Some(map) => map.get(&p.name).copied().unwrap_or(0),
            None => 2 * p.numel() as u64,
        };
        let entry = by_component.entry(p.component).or_default();
        entry.0 += p.numel() as u64;
        entry.1 += bytes;
    }
    let _ = writeln!(o, "\ncomponent        parameters        bytes");
    for (c, (n, b)) in &by_component {
        let _ = writeln!(
            o,
            "  {:<14} {:>10} {:>12}",
            c.label(),
            human_count(*n),
            human_bytes(*b)
        );
    }
    let ranks = match s.expert_parallel {
        true => s.expert_parallel_size.unwrap_or(nproc).min(nproc),
        false => 1,
    };
    let est = estimate(spec, s.format, 2, &s.lora, ranks);
    let (what, frozen_label) = match s.format {
        FrozenFormat::FourBit {
            blocksize,
            double_quant,
        } => (
            format!("QLoRA memory estimate (NF4 blocksize {blocksize}, double quant {double_quant}, compute bf16"),
            "NF4 frozen weights          ",
        ),
        FrozenFormat::SixteenBit => (
            "16-bit LoRA memory estimate (load_in_4bit: false: unquantized base, compute bf16".to_string(),
            "bf16 frozen weights         ",
        ),
    };
    let gpus = match (nproc, ranks) {
        (1, _) => "one GPU".to_string(),
        (n, 1) => format!("per GPU of {n}, each holding every expert"),
        (n, g) => format!(
            "per GPU of {n}, each holding at most {} of {} experts (groups of {g})",
            spec.num_experts.div_ceil(g),
            spec.num_experts
        ),
    };
    let _ = writeln!(o, "\n{what}; {gpus}; {})", s.source);
    let _ = writeln!(o, "  {frozen_label} {:>12}", human_bytes(est.frozen_linear));
    let _ = writeln!(
        o,
        "  bf16 embeddings/norms/router {:>12}",
        human_bytes(est.dense_weights)
    );
    let _ = writeln!(
        o,
        "  LoRA r={} ({} linear + {} expert params), fp32 + grads + AdamW {:>10}",
        s.lora.r,
        human_count(est.lora_params_linear),
        human_count(est.lora_params_experts),
        human_bytes(est.lora_and_optimizer)
    );
    let _ = writeln!(
        o,
        "  total before activations     {:>12}",
        human_bytes(est.total())
    );
    // Activations come on top (measured, not estimated: BENCHMARKS.md).
    let fits: Vec<String> = [24u64, 48, 80, 141]
        .iter()
        .map(|&gb| {
            let ok = est.total() < gb * 1_000_000_000;
            format!("{gb} GB {}", if ok { "yes" } else { "no" })
        })
        .collect();
    let _ = writeln!(o, "  weights fit a GPU of          {}", fits.join(", "));
    Ok(o)
}

/// The router in words: scoring, choice and weights.
fn router_words(r: &RouterSpec) -> String {
    let mut words = vec![match r.scoring {
        Scoring::Softmax => "softmax".to_string(),
        Scoring::Sigmoid => "sigmoid".to_string(),
    }];
    if r.correction_bias {
        words.push("bias-corrected choice".into());
    }
    if let Some(g) = r.group_limit {
        words.push(format!("best {} of {} groups", g.keep, g.groups));
    }
    words.push(match r.renormalize {
        true => "renormalised".into(),
        false => "not renormalised".into(),
    });
    if r.scaling != 1.0 {
        words.push(format!("scaled by {}", r.scaling));
    }
    if r.weights_input {
        words.push("weights on the expert input".into());
    }
    words.join(", ")
}

/// The attention in words: its form, norms, biases and rotary embedding.
fn attention_words(spec: &ArchSpec) -> String {
    let rope = format!(
        "rope theta {} ({}, {} of {} dims{}), max positions {}",
        spec.rope.theta,
        spec.rope.rope_type,
        spec.rotary.dim,
        spec.latent.map_or(spec.head_dim, |l| l.rope_dim),
        if spec.rotary.interleaved {
            ", interleaved"
        } else {
            ""
        },
        spec.max_position_embeddings
    );
    match spec.latent {
        Some(l) => format!(
            "latent (MLA): q rank {}, kv rank {}, q/k head {}+{}, v head {}; {rope}",
            l.q_lora_rank.map_or("full".to_string(), |r| r.to_string()),
            l.kv_lora_rank,
            l.nope_dim,
            l.rope_dim,
            l.v_head_dim
        ),
        None => {
            let windowed = spec.attention_windows.iter().flatten().count();
            let window = match spec.attention_windows.iter().flatten().next() {
                Some(w) => format!(
                    ", sliding window {w} on {windowed} of {} layers",
                    spec.num_layers
                ),
                None => String::new(),
            };
            let sinks = if spec.attention_sinks { ", sinks" } else { "" };
            let qk_norm = match spec.qk_norm {
                QkNorm::None => "none",
                QkNorm::PerHead => "per head",
                QkNorm::FullProjection => "over the whole projection",
                QkNorm::PerHeadAfterRotary => "per head, after the rotation",
                QkNorm::L2AfterRotary => "weightless (L2), per head, after the rotation",
            };
            format!(
                "q/k norm {qk_norm}, qkv bias {}{window}{sinks}{}, {rope}",
                spec.qkv_bias,
                llama4_words(spec)
            )
        }
    }
}

/// Llama 4's chunked attention and NoPE layers (empty for the other types).
fn llama4_words(spec: &ArchSpec) -> String {
    let mut words = String::new();
    let chunked = spec.attention_chunks.iter().flatten().count();
    if let Some(c) = spec.attention_chunks.iter().flatten().next() {
        let _ = write!(
            words,
            ", chunks of {c} on {chunked} of {} layers",
            spec.num_layers
        );
    }
    let nope = spec.rope_layers.iter().filter(|r| !**r).count();
    if nope > 0 {
        let _ = write!(words, ", no rope on {nope} layers");
        if let Some(t) = spec.nope_temperature {
            let _ = write!(
                words,
                " (q temperature scale {}, floor {})",
                t.scale, t.floor
            );
        }
    }
    words
}
