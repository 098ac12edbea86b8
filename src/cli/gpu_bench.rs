//! `moeq gpu-bench`: throughput of the CUDA quantization kernels at realistic sizes, next to
//! the device-to-device copy bandwidth measured in the same process (the roofline they are
//! judged against: bytes read + written per second).

use super::CliError;

#[derive(clap::Args, Debug)]
pub struct GpuBenchArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Elements of the benchmarked tensor (default: one Qwen3-30B-A3B gate_up_proj, 128×1536×2048).
    #[arg(long, default_value_t = 128 * 1536 * 2048)]
    elements: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: GpuBenchArgs) -> Result<(), CliError> {
    Err(CliError::Input(
        "gpu-bench: this moeq was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
    ))
}

#[cfg(feature = "cuda")]
pub fn run(args: GpuBenchArgs) -> Result<(), CliError> {
    use crate::quant::{cuda, QuantKind, QuantSettings};
    use candle_core::{DType, Device, Tensor};
    use std::time::Instant;

    let dev = Device::new_cuda(args.device).map_err(CliError::failed)?;
    let n = args.elements;
    let x = Tensor::randn(0f32, 0.02, n, &dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .map_err(CliError::failed)?;
    let time = |f: &dyn Fn() -> candle_core::Result<()>| -> Result<f64, CliError> {
        for _ in 0..3 {
            f().map_err(CliError::failed)?;
        }
        dev.synchronize().map_err(CliError::failed)?;
        let t = Instant::now();
        for _ in 0..args.iters {
            f().map_err(CliError::failed)?;
        }
        dev.synchronize().map_err(CliError::failed)?;
        Ok(t.elapsed().as_secs_f64() / args.iters as f64)
    };
    let copy_s = time(&|| x.copy().map(|_| ()))?;
    let copy_bw = 2.0 * 2.0 * n as f64 / copy_s / 1e9;
    println!("elements {n} (bf16, {:.2} GB)", 2.0 * n as f64 / 1e9);
    println!("| op | blocksize | time ms | GB/s (read+write) | vs D2D copy |");
    println!("|---|---|---|---|---|");
    println!(
        "| device-to-device copy | - | {:.3} | {copy_bw:.0} | 100% |",
        copy_s * 1e3
    );
    for bs in [64, 128, 256] {
        let settings = QuantSettings {
            kind: QuantKind::Nf4,
            blocksize: bs,
            double_quant: false,
        };
        let q_s = time(&|| cuda::quantize(&x, &settings).map(|_| ()))?;
        let (packed, absmax) = cuda::quantize(&x, &settings).map_err(CliError::failed)?;
        let stats = 4.0 * n.div_ceil(bs) as f64;
        let q_bw = (2.0 * n as f64 + n as f64 / 2.0 + stats) / q_s / 1e9;
        println!(
            "| quantize nf4 | {bs} | {:.3} | {q_bw:.0} | {:.0}% |",
            q_s * 1e3,
            100.0 * q_bw / copy_bw
        );
        let d_s = time(&|| {
            cuda::dequantize(&packed, &absmax, &[n], QuantKind::Nf4, bs, DType::BF16).map(|_| ())
        })?;
        let d_bw = (n as f64 / 2.0 + stats + 2.0 * n as f64) / d_s / 1e9;
        println!(
            "| dequantize nf4 → bf16 | {bs} | {:.3} | {d_bw:.0} | {:.0}% |",
            d_s * 1e3,
            100.0 * d_bw / copy_bw
        );
    }
    Ok(())
}
