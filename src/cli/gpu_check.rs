//! `moeq gpu-check`: prints the tolerance table, then runs every GPU path on random data against
//! its CPU reference (`gpu_check::run_all`: the ops forward and backward, the quantization
//! kernels, the training step). Exit code 0 only if all comparisons are within tolerance.
//! `--tolerances` prints the table only (any build).

use super::CliError;
use crate::gpu_check::tolerance;

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Print the tolerance table (op, dtype, pass, rtol, atol, why) and exit.
    #[arg(long)]
    tolerances: bool,
    /// Run one part only: the ops, the quantization kernels, or the training step
    /// (default: all three, in that order).
    #[arg(long, value_enum)]
    only: Option<crate::gpu_check::Part>,
}

pub fn run(args: GpuCheckArgs) -> Result<(), CliError> {
    if args.tolerances {
        print!("{}", tolerance::table());
        return Ok(());
    }
    check(args.device, args.only)
}

#[cfg(not(feature = "cuda"))]
fn check(_device: usize, _only: Option<crate::gpu_check::Part>) -> Result<(), CliError> {
    Err(CliError::Input(
        "gpu-check: this moeq was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
    ))
}

#[cfg(feature = "cuda")]
fn check(device: usize, only: Option<crate::gpu_check::Part>) -> Result<(), CliError> {
    let device = candle_core::Device::new_cuda(device).map_err(CliError::failed)?;
    print!("{}", tolerance::table());
    println!();
    let results = crate::gpu_check::run_all(&device, only).map_err(CliError::failed)?;
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
