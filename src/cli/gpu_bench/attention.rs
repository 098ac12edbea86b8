//! `moeq gpu-bench --attention`: causal attention's forward and backward on each kernel set
//! moeq has (its own kernels, cuDNN's backwards, moeq's Hopper backward), with the Hopper
//! backward's gradients against cuDNN's deterministic ones.

use super::median_time;
use crate::cli::CliError;

/// Causal attention of `rows` whole rows of 2,048 positions, `nh` query heads on `kvh` kv heads,
/// q/k heads of `hd` and values of `vd`: forward and backward times and TFLOP/s per kernel set
/// (FLOPs: 2·B·S²·H·(hd + vd) / 2 forward — FlashAttention's 4·B·S²·H·D / 2 when the sizes
/// match — and 2.5× that backward).
pub(super) fn attention(
    dev: &candle_core::Device,
    rows: usize,
    (nh, kvh, hd, vd): (usize, usize, usize, usize),
    iters: usize,
) -> Result<(), CliError> {
    use crate::ops::attention::{attention_backward, attention_forward, WindowSinks};
    use crate::ops::attn_sm90;
    use crate::ops::cudnn_attn::{self, Backend};
    use candle_core::{DType, Tensor};
    let s = 2048usize;
    let bf = |h: usize, d: usize| {
        Tensor::randn(0f32, 1.0, (rows, s, h, d), dev).and_then(|t| t.to_dtype(DType::BF16))
    };
    let (q, k, v, dout) =
        (|| Ok::<_, candle_core::Error>((bf(nh, hd)?, bf(kvh, hd)?, bf(kvh, vd)?, bf(nh, vd)?)))()
            .map_err(CliError::failed)?;
    let segments = Tensor::zeros((rows, s), DType::U32, dev).map_err(CliError::failed)?;
    let whole = crate::ops::attention::RowSamples {
        whole: true,
        ragged: None,
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let flops = 2.0 * (rows * s * s * nh * (hd + vd)) as f64 / 2.0;
    println!(
        "causal attention: {rows} × {s} positions, {nh}/{kvh} heads of {hd} (values {vd}) (bf16)"
    );
    match cudnn_attn::library() {
        Ok(v) => println!("cuDNN {v}"),
        Err(why) => println!("cuDNN not loaded: {why}"),
    }
    println!("| kernels | forward ms | TFLOP/s | backward ms | TFLOP/s |");
    println!("|---|---|---|---|---|");
    let default_dp = cudnn_attn::DP_WORKSPACE;
    let by_rows = format!(
        "cuDNN, deterministic backward, {} MiB of rows (default)",
        default_dp >> 20
    );
    let sm90 = "cuDNN forward, moeq's Hopper backward (MOEQ_ATTN_BWD=sm90)";
    // The deterministic backwards' gradients (cuDNN's by rows, then the Hopper one), compared
    // below at this shape.
    let mut grads = Vec::new();
    for (name, backend, deterministic, dp) in [
        ("moeq", Backend::Moeq, true, default_dp),
        ("cuDNN, atomic backward", Backend::Auto, false, default_dp),
        (
            "cuDNN, deterministic backward, whole batch",
            Backend::Auto,
            true,
            i64::MAX,
        ),
        (by_rows.as_str(), Backend::Auto, true, default_dp),
        (sm90, Backend::Auto, true, default_dp),
    ] {
        cudnn_attn::set_backend(backend);
        cudnn_attn::set_deterministic(deterministic);
        cudnn_attn::set_dp_workspace(dp);
        attn_sm90::set_enabled(name == sm90);
        let sm90_serves = name != sm90 || attn_sm90::serves(&q, &k, &v, None);
        if backend == Backend::Auto
            && !(sm90_serves && cudnn_attn::serves(&q, &k, &v, scale as f32, None, None))
        {
            println!("| {name} | - | - | - | - |");
            continue;
        }
        let plain = WindowSinks::default();
        let fwd = || attention_forward(&q, &k, &v, (&segments, &whole), &plain, scale, 256);
        let f_s = median_time(dev, iters, &|| fwd().map(|_| ()))?;
        let (out, lse) = fwd().map_err(CliError::failed)?;
        let rows = (&segments, &whole);
        let bwd = || {
            attention_backward(
                &q,
                &k,
                &v,
                rows,
                &plain,
                scale,
                256,
                (&out, lse.as_ref()),
                &dout,
            )
        };
        let b_s = median_time(dev, iters, &|| bwd().map(|_| ()))?;
        if name == by_rows || name == sm90 {
            grads.push(bwd().map_err(CliError::failed)?);
        }
        println!(
            "| {name} | {:.3} | {:.0} | {:.3} | {:.0} |",
            f_s * 1e3,
            flops / f_s / 1e12,
            b_s * 1e3,
            2.5 * flops / b_s / 1e12
        );
    }
    cudnn_attn::set_backend(Backend::Auto);
    attn_sm90::set_enabled(false);
    if let [cudnn, own] = &grads[..] {
        // max |Δ| / max |cuDNN| per gradient: both in bf16 from f32 sums in other orders.
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(cudnn.iter().zip(own)) {
            let rel = (|| {
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                Ok::<_, candle_core::Error>(d / a.abs()?.max_all()?.to_scalar::<f32>()?)
            })()
            .map_err(CliError::failed)?;
            println!("Hopper backward vs cuDNN's deterministic: {name} max |Δ| / max |cuDNN| = {rel:.2e}");
        }
    }
    Ok(())
}
