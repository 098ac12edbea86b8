//! `moeq gpu-check`: runs every CUDA op on random data and compares it with its CPU reference,
//! forward and backward. Exit code 0 only if all comparisons are within tolerance.

use super::CliError;

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: GpuCheckArgs) -> Result<(), CliError> {
    Err(CliError::Input(
        "gpu-check: this moeq was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
    ))
}

#[cfg(feature = "cuda")]
pub fn run(args: GpuCheckArgs) -> Result<(), CliError> {
    let device = candle_core::Device::new_cuda(args.device).map_err(CliError::failed)?;
    let mut results = crate::ops::check::run_all(&device).map_err(CliError::failed)?;
    results.extend(crate::quant::gpu_check::run_all(&device).map_err(CliError::failed)?);
    results.extend(crate::train::check::run_all(&device).map_err(CliError::failed)?);
    let mut failed = 0;
    for r in &results {
        println!("{r}");
        failed += usize::from(!r.passed());
    }
    println!("{} passed, {} failed", results.len() - failed, failed);
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "gpu-check: {failed} comparison(s) out of tolerance"
        )));
    }
    Ok(())
}
