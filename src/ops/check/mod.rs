//! Comparison of an op on a device against its reference on the CPU, forward and backward, on
//! random data. `moeq gpu-check` runs it on CUDA; the CPU test suite runs the same code on the
//! CPU so the machinery itself is exercised in CI.

mod attention;
mod nf4;
mod outer;
mod rows;

use nf4::check_nf4_linear;

use candle_core::{DType, Device, Result, Tensor, Var};
use std::fmt;

#[derive(Debug, Clone)]
pub struct Comparison {
    pub what: String,
    pub max_abs: f32,
    /// Largest |got − want| / (atol + rtol·|want|); ≤ 1 passes.
    pub worst_ratio: f32,
    pub rtol: f32,
    pub atol: f32,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0 && self.worst_ratio.is_finite()
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<5} {:<32} max|diff| {:.3e}  worst/tol {:.3}  (rtol {:.1e}, atol {:.1e})",
            if self.passed() { "PASS" } else { "FAIL" },
            self.what,
            self.max_abs,
            self.worst_ratio,
            self.rtol,
            self.atol
        )
    }
}

pub fn compare(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    rtol: f32,
    atol: f32,
) -> Result<Comparison> {
    let got: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if got.len() != want.len() {
        candle_core::bail!(
            "{what}: {} values vs {} in the reference",
            got.len(),
            want.len()
        );
    }
    let (mut max_abs, mut worst) = (0f32, 0f32);
    for (g, w) in got.iter().zip(&want) {
        let d = (g - w).abs();
        max_abs = max_abs.max(d);
        let ratio = if d.is_nan() {
            f32::INFINITY
        } else {
            d / (atol + rtol * w.abs())
        };
        worst = worst.max(ratio);
    }
    Ok(Comparison {
        what: what.to_string(),
        max_abs,
        worst_ratio: worst,
        rtol,
        atol,
    })
}

/// Tolerance for a result computed in f32 and rounded once to `dtype`, against an f32
/// reference: one unit in the last place of the storage type (the two sides may round an f32
/// value that differs in its last bit to neighbouring storage values), and a few f32 ulps
/// for f32 (CUDA's `expf` and Rust's `exp` differ by up to 2 ulp).
pub fn rounding_tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::BF16 => (1.0 / 128.0, 1e-6),
        DType::F16 => (1.0 / 1024.0, 1e-6),
        _ => (1e-5, 1e-7),
    }
}

