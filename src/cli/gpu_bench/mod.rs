//! `moeq gpu-bench`: throughput of the CUDA quantization kernels at realistic sizes, next to
//! the device-to-device copy bandwidth measured in the same process (the roofline they are
//! judged against: bytes read + written per second).

use super::CliError;
#[cfg(feature = "cuda")]
use attention::attention;

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod rows;

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
    /// Instead: the expert projections of one Qwen3-30B-A3B MoE layer (128 experts, top-8,
    /// hidden 2048, expert width 768) for this many tokens, next to a dense bf16 GEMM of the
    /// same FLOPs; then the routed rows' gathers, row by row and token-major.
    #[arg(long)]
    experts: Option<usize>,
    /// Instead: causal attention at Qwen3-30B-A3B's shape (32 query heads on 4 kv heads of 128,
    /// 2,048 positions) for this many rows, forward and backward on each kernel set: moeq's,
    /// cuDNN's (atomic backward; deterministic over the whole batch; deterministic by rows).
    #[arg(long)]
    attention: Option<usize>,
    /// The attention's shape for `--attention`: query heads, kv heads, q/k head size, value
    /// head size (DeepSeek-V3's latent attention: 128,128,192,128; GLM-4.7-Flash's:
    /// 20,20,256,256).
    #[arg(long, default_value = "32,4,128,128")]
    attention_shape: String,
    /// Instead: the gated delta rule at Qwen3.5-35B-A3B's linear-attention shape (32 heads,
    /// keys and values of 128, 2,048 positions) for this many rows, forward and forward +
    /// backward: the chunk op (what trains), the chunkwise form, the token-by-token kernels,
    /// the chunked reference on candle ops, and the model's dense gated-attention layer of the
    /// same width (16 query heads on 2 kv heads of 256).
    #[arg(long)]
    delta_rule: Option<usize>,
    /// With --delta-rule: which forms to time (chunkwise, chunks, recurrent, chunked),
    /// comma-separated.
    #[arg(long, default_value = "chunkwise,chunks,recurrent,chunked")]
    delta_forms: String,
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
    use candle_core::{DType, Tensor};
    use std::time::Instant;

    let dev = crate::util::device::cuda_device(args.device).map_err(CliError::failed)?;
    if let Some(tokens) = args.experts {
        return experts(&dev, tokens, args.iters);
    }
    if let Some(rows) = args.delta_rule {
        delta_rule(&dev, rows, args.iters, &args.delta_forms)?;
        return attention(&dev, rows, (16, 2, 256, 256), args.iters);
    }
    if let Some(rows) = args.attention {
        let shape: Vec<usize> = args
            .attention_shape
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                CliError::Input(format!(
                    "--attention-shape {}: give four numbers, e.g. 32,4,128,128",
                    args.attention_shape
                ))
            })?;
        let [nh, kvh, hd, vd] = shape[..] else {
            return Err(CliError::Input(format!(
                "--attention-shape {}: give four numbers (heads, kv heads, q/k size, value size)",
                args.attention_shape
            )));
        };
        if kvh == 0 || nh % kvh != 0 || hd == 0 || vd == 0 {
            return Err(CliError::Input(format!(
                "--attention-shape {}: kv heads must divide the heads, sizes above 0",
                args.attention_shape
            )));
        }
        return attention(&dev, rows, (nh, kvh, hd, vd), args.iters);
    }
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
        let q_s = time(&|| cuda::quantize_on_gpu(&x, &settings).map(|_| ()))?;
        let (packed, absmax) = cuda::quantize_on_gpu(&x, &settings).map_err(CliError::failed)?;
        let stats = 4.0 * n.div_ceil(bs) as f64;
        let q_bw = (2.0 * n as f64 + n as f64 / 2.0 + stats) / q_s / 1e9;
        println!(
            "| quantize nf4 | {bs} | {:.3} | {q_bw:.0} | {:.0}% |",
            q_s * 1e3,
            100.0 * q_bw / copy_bw
        );
        let d_s = time(&|| {
            cuda::dequantize_on_gpu(&packed, &absmax, &[n], QuantKind::Nf4, bs, DType::BF16)
                .map(|_| ())
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

/// Time per call of `f` (median of `iters` after 3 warm-up calls), device synchronized.
#[cfg(feature = "cuda")]
fn median_time(
    dev: &candle_core::Device,
    iters: usize,
    f: &dyn Fn() -> candle_core::Result<()>,
) -> Result<f64, CliError> {
    for _ in 0..3 {
        f().map_err(CliError::failed)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        dev.synchronize().map_err(CliError::failed)?;
        let t = std::time::Instant::now();
        f().map_err(CliError::failed)?;
        dev.synchronize().map_err(CliError::failed)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The expert projections of one MoE layer at Qwen3-30B-A3B shapes for `tokens` tokens with
/// a uniform random top-8 routing: each piece on its own, with TFLOP/s.
#[cfg(feature = "cuda")]
fn experts(dev: &candle_core::Device, tokens: usize, iters: usize) -> Result<(), CliError> {
    use crate::ops::expert_chunks::products as chunk_products;
    use crate::ops::experts::{
        dequant_chunk_bytes, grouped_lora, grouped_nf4, ExpertWeights, GroupedLora,
    };
    use crate::ops::grouped_gemm::sm90::{
        self, set_backend, set_variant, Backend, Backend::*, VARIANTS,
    };
    use crate::ops::grouped_gemm::{grouped_gemm, Gemm};
    use crate::quant::{QuantKind, QuantSettings};
    use candle_core::{DType, Tensor};
    use rand::{Rng, SeedableRng};
    let f = CliError::failed;
    let (e, k, h, i) = (128usize, 8usize, 2048usize, 768usize);
    let m = tokens * k;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut counts = vec![0usize; e];
    for _ in 0..tokens {
        let mut chosen = Vec::with_capacity(k);
        while chosen.len() < k {
            let c = rng.random_range(0..e);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        for c in chosen {
            counts[c] += 1;
        }
    }
    let settings = QuantSettings {
        kind: QuantKind::Nf4,
        blocksize: 64,
        double_quant: false,
    };
    let weights = |out: usize, inp: usize| -> candle_core::Result<ExpertWeights> {
        let w = Tensor::randn(0f32, 0.02, e * out * inp, dev)?.to_dtype(DType::BF16)?;
        let (packed, absmax) = crate::quant::cuda::quantize_on_gpu(&w, &settings)?;
        Ok(ExpertWeights {
            store: crate::ops::experts::ExpertStore::Nf4 {
                packed,
                absmax: crate::ops::nf4_linear::Scales::Plain(absmax),
                kind: QuantKind::Nf4,
                blocksize: 64,
            },
            num_experts: e,
            out_features: out,
            in_features: inp,
            bias: None,
            glu: crate::ops::swiglu::Glu::Silu,
        })
    };
    let gate_up = weights(2 * i, h).map_err(f)?;
    let down = weights(h, i).map_err(f)?;
    let bf = |t: candle_core::Result<Tensor>| t.and_then(|t| t.to_dtype(DType::BF16));
    let x = bf(Tensor::randn(0f32, 1.0, (m, h), dev)).map_err(f)?;
    let act = bf(Tensor::randn(0f32, 1.0, (m, i), dev)).map_err(f)?;
    let dense_w = bf(Tensor::randn(0f32, 0.02, (2 * i, h), dev)).map_err(f)?;
    let a = Tensor::randn(0f32, 0.02, (16 * e, h), dev).map_err(f)?;
    let b = Tensor::randn(0f32, 0.02, (2 * i, 16 * e), dev).map_err(f)?;
    let wd = gate_up.dequantize(0..e, DType::BF16).map_err(f)?;
    let wdd = down.dequantize(0..e, DType::BF16).map_err(f)?;
    // The grouped products of the first `experts` experts, weights `[out, inp]` each: the
    // forward (`nt`: rows of width inp times Wᵀ) or the input gradient (`nn`: rows of width
    // out times W).
    let grouped = |experts: usize, out: usize, inp: usize, input_grad: bool| {
        let (n, k) = if input_grad { (inp, out) } else { (out, inp) };
        chunk_products(&counts, 0..experts, (0, 0), k, n)
    };
    let forward = grouped(e, 2 * i, h, false);
    let transposed = grouped(e, 2 * i, h, true);
    let dgu = bf(Tensor::randn(0f32, 1.0, (m, 2 * i), dev)).map_err(f)?;
    let gu_flops = 2.0 * (m * h * 2 * i) as f64;
    // One row on one grouped GEMM backend (the one in force restored after).
    let before = sm90::backend();
    let on = |b: Backend, run: &dyn Fn() -> Result<f64, CliError>| {
        set_backend(b);
        let r = run();
        set_backend(before);
        r
    };
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let forced = sm90::forced();
    // Every expert product of a layer on every compiled variant: all experts in one call, and
    // the experts of one dequantization chunk of gate_up (the chunked backward's calls).
    let chunk = gate_up
        .experts_per_chunk(dequant_chunk_bytes(), DType::BF16, 0)
        .min(e);
    let shapes = [
        ("gate_up x·Wᵀ", &x, &wd, 2 * i, h, false),
        ("gate_up dy·W", &dgu, &wd, 2 * i, h, true),
        ("down x·Wᵀ", &act, &wdd, h, i, false),
        ("down dy·W", &x, &wdd, h, i, true),
    ];
    for (v, name) in VARIANTS.iter().enumerate() {
        set_variant(Some(v));
        for (what, a, w, out, inp, input_grad) in shapes {
            for experts in [e, chunk] {
                let ps = grouped(experts, out, inp, input_grad);
                let rows_in: usize = ps.iter().map(|p| p.m).sum();
                let len = ps.last().map_or(0, |p| p.c + p.m * p.n);
                let gemm = if input_grad {
                    Gemm::nn(1.0)
                } else {
                    Gemm::nt(1.0)
                };
                let secs = on(Auto, &|| {
                    median_time(dev, iters, &|| {
                        grouped_gemm(a, w, len, &ps, gemm).map(|_| ())
                    })
                })?;
                rows.push((
                    format!(
                        "grouped GEMM {what}, {experts} experts ({rows_in} rows), Hopper {v}: {name}"
                    ),
                    2.0 * (rows_in * out * inp) as f64,
                    secs,
                ));
            }
        }
    }
    set_variant(forced);
    let listed: Vec<(&str, f64, f64)> = vec![
        (
            "dense bf16 GEMM [M, 2048] x [2048, 1536] (same FLOPs)",
            gu_flops,
            median_time(dev, iters, &|| x.matmul(&dense_w.t()?).map(|_| ()))?,
        ),
        (
            "dequantize 128 gate_up experts (bf16)",
            0.0,
            median_time(dev, iters, &|| {
                gate_up.dequantize(0..e, DType::BF16).map(|_| ())
            })?,
        ),
        (
            "grouped GEMM gate_up x·Wᵀ, dequantized weights, cuBLAS",
            gu_flops,
            on(Cublas, &|| {
                median_time(dev, iters, &|| {
                    grouped_gemm(&x, &wd, m * 2 * i, &forward, Gemm::nt(1.0)).map(|_| ())
                })
            })?,
        ),
        (
            "grouped GEMM gate_up dy·W (input gradient), cuBLAS",
            gu_flops,
            on(Cublas, &|| {
                median_time(dev, iters, &|| {
                    grouped_gemm(&dgu, &wd, m * h, &transposed, Gemm::nn(1.0)).map(|_| ())
                })
            })?,
        ),
        (
            "grouped_lora gate_up r16 forward",
            2.0 * (m * 16 * (h + 2 * i)) as f64,
            median_time(dev, iters, &|| {
                grouped_lora(&x, &a, &b, &counts, 0, 16, 2.0).map(|_| ())
            })?,
        ),
        (
            "grouped_lora gate_up r16 backward (dx, dA, dB)",
            4.0 * (m * 16 * (h + 2 * i)) as f64,
            median_time(dev, iters, &|| {
                GroupedLora::new(&counts, 0, 16, 2.0)
                    .backward(&x, &a, &b, &dgu)
                    .map(|_| ())
            })?,
        ),
    ];
    println!(
        "expert projections of one layer: {tokens} tokens x top-{k} = {m} rows over {e} experts (min {} max {} per expert)",
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0)
    );
    println!("| op | time ms | TFLOP/s |");
    println!("|---|---|---|");
    // The 4-bit expert op (chunked dequantize + grouped GEMM) on each backend.
    for (backend, label) in [(Cublas, "cuBLAS"), (Auto, "Hopper kernel")] {
        for (what, input, weights, flops) in [
            ("gate_up", &x, &gate_up, gu_flops),
            ("down", &act, &down, gu_flops / 2.0),
        ] {
            let secs = on(backend, &|| {
                median_time(dev, iters, &|| {
                    grouped_nf4(input, weights, &counts).map(|_| ())
                })
            })?;
            rows.push((
                format!("grouped_nf4 {what} (chunked dequantize + grouped GEMM), {label}"),
                flops,
                secs,
            ));
        }
    }
    let listed = listed.into_iter().map(|(n, f, s)| (n.to_string(), f, s));
    for (name, flops, secs) in listed.chain(rows) {
        let rate = if flops > 0.0 {
            format!("{:.0}", flops / secs / 1e12)
        } else {
            "-".into()
        };
        println!("| {name} | {:.3} | {rate} |", secs * 1e3);
    }
    rows::routed_rows(dev, (tokens, k, e, h), iters)
}

/// The gated delta rule over `rows` rows of 2,048 positions at Qwen3.5-35B-A3B's shape (32 value
/// heads, q/k repeated to them, Dk = Dv = 128; bf16 q, k, v, beta, f32 g): forward, and forward +
/// backward through autograd, for the chunkwise form, the token-by-token kernels and the chunked
/// reference. FLOPs counted as the
/// chunked form's (per chunk of C: 2·C·Dk·Dv for the state read, 2·C·Dk·Dv for the update,
/// 2·C²·(Dk + Dv) inside the chunk, per head) so that the rate compares with attention's.
#[cfg(feature = "cuda")]
fn delta_rule(
    dev: &candle_core::Device,
    rows: usize,
    iters: usize,
    forms: &str,
) -> Result<(), CliError> {
    use crate::ops::delta_rule::{chunked, chunkwise, CHUNK};
    use crate::ops::delta_rule_op::scan;
    use candle_core::{DType, Tensor, Var};
    let (s, h, dk, dv) = (2048usize, 32usize, 128usize, 128usize);
    let f = CliError::failed;
    let bf = |d: usize| -> candle_core::Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, s, h, d), dev)?.to_dtype(DType::BF16)?)
    };
    let (q, k, v) = (bf(dk).map_err(f)?, bf(dk).map_err(f)?, bf(dv).map_err(f)?);
    let inputs = (|| -> candle_core::Result<(Var, Var)> {
        let a = Tensor::randn(0f32, 1.0, (rows, s, h), dev)?;
        let g = (((a + 1.0)?.exp()? + 1.0)?.log()? * -0.1)?;
        let beta = candle_nn::ops::sigmoid(&Tensor::randn(0f32, 1.0, (rows, s, h), dev)?)?;
        Ok((
            Var::from_tensor(&g)?,
            Var::from_tensor(&beta.to_dtype(DType::BF16)?)?,
        ))
    })();
    let (g, beta) = inputs.map_err(f)?;
    let c = CHUNK as f64;
    let chunk_flops = 2.0 * c * (2.0 * (dk * dv) as f64 + c * (dk + dv) as f64);
    let flops = (rows * h) as f64 * (s as f64 / c) * chunk_flops;
    println!(
        "gated delta rule: {rows} × {s} positions, {h} heads, Dk {dk}, Dv {dv} (bf16 in, f32 state)"
    );
    println!("| form | forward ms | TFLOP/s | forward + backward ms | TFLOP/s |");
    println!("|---|---|---|---|---|");
    type Form<'a> = dyn Fn() -> candle_core::Result<Tensor> + 'a;
    let scan_f: &Form<'_> = &|| {
        let (o, _) = scan(&q, &k, &v, &g, &beta, None)?;
        Ok(o)
    };
    let chunk_f: &Form<'_> = &|| {
        let (o, _) = chunked(&q, &k, &v, &g, &beta, None, CHUNK)?;
        Ok(o)
    };
    let whole_f: &Form<'_> = &|| {
        let (o, _) = chunkwise(&q, &k, &v, &g, &beta, None, CHUNK)?;
        Ok(o)
    };
    let chunks_f: &Form<'_> = &|| {
        let engine = crate::ops::delta_rule_op::Engine::Chunks(CHUNK);
        let (o, _) = crate::ops::delta_rule_op::scan_by(engine, &q, &k, &v, &g, &beta, None)?;
        Ok(o)
    };
    let wanted: Vec<&str> = forms.split(',').map(str::trim).collect();
    for (key, name, form) in [
        (
            "chunkwise",
            "chunkwise (batched chunks + carry kernel)",
            whole_f,
        ),
        (
            "chunks",
            "chunk op (kernels per chunk + carry kernel)",
            chunks_f,
        ),
        ("recurrent", "token-by-token kernels", scan_f),
        ("chunked", "chunked reference (candle ops)", chunk_f),
    ] {
        if !wanted.contains(&key) {
            continue;
        }
        let fwd = median_time(dev, iters, &|| {
            let _ = form()?.detach();
            Ok(())
        })?;
        let both = median_time(dev, iters, &|| {
            let loss = form()?.to_dtype(DType::F32)?.sum_all()?;
            loss.backward().map(|_| ())
        })?;
        println!(
            "| {name} | {:.3} | {:.0} | {:.3} | {:.0} |",
            fwd * 1e3,
            flops / fwd / 1e12,
            both * 1e3,
            3.5 * flops / both / 1e12
        );
    }
    // The causal conv + SiLU in front of it (8,192 channels of q, k, v; K = 4), bf16.
    use crate::ops::conv_silu_op::apply;
    use crate::ops::linear_attn_parts::causal_conv1d_silu;
    let x = (|| {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, s, 8192), dev)?.to_dtype(DType::BF16)?)
    })()
    .map_err(f)?;
    let w = (|| Tensor::randn(0f32, 0.5, (8192, 4), dev)?.to_dtype(DType::BF16))().map_err(f)?;
    println!("| conv + SiLU (8,192 channels, K 4) | forward ms | | forward + backward ms | |");
    type Conv = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    for (name, conv) in [
        ("moeq kernels", apply as Conv),
        ("reference (candle ops)", causal_conv1d_silu as Conv),
    ] {
        let fwd = median_time(dev, iters, &|| conv(&x, &w).map(|_| ()))?;
        let both = median_time(dev, iters, &|| {
            let loss = conv(&x, &w)?.to_dtype(DType::F32)?.sum_all()?;
            loss.backward().map(|_| ())
        })?;
        println!("| {name} | {:.3} | | {:.3} | |", fwd * 1e3, both * 1e3);
    }
    Ok(())
}
