//! `moeq merge`: the base checkpoint with an adapter's updates added to its weights
//! (`lora::merge`), in the base's own layout and key names, for serving without PEFT. Reads
//! moeq's and PEFT's adapters; writes a new directory beside `--out` and renames it into place
//! once complete.

use super::CliError;
use crate::lora::{merge, peft};
use crate::model_files::{ModelDir, ModelFilesError};
use candle_core::DType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model directory (unquantized safetensors, the one the adapter was trained on).
    #[arg(long)]
    model: PathBuf,
    /// The adapter directory (adapter_config.json + adapter_model.safetensors; moeq's or PEFT's).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model (a new folder).
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the written weights: bf16, f16 or f32 (default: each tensor's own).
    #[arg(long)]
    dtype: Option<String>,
}

pub fn run(args: MergeArgs) -> Result<(), CliError> {
    let dtype = match args.dtype.as_deref() {
        None => None,
        Some("bf16") => Some(DType::BF16),
        Some("f16") => Some(DType::F16),
        Some("f32") => Some(DType::F32),
        Some(other) => {
            return Err(CliError::Input(format!(
                "--dtype '{other}': use bf16, f16 or f32"
            )))
        }
    };
    if args.out.exists() {
        return Err(CliError::Input(format!(
            "--out {}: already exists; name a new folder",
            args.out.display()
        )));
    }
    let dir = ModelDir::open(&args.model).map_err(CliError::input)?;
    let adapters =
        peft::load(&args.adapter, &dir.spec, &candle_core::Device::Cpu).map_err(CliError::Input)?;
    let started = std::time::Instant::now();
    let report = merge::merge(&dir, &adapters, &args.out, dtype).map_err(|e| match e {
        ModelFilesError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    })?;
    crate::util::mem::sample_peak();
    tracing::info!(
        "merged {} adapters into {} of {} tensors ({:.1} MB) in {:.1} s, peak host memory {:.0} MB (anonymous; the checkpoint is memory-mapped): {}",
        adapters.linear.len() + adapters.experts.len(),
        report.merged,
        report.tensors,
        report.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        crate::util::mem::peak_anon_bytes() as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