/// SwiGLU on `device` in each dtype vs the primitive-op reference on the CPU in f32.
fn check_swiglu(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    // Random normal inputs scaled to cover silu's curved region and tails; never zeros.
    let shape = (257, 384);
    let gate = (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 3.0)?.to_dtype(dtype)?;
    let up = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;
    let upstream = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;

    let g_dev = Var::from_tensor(&gate.to_device(device)?)?;
    let u_dev = Var::from_tensor(&up.to_device(device)?)?;
    let out = super::swiglu(g_dev.as_tensor(), u_dev.as_tensor())?;
    let grads = (out.to_dtype(DType::F32)? * upstream.to_device(device)?.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;

    let g_ref = Var::from_tensor(&gate.to_dtype(DType::F32)?)?;
    let u_ref = Var::from_tensor(&up.to_dtype(DType::F32)?)?;
    let out_ref = super::swiglu::swiglu_reference(g_ref.as_tensor(), u_ref.as_tensor())?;
    let grads_ref = (&out_ref * upstream.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;

    let (rtol, atol) = rounding_tolerance(dtype);
    let bwd_rtol = (2.0 * rtol).max(1e-4);
    let name = |part: &str| format!("swiglu {dtype:?} {part}");
    let missing = || candle_core::Error::Msg("swiglu: missing gradient".into());
    let d_gate_ref = grads_ref.get(g_ref.as_tensor()).ok_or_else(missing)?;
    // d_gate = upstream · up · silu'(gate), and silu' crosses zero (gate ≈ −1.28): there the
    // result is a cancellation of O(1) terms whose ulps do not shrink with it. So besides the
    // relative part, an absolute part of 1e-6 of the tensor's largest magnitude (f32; the
    // inputs are random and unseeded, and an elementwise bound alone failed at 1.3× tol).
    let scale = d_gate_ref.abs()?.max_all()?.to_scalar::<f32>()?;
    let bwd_atol = atol.max(1e-6 * scale);
    Ok(vec![
        compare(&name("forward"), &out, &out_ref, rtol, atol)?,
        compare(
            &name("d_gate"),
            grads.get(g_dev.as_tensor()).ok_or_else(missing)?,
            d_gate_ref,
            // The gradient composes ~6 rounded elementwise ops (exp, recip, products) whose
            // device implementations differ by an ulp or two each: two storage ulps, and at
            // least 1e-4 relative in f32 where those ulps add up (measured 2.9e-6 abs on H100).
            bwd_rtol,
            bwd_atol,
        )?,
        compare(
            &name("d_up"),
            grads.get(u_dev.as_tensor()).ok_or_else(missing)?,
            grads_ref.get(u_ref.as_tensor()).ok_or_else(missing)?,
            bwd_rtol,
            atol,
        )?,
    ])
}

fn max_scale(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// Runs `f` on the CPU in f32 and on `device` in `dtype` over the same random inputs, and
/// compares the output and the gradient of every input w.r.t. `sum(out · upstream)`.
/// Tolerance: `rtol` relative plus `k` times the largest reference magnitude of that tensor.
fn device_vs_cpu(
    what: &str,
    device: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    rtol: f32,
    k: f32,
) -> Result<Vec<Comparison>> {
    let run = |dev: &Device, dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts)?;
        // A fixed upstream gradient: the same values on both sides.
        let n = out.elem_count();
        let up: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let up = Tensor::from_vec(up, out.shape(), dev)?;
        let grads = (out.to_dtype(DType::F32)? * up)?.sum_all()?.backward()?;
        let gs = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!("{what}: an input got no gradient"))
                    })
                    .and_then(|g| g.to_device(&Device::Cpu))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((out.to_device(&Device::Cpu)?, gs))
    };
    let (out, grads) = run(device, dtype)?;
    let (out_ref, grads_ref) = run(&Device::Cpu, DType::F32)?;
    let mut v = vec![compare(
        &format!("{what} {dtype:?} forward"),
        &out,
        &out_ref,
        rtol,
        k * max_scale(&out_ref)?,
    )?];
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        v.push(compare(
            &format!("{what} {dtype:?} d_input{i}"),
            g,
            r,
            rtol,
            k * max_scale(r)?,
        )?);
    }
    Ok(v)
}

