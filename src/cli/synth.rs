//! `moeq synth`: a deterministic random-init checkpoint of a preset shape.

use super::{human_bytes, CliError};
use crate::synth::{self, DiskLayout, SynthError, SynthOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// model_type: qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe, glm4_moe_lite, deepseek_v2, deepseek_v3, kimi_k2, flex_olmo, minimax_m2, ernie4_5_moe, granitemoe, hunyuan_v1_moe, gpt_oss, granitemoeshared, llama4_text, qwen3_next or qwen3_5_moe_text.
    #[arg(long)]
    arch: String,
    /// `tiny`, or a real shape: qwen3-30b-a3b, qwen3-235b-a22b, qwen1.5-moe-a2.7b, mixtral-8x7b, olmoe-1b-7b, glm-4.5-air, glm-4.7-flash, deepseek-v2-lite, deepseek-v3, kimi-k2, minimax-m2, ernie-4.5-21b-a3b, granite-3.1-1b-a400m, gpt-oss-20b, gpt-oss-120b, llama4-scout, llama4-maverick, qwen3-next-80b-a3b, qwen3.5-35b-a3b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Keep only the first N layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Expert layout on disk: `hub` (one tensor per expert), `fused` (transformers v5) or
    /// `mxfp4` (gpt-oss as released: its experts as MXFP4 blocks and scales).
    #[arg(long, default_value = "hub", value_parser = DiskLayout::parse)]
    layout: DiskLayout,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// bfloat16, float16 or float32.
    #[arg(long, default_value = "bfloat16")]
    dtype: String,
    /// Largest shard file, in MB.
    #[arg(long, default_value_t = 2000)]
    shard_size_mb: u64,
    /// Write only config.json and the tokenizer files.
    #[arg(long)]
    config_only: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: SynthArgs) -> Result<(), CliError> {
    let opts = SynthOptions {
        model_type: synth::parse_model_type(&args.arch).map_err(CliError::input)?,
        preset: args.preset,
        layers: args.layers,
        layout: args.layout,
        seed: args.seed,
        dtype: args.dtype,
        config_only: args.config_only,
        shard_bytes: args.shard_size_mb.max(1) * 1_000_000,
        force: args.force,
    };
    let started = std::time::Instant::now();
    let report = synth::write(&opts, &args.out).map_err(|e| match e {
        SynthError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    })?;
    tracing::info!(
        "wrote {} ({} tensors in {} shard(s), {}) in {:.1} s",
        report.dir.display(),
        report.tensors,
        report.shards,
        human_bytes(report.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
