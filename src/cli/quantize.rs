//! `moeq quantize`: write a pre-quantized checkpoint (bitsandbytes 4-bit format, transformers
//! v5 names) that `moeq train` loads without quantizing again: quantize once, train many times.

use super::{human_bytes, CliError};
use crate::model_files::frozen::{self, CpuQuantizer, SingleProcess, SliceQuantizer};
use crate::model_files::{prequantized, ModelDir, ModelFilesError};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Source model directory (Hugging Face layout, bf16/f16/f32 weights).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist, or pass --force).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    quant: super::QuantFlags,
    /// `cpu`, or `cuda` / `cuda:N` (needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest output shard, in MB.
    #[arg(long, default_value_t = 4000)]
    shard_size_mb: u64,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

fn quantizer(device: &str) -> Result<Box<dyn SliceQuantizer>, CliError> {
    // Quantization runs where it is told: no `auto`.
    let ordinal = match crate::config::DeviceChoice::parse(device) {
        Some(crate::config::DeviceChoice::Cpu) => return Ok(Box::new(CpuQuantizer)),
        Some(crate::config::DeviceChoice::Cuda(n)) => n.unwrap_or(0),
        _ => {
            return Err(CliError::Input(format!(
                "--device '{device}': use cpu, cuda or cuda:N"
            )))
        }
    };
    #[cfg(feature = "cuda")]
    {
        Ok(Box::new(
            frozen::CudaQuantizer::new(ordinal).map_err(CliError::failed)?,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(CliError::Input(format!(
            "--device {device}: this moeq was built without CUDA; rebuild with --features cuda or use --device cpu"
        )))
    }
}

pub fn run(args: QuantizeArgs) -> Result<(), CliError> {
    let settings = args.quant.settings()?;
    if args.out.exists() && !args.force {
        return Err(CliError::Input(format!(
            "{}: already exists (choose another --out or pass --force)",
            args.out.display()
        )));
    }
    let started = std::time::Instant::now();
    let input_err = |e: ModelFilesError| match e {
        ModelFilesError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    };
    let dir = ModelDir::open(&args.model).map_err(input_err)?;
    if !dir.has_weights() {
        return Err(CliError::Input(format!(
            "{}: no weights to quantize (only config.json)",
            args.model.display()
        )));
    }
    if frozen::prequantized(&dir).is_some() {
        return Err(CliError::Input(format!(
            "{}: already a pre-quantized checkpoint",
            args.model.display()
        )));
    }
    let mut q = quantizer(&args.device)?;
    let base =
        frozen::load(&dir, settings, None, q.as_mut(), &mut SingleProcess).map_err(input_err)?;
    for (name, n) in &base.report.nonfinite {
        tracing::warn!("'{name}' holds {n} NaN/Inf values: quantized as the checkpoint has them");
    }
    if args.force && args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .map_err(|e| CliError::Failed(format!("{}: {e}", args.out.display())))?;
    }
    let written = prequantized::write(
        &dir,
        &base,
        &args.out,
        args.shard_size_mb.max(1) * 1_000_000,
    )
    .map_err(input_err)?;
    let r = &base.report;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "quantized {} → {} ({} {}, blocksize {}, double quant {}) on {}",
        args.model.display(),
        args.out.display(),
        human_bytes(r.bytes_read),
        dir.spec.torch_dtype.as_deref().unwrap_or("weights"),
        settings.blocksize,
        settings.double_quant,
        args.device
    );
    println!(
        "written {} (4-bit {} + dense {}) in {secs:.1} s ({:.2} GB/s of weights read; quantization {:.1} s)",
        human_bytes(written),
        human_bytes(r.quantized_bytes),
        human_bytes(r.dense_bytes),
        r.bytes_read as f64 / secs / 1e9,
        r.seconds
    );
    let anon = crate::util::mem::peak_anon_bytes();
    let rss = crate::util::mem::peak_rss_bytes().unwrap_or(0);
    println!(
        "peak host memory {} allocated (sampled RssAnon; the 4-bit result is {}), {} resident including mapped checkpoint pages",
        human_bytes(anon),
        human_bytes(r.quantized_bytes + r.dense_bytes),
        human_bytes(rss)
    );
    if let Some(gpu) = r.peak_device_bytes {
        println!(
            "peak GPU memory {} (4-bit total {})",
            human_bytes(gpu),
            human_bytes(r.quantized_bytes)
        );
    }
    Ok(())
}