/// RMSNorm, RoPE, the grouped 4-bit expert matmul and grouped split LoRA, forward and
/// backward, on `device` vs the CPU. f32: cuBLAS/CPU accumulation order and transcendental
/// ulps (1e-5 of scale); bf16: a storage rounding per op on the device side against an f32
/// reference (2e-2 of scale).
fn check_model_ops(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    use super::experts::{grouped_lora, grouped_nf4, ExpertWeights};
    use super::nf4_linear::Nf4Weight;
    use crate::quant::{QuantSettings, QuantizedParam};
    let (rtol, k_tol) = if dtype == DType::F32 {
        (1e-5, 1e-5)
    } else {
        (2e-2, 2e-2)
    };
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // Rows of 96 (one warp per row on CUDA) and of 2,048 (one block per row). The norm weight
    // is frozen: the op gives x a gradient only.
    for (rows, d) in [(67usize, 96usize), (37, 2048)] {
        let x = Tensor::randn(0f32, 1.0, (rows, d), cpu)?;
        let w = (Tensor::randn(0f32, 0.2, d, cpu)? + 1.0)?;
        out.extend(device_vs_cpu(
            &format!("rms_norm (rows of {d})"),
            device,
            dtype,
            &[x],
            &|t| {
                let w = w.to_device(t[0].device())?.to_dtype(t[0].dtype())?;
                super::norm::rms_norm(&t[0], &w, 1e-6)
            },
            rtol,
            k_tol,
        )?);
    }
    let q = Tensor::randn(0f32, 1.0, (67, 4, 32), cpu)?;
    let positions: Vec<u32> = (0..67u32).map(|i| (i * 37) % 200).collect();
    let spec = crate::arch::RopeSpec {
        theta: 1e6,
        rope_type: "default".into(),
        factor: None,
        original_max_position_embeddings: None,
        extra: Default::default(),
    };
    out.extend(device_vs_cpu(
        "rope",
        device,
        dtype,
        &[q],
        &|t| {
            let rope = super::rope::Rope::new(&spec, 32, 256, 256, t[0].device())?;
            let pos = Tensor::new(positions.as_slice(), t[0].device())?;
            let (c, s) = rope.tables(&pos, t[0].dtype())?;
            super::rope::apply_rope(&t[0], &c, &s)
        },
        rtol,
        k_tol,
    )?);
    // Five experts [96, 64], one of them without tokens.
    let counts = [10usize, 0, 7, 30, 4];
    let params: Vec<QuantizedParam> = (0..counts.len())
        .map(|_| {
            let w: Vec<f32> = Tensor::randn(0f32, 0.05, 96 * 64, cpu)?.to_vec1()?;
            QuantizedParam::quantize(&w, &[96, 64], QuantSettings::default())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let xs = Tensor::randn(0f32, 1.0, (51, 64), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_nf4",
        device,
        dtype,
        std::slice::from_ref(&xs),
        &|t| {
            let ws = params
                .iter()
                .map(|p| Nf4Weight::from_param(p, t[0].device()))
                .collect::<Result<Vec<_>>>()?;
            let ew = ExpertWeights::stack(&ws)?;
            grouped_nf4(&t[0], &ew, &counts)
        },
        rtol,
        k_tol,
    )?);
    let a = Tensor::randn(0f32, 0.1, (4 * 5, 64), cpu)?;
    let b = Tensor::randn(0f32, 0.1, (96, 4 * 5), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_lora",
        device,
        dtype,
        &[xs, a, b],
        &|t| grouped_lora(&t[0], &t[1], &t[2], &counts, 0, 4, 2.0),
        rtol,
        k_tol,
    )?);
    // The grouped GEMM at a size where cuBLAS picks tensor-core kernels: 16 experts
    // [384, 256] in chunks of 5 (the last one short), rows per expert 0..=96 at random.
    let counts: Vec<usize> = Tensor::rand(0f32, 97.0, 16, cpu)?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 7 == 3 { 0 } else { *v as usize })
        .collect();
    let rows: usize = counts.iter().sum();
    let params: Vec<QuantizedParam> = (0..counts.len())
        .map(|_| {
            let w: Vec<f32> = Tensor::randn(0f32, 0.05, 384 * 256, cpu)?.to_vec1()?;
            QuantizedParam::quantize(&w, &[384, 256], QuantSettings::default())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let xs = Tensor::randn(0f32, 1.0, (rows, 256), cpu)?;
    let chunk = 5 * 384 * 256 * dtype.size_in_bytes();
    out.extend(device_vs_cpu(
        "grouped_nf4 16×[384,256] chunks",
        device,
        dtype,
        std::slice::from_ref(&xs),
        &|t| {
            let ws = params
                .iter()
                .map(|p| Nf4Weight::from_param(p, t[0].device()))
                .collect::<Result<Vec<_>>>()?;
            let ew = ExpertWeights::stack(&ws)?;
            super::experts::grouped_nf4_chunked(&t[0], &ew, &counts, chunk)
        },
        rtol,
        k_tol,
    )?);
    // One 3-D expert parameter [16, 96, 64] quantized whole (its nested statistics span all
    // experts), a rank holding experts 3..14 as the model builds them: nested scales kept on
    // the device and expanded per chunk of 4 experts from block 288 on (not a 256-boundary).
    let (held, per) = (3..14usize, 96 * 64);
    let whole: Vec<f32> = Tensor::randn(0f32, 0.05, 16 * per, cpu)?.to_vec1()?;
    let param = QuantizedParam::quantize(&whole, &[16, 96, 64], QuantSettings::default())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let held_counts: Vec<usize> = (0..held.len()).map(|e| (e * 37) % 50).collect();
    let held_xs = Tensor::randn(0f32, 1.0, (held_counts.iter().sum::<usize>(), 64), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_nf4 nested scales of experts 3..14",
        device,
        dtype,
        std::slice::from_ref(&held_xs),
        &|t| {
            let d = t[0].device();
            let bytes = &param.packed[held.start * per / 2..held.end * per / 2];
            let ew = ExpertWeights {
                packed: Tensor::from_slice(bytes, bytes.len(), d)?,
                absmax: super::nf4_linear::Scales::from_absmax(
                    &param.absmax,
                    held.start * per / 64..held.end * per / 64,
                    d,
                )?,
                num_experts: held.len(),
                out_features: 96,
                in_features: 64,
                kind: param.settings.kind,
                blocksize: 64,
            };
            let chunk = 4 * per * t[0].dtype().size_in_bytes();
            super::experts::grouped_nf4_chunked(&t[0], &ew, &held_counts, chunk)
        },
        rtol,
        k_tol,
    )?);
    // Packed SwiGLU over a fused gate_up [rows, 2·I]: I = 192 takes the 16-byte kernels on
    // CUDA, I = 102 (not a whole number of packs) the element-wise ones.
    for half in [192usize, 102] {
        let gu = (Tensor::randn(0f32, 1.0, (257, 2 * half), cpu)? * 3.0)?;
        out.extend(device_vs_cpu(
            &format!("swiglu_packed (I = {half})"),
            device,
            dtype,
            &[gu],
            &|t| super::swiglu::swiglu_packed(&t[0]),
            rtol,
            k_tol,
        )?);
    }
    out.extend(attention::check_attention(device, dtype, rtol, k_tol)?);
    // Routing gathers: 300 tokens, top-4 of 16 experts (token t picks t·7+j·5 mod 16, distinct
    // for j < 4), rows sorted by expert; gather, an elementwise stand-in for the experts,
    // combine.
    let (n, k) = (300usize, 4usize);
    let mut rows: Vec<(u32, u32, u32)> = (0..n)
        .flat_map(|t| {
            (0..k).map(move |j| (((t * 7 + j * 5) % 16) as u32, t as u32, (t * k + j) as u32))
        })
        .collect();
    rows.sort_unstable();
    let tokens: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let slots: Vec<u32> = rows.iter().map(|r| r.2).collect();
    // Rows of 128 take the 16-byte kernels; rows of 36 the element-wise ones in bf16/f16.
    for h in [128usize, 36] {
        let xr = Tensor::randn(0f32, 1.0, (n, h), cpu)?;
        let wr = Tensor::rand(0f32, 1.0, (n, k), cpu)?;
        out.extend(device_vs_cpu(
            &format!("routing gather/combine (rows of {h})"),
            device,
            dtype,
            &[xr, wr],
            &|t| {
                use super::routing::{combine_rows, gather_rows, RowOrder};
                let order = RowOrder::new(tokens.clone(), slots.clone(), k, t[0].device())?;
                let y = gather_rows(&t[0], &order)?.sin()?;
                // Routing weights stay f32 in the model (the CUDA kernels take them so).
                combine_rows(&y, &t[1].to_dtype(DType::F32)?, &order)
            },
            rtol,
            k_tol,
        )?);
    }
    // The routed experts as one op over the same routing (16 experts, rows of 128, expert
    // width 32): gather, gate_up, packed SwiGLU, down and combine, gradients for x and weights.
    let mut expert_counts = vec![0usize; 16];
    for r in &rows {
        expert_counts[r.0 as usize] += 1;
    }
    let expert_params = |out_f: usize, in_f: usize| -> Result<Vec<QuantizedParam>> {
        (0..16)
            .map(|_| {
                let w: Vec<f32> = Tensor::randn(0f32, 0.1, out_f * in_f, cpu)?.to_vec1()?;
                QuantizedParam::quantize(&w, &[out_f, in_f], QuantSettings::default())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .collect()
    };
    let (gate_up_params, down_params) = (expert_params(64, 128)?, expert_params(128, 32)?);
    out.extend(device_vs_cpu(
        "routed experts (one op)",
        device,
        dtype,
        &[
            Tensor::randn(0f32, 1.0, (n, 128), cpu)?,
            Tensor::rand(0f32, 1.0, (n, k), cpu)?,
        ],
        &|t| {
            use super::routing::RowOrder;
            let d = t[0].device();
            let stack = |ps: &[QuantizedParam]| -> Result<ExpertWeights> {
                let ws = ps
                    .iter()
                    .map(|p| Nf4Weight::from_param(p, d))
                    .collect::<Result<Vec<_>>>()?;
                ExpertWeights::stack(&ws)
            };
            let order = RowOrder::new(tokens.clone(), slots.clone(), k, d)?;
            super::routed_experts::routed_experts(
                &t[0],
                &t[1].to_dtype(DType::F32)?,
                &order,
                &stack(&gate_up_params)?,
                &stack(&down_params)?,
                &expert_counts,
                None,
            )
        },
        rtol,
        k_tol,
    )?);
    // LoRA r 16 over experts 3..19 of 20 (a rank's slice).
    let a = Tensor::randn(0f32, 0.1, (16 * 20, 256), cpu)?;
    let b = Tensor::randn(0f32, 0.1, (384, 16 * 20), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_lora 16 of 20 experts r16",
        device,
        dtype,
        &[xs, a, b],
        &|t| grouped_lora(&t[0], &t[1], &t[2], &counts, 3, 16, 2.0),
        rtol,
        k_tol,
    )?);
    out.extend(outer::check_grouped_outer(device, dtype)?);
    Ok(out)
}

pub fn run_all(device: &Device) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        out.extend(check_nf4_linear(device, dtype)?);
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        out.extend(check_swiglu(device, dtype)?);
    }
    for dtype in [DType::F32, DType::BF16] {
        out.extend(check_model_ops(device, dtype)?);
    }
    // Fused cross-entropy rows: 37 rows × 5000-word vocabulary (several strides of the 1024
    // threads), every fifth row ignored; dlogits and per-row losses against the CPU loop in f32.
    // Tolerance: the rows' sums in another order (f32) and, in bf16, one rounding step. A row's
    // log-sum-exp summed in another order moves by up to ~1e-5 in f32 (the loss comparison
    // below sees 4e-6 to 1e-5 over runs on random logits), and that scales every probability by
    // e^{Δ}: f32 dlogits get rtol 3e-5 (1e-5 failed once at 1.04× on H100).
    let logits = (Tensor::randn(0f32, 1.0, (37, 5000), &Device::Cpu)? * 3.0)?;
    let targets: Vec<u32> = (0..37u32).map(|r| (r * 131 + 7) % 5000).collect();
    let weights: Vec<f32> = (0..37)
        .map(|r| if r % 5 == 4 { 0.0 } else { 1.0 })
        .collect();
    for dtype in [DType::F32, DType::BF16] {
        let run = |d: &Device| -> Result<(Tensor, Tensor)> {
            super::cross_entropy::cross_entropy_rows(
                &logits.to_dtype(dtype)?.to_device(d)?,
                &Tensor::from_slice(&targets, 37, d)?,
                &Tensor::from_slice(&weights, 37, d)?,
                0.5,
            )
        };
        let ((dx, loss), (dx_ref, loss_ref)) = (run(device)?, run(&Device::Cpu)?);
        let rtol = if dtype == DType::F32 {
            3e-5
        } else {
            1.0 / 128.0
        };
        out.push(compare(
            &format!("cross_entropy_rows {dtype:?} dlogits"),
            &dx,
            &dx_ref,
            rtol,
            1e-7,
        )?);
        out.push(compare(
            &format!("cross_entropy_rows {dtype:?} loss"),
            &loss,
            &loss_ref,
            1e-5,
            1e-5,
        )?);
    }
    out.extend(rows::check_rows(device)?);
    // Generated frozen weights (checkpoint::generated): the counter-based normal stream on the
    // device against its CPU twin, 3·10^6 values across several launch blocks. Both round the
    // same f32 formula to bf16; ln/cos may differ in the last f32 bit, which moves a value by at
    // most one bf16 step (≤ 2^-7 relative) when it sits on a rounding boundary.
    for (key, std, offset) in [(7u64, 0.02f32, 0.0f32), (u64::MAX - 3, 0.02, 1.0)] {
        let draw = |d: &Device| crate::checkpoint::generated::draw(key, 3_000_001, std, offset, d);
        out.push(compare(
            &format!("generated weights N({offset}, {std}) key {key}"),
            &draw(device)?,
            &draw(&Device::Cpu)?,
            1.0 / 128.0,
            0.0,
        )?);
    }
    Ok(out)
}
