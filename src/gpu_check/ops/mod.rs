//! The custom ops on a device against their references on the CPU, forward and every input
//! gradient, on random data; and the kernels around them whose outputs are compared directly
//! (fused cross-entropy rows, the routing plan, embedding rows, drawn weights). Each comparison
//! takes its tolerance from `tolerance::TOLERANCES` by op, dtype and pass.

mod adamw;
mod attention;
mod chunks;
mod conv_silu;
#[cfg(feature = "cuda")]
mod cudnn;
mod delta_rule;
mod dots;
mod in_k;
mod linear_attn;
mod nf4;
mod outer;
mod rows;
#[cfg(feature = "cuda")]
mod sm90;
mod thin;

use nf4::check_nf4_linear;

use super::tolerance::{lookup, Pass};
use super::{compare, Comparison};
use crate::model_files::generated;
use crate::ops::cross_entropy::cross_entropy_rows;
use crate::ops::experts::{
    grouped_lora, grouped_nf4, grouped_nf4_chunked, ExpertStore, ExpertWeights,
};
use crate::ops::nf4_linear::{Nf4Weight, Scales};
use crate::ops::norm::rms_norm;
use crate::ops::norm_rope::norm_rope;
use crate::ops::rope::{apply_rope, Rope, RopeSpec};
use crate::ops::rope_part::{rope_part, Part};
use crate::ops::routed_experts::{routed_experts, Weights};
use crate::ops::routing::{combine_rows, gather_rows, RowOrder, ROWS_BY_TOKEN};
use crate::ops::swiglu::{swiglu, swiglu_packed, swiglu_reference};
use crate::quant::{QuantSettings, QuantizedParam};
use candle_core::{DType, Device, Result, Tensor, Var};

/// SwiGLU on `device` in each dtype vs the primitive-op reference on the CPU in f32.
fn check_swiglu(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    // Random normal inputs scaled to cover silu's curved region and tails; never zeros.
    let shape = (257, 384);
    let gate = (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 3.0)?.to_dtype(dtype)?;
    let up = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;
    let upstream = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;

    let g_dev = Var::from_tensor(&gate.to_device(device)?)?;
    let u_dev = Var::from_tensor(&up.to_device(device)?)?;
    let out = swiglu(g_dev.as_tensor(), u_dev.as_tensor())?;
    let grads = (out.to_dtype(DType::F32)? * upstream.to_device(device)?.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;

    let g_ref = Var::from_tensor(&gate.to_dtype(DType::F32)?)?;
    let u_ref = Var::from_tensor(&up.to_dtype(DType::F32)?)?;
    let out_ref = swiglu_reference(g_ref.as_tensor(), u_ref.as_tensor())?;
    let grads_ref = (&out_ref * upstream.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;

    let row = |op: &str, pass: Pass| lookup(op, dtype.as_str(), pass);
    let name = |part: &str| format!("swiglu {dtype:?} {part}");
    let missing = || candle_core::Error::Msg("swiglu: missing gradient".into());
    // d_gate = upstream · up · silu'(gate), and silu' crosses zero (gate ≈ −1.28): its row adds
    // an absolute part of the tensor's largest magnitude.
    Ok(vec![
        compare(
            &name("forward"),
            &out,
            &out_ref,
            row("swiglu", Pass::Forward)?,
        )?,
        compare(
            &name("d_gate"),
            grads.get(g_dev.as_tensor()).ok_or_else(missing)?,
            grads_ref.get(g_ref.as_tensor()).ok_or_else(missing)?,
            row("swiglu d_gate", Pass::Backward)?,
        )?,
        compare(
            &name("d_up"),
            grads.get(u_dev.as_tensor()).ok_or_else(missing)?,
            grads_ref.get(u_ref.as_tensor()).ok_or_else(missing)?,
            row("swiglu d_up", Pass::Backward)?,
        )?,
    ])
}

/// Runs `f` on the CPU in f32 and on `device` in `dtype` over the same random inputs, and
/// compares the output and the gradient of every input w.r.t. `sum(out · upstream)`, within the
/// forward and backward rows of `op` in `dtype`.
fn device_vs_cpu(
    what: &str,
    op: &str,
    device: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Comparison>> {
    let forward = lookup(op, dtype.as_str(), Pass::Forward)?;
    let backward = lookup(op, dtype.as_str(), Pass::Backward)?;
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
        forward,
    )?];
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        v.push(compare(
            &format!("{what} {dtype:?} d_input{i}"),
            g,
            r,
            backward,
        )?);
    }
    Ok(v)
}

/// RMSNorm, RoPE, the grouped 4-bit expert matmul and grouped split LoRA, packed SwiGLU, the
/// attention path, the routing gathers and the routed experts, forward and backward, on
/// `device` vs the CPU.
fn check_model_ops(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // Rows of 96 (one warp per row on CUDA); longer rows one warp per row in 16-byte packs
    // where they fit (bf16: 2,048 and 1,544 — partial lanes — at 8 packs a lane, 2,880 and
    // 4,096 at 16 in the forward; f32: 1,100 to 2,048 at 16 in the forward), one block per row
    // otherwise (bf16 1,100: not whole packs; the backward past 8 packs a lane). The norm
    // weight is frozen: the op gives x a gradient only.
    for (rows, d) in [
        (67usize, 96usize),
        (37, 2048),
        (33, 1544),
        (29, 2880),
        (19, 4096),
        (23, 1100),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, d), cpu)?;
        let w = (Tensor::randn(0f32, 0.2, d, cpu)? + 1.0)?;
        out.extend(device_vs_cpu(
            &format!("rms_norm (rows of {d})"),
            "rms_norm",
            device,
            dtype,
            &[x],
            &|t| {
                let w = w.to_device(t[0].device())?.to_dtype(t[0].dtype())?;
                rms_norm(&t[0], &w, 1e-6)
            },
        )?);
    }
    let q = Tensor::randn(0f32, 1.0, (67, 4, 32), cpu)?;
    let positions: Vec<u32> = (0..67u32).map(|i| (i * 37) % 200).collect();
    let spec = RopeSpec {
        theta: 1e6,
        rope_type: "default".into(),
        factor: None,
        original_max_position_embeddings: None,
        extra: Default::default(),
    };
    out.extend(device_vs_cpu("rope", "rope", device, dtype, &[q], &|t| {
        let rope = Rope::new(&spec, 32, 256, 256, t[0].device())?;
        let pos = Tensor::new(positions.as_slice(), t[0].device())?;
        let (c, s) = rope.tables(&pos, t[0].dtype())?;
        apply_rope(&t[0], &c, &s)
    })?);
    // The rotation of part of each head: GLM-4.5's first half of heads of 64, DeepSeek's
    // interleaved last 16 dims of heads of 48.
    for (hd, at, dim, interleaved) in [(64usize, 0usize, 32usize, false), (48, 32, 16, true)] {
        let x = Tensor::randn(0f32, 1.0, (67, 4, hd), cpu)?;
        let angle = Tensor::randn(0f32, 2.0, (67, 1, dim), cpu)?;
        let p = Part {
            at,
            dim,
            interleaved,
        };
        out.extend(device_vs_cpu(
            &format!(
                "rope of dims {at}..{} of heads of {hd}{}",
                at + dim,
                if interleaved { ", interleaved" } else { "" }
            ),
            "rope",
            device,
            dtype,
            &[x],
            &|t| {
                let dev = t[0].device();
                let to = |x: &Tensor| x.to_device(dev)?.to_dtype(t[0].dtype());
                rope_part(&t[0], &to(&angle.cos()?)?, &to(&angle.sin()?)?, p)
            },
        )?);
    }
    // The per-head norm and rotation as one op (one kernel each way on CUDA for heads of 64,
    // 128 and 256; 128 is in the attention block's entry): 67 tokens × 3 heads, with and
    // without the norm.
    for (hd, with_norm) in [(64usize, true), (256, true), (64, false)] {
        let x = Tensor::randn(0f32, 1.0, (67, 3, hd), cpu)?;
        let w = (Tensor::randn(0f32, 0.2, hd, cpu)? + 1.0)?;
        let angle = Tensor::randn(0f32, 2.0, (67, 1, hd), cpu)?;
        let norm = if with_norm {
            "norm and rotation"
        } else {
            "rotation"
        };
        out.extend(device_vs_cpu(
            &format!("norm_rope (heads of {hd}, {norm})"),
            "norm_rope",
            device,
            dtype,
            &[x],
            &|t| {
                let to = |x: &Tensor| x.to_device(t[0].device())?.to_dtype(t[0].dtype());
                let w = to(&w)?;
                let (c, s) = (to(&angle.cos()?)?, to(&angle.sin()?)?);
                norm_rope(&t[0], with_norm.then_some((&w, 1e-6)), &c, &s)
            },
        )?);
    }
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
    )?);
    let a = Tensor::randn(0f32, 0.1, (4 * 5, 64), cpu)?;
    let b = Tensor::randn(0f32, 0.1, (96, 4 * 5), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_lora",
        "grouped_lora",
        device,
        dtype,
        &[xs, a, b],
        &|t| grouped_lora(&t[0], &t[1], &t[2], &counts, 0, 4, 2.0),
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
            grouped_nf4_chunked(&t[0], &ew, &counts, chunk)
        },
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
        "grouped_nf4",
        device,
        dtype,
        std::slice::from_ref(&held_xs),
        &|t| {
            let d = t[0].device();
            let bytes = &param.packed[held.start * per / 2..held.end * per / 2];
            let ew = ExpertWeights {
                store: ExpertStore::Nf4 {
                    packed: Tensor::from_slice(bytes, bytes.len(), d)?,
                    absmax: Scales::from_absmax(
                        &param.absmax,
                        held.start * per / 64..held.end * per / 64,
                        d,
                    )?,
                    kind: param.settings.kind,
                    blocksize: 64,
                },
                num_experts: held.len(),
                out_features: 96,
                in_features: 64,
                bias: None,
                glu: crate::ops::swiglu::Glu::Silu,
            };
            let chunk = 4 * per * t[0].dtype().size_in_bytes();
            grouped_nf4_chunked(&t[0], &ew, &held_counts, chunk)
        },
    )?);
    // Packed SwiGLU over a fused gate_up [rows, 2·I]: I = 192 takes the 16-byte kernels on
    // CUDA, I = 102 (not a whole number of packs) the element-wise ones.
    for half in [192usize, 102] {
        let gu = (Tensor::randn(0f32, 1.0, (257, 2 * half), cpu)? * 3.0)?;
        out.extend(device_vs_cpu(
            &format!("swiglu_packed (I = {half})"),
            "swiglu_packed",
            device,
            dtype,
            &[gu],
            &|t| swiglu_packed(&t[0]),
        )?);
    }
    // gpt-oss's clamped GLU over interleaved pairs: values to ±21, a third beyond the limit,
    // none within 0.1 of it (where rounding to bf16 could cross it: the gradient jumps there).
    let gu: Vec<f32> = (Tensor::randn(0f32, 1.0, 257 * 2 * 90, cpu)? * 7.0)?.to_vec1()?;
    let gu: Vec<f32> = gu
        .into_iter()
        .map(|v| match (v.abs() - 7.0).abs() < 0.1 {
            true => v * 1.05,
            false => v,
        })
        .collect();
    let gu = Tensor::from_vec(gu, (257, 2 * 90), cpu)?;
    let glu = crate::ops::swiglu::Glu::Clamped {
        alpha: 1.702,
        limit: 7.0,
    };
    out.extend(device_vs_cpu(
        "clamped_glu (gpt-oss, I = 90)",
        "clamped_glu",
        device,
        dtype,
        &[gu],
        &|t| crate::ops::swiglu::glu_packed(&t[0], glu),
    )?);
    out.extend(attention::check_attention(device, dtype)?);
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
    // Rows of 128 take the 16-byte kernels; rows of 36 the element-wise ones in bf16/f16. The
    // gather row by row and token-major (`ROWS_BY_TOKEN`, whatever its setting outside).
    for (h, by_token) in [(128usize, false), (36, false), (128, true), (36, true)] {
        let _order = ROWS_BY_TOKEN.scoped(by_token);
        let xr = Tensor::randn(0f32, 1.0, (n, h), cpu)?;
        let wr = Tensor::rand(0f32, 1.0, (n, k), cpu)?;
        let read = if by_token { ", token-major" } else { "" };
        out.extend(device_vs_cpu(
            &format!("routing gather/combine (rows of {h}{read})"),
            "gather_rows/combine_rows",
            device,
            dtype,
            &[xr, wr],
            &|t| {
                let order = RowOrder::new(tokens.clone(), slots.clone(), k, t[0].device())?;
                let y = gather_rows(&t[0], &order)?.sin()?;
                // Routing weights stay f32 in the model (the CUDA kernels take them so).
                combine_rows(&y, &t[1].to_dtype(DType::F32)?, &order)
            },
        )?);
    }
    out.extend(dots::check_row_dots(device, dtype, (&tokens, &slots), k)?);
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
        "routed_experts",
        device,
        dtype,
        &[
            Tensor::randn(0f32, 1.0, (n, 128), cpu)?,
            Tensor::rand(0f32, 1.0, (n, k), cpu)?,
        ],
        &|t| {
            let d = t[0].device();
            let stack = |ps: &[QuantizedParam]| -> Result<ExpertWeights> {
                let ws = ps
                    .iter()
                    .map(|p| Nf4Weight::from_param(p, d))
                    .collect::<Result<Vec<_>>>()?;
                ExpertWeights::stack(&ws)
            };
            let order = RowOrder::new(tokens.clone(), slots.clone(), k, d)?;
            routed_experts(
                &t[0],
                Weights::Output(&t[1].to_dtype(DType::F32)?),
                &order,
                &stack(&gate_up_params)?,
                &stack(&down_params)?,
                &expert_counts,
                None,
            )
        },
    )?);
    // LoRA r 16 over experts 3..19 of 20 (a rank's slice).
    let a = Tensor::randn(0f32, 0.1, (16 * 20, 256), cpu)?;
    let b = Tensor::randn(0f32, 0.1, (384, 16 * 20), cpu)?;
    out.extend(device_vs_cpu(
        "grouped_lora 16 of 20 experts r16",
        "grouped_lora",
        device,
        dtype,
        &[xs, a, b],
        &|t| grouped_lora(&t[0], &t[1], &t[2], &counts, 3, 16, 2.0),
    )?);
    out.extend(outer::check_grouped_outer(device, dtype)?);
    out.extend(delta_rule::check_delta_rule(device, dtype)?);
    out.extend(conv_silu::check_conv_silu(device, dtype)?);
    out.extend(linear_attn::check_delta_prep(device, dtype)?);
    out.extend(linear_attn::check_gated_norm(device, dtype)?);
    Ok(out)
}

/// The op comparisons on `device`, in the order `moeq gpu-check` prints them.
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
    // Fused cross-entropy rows: 37 rows × a 5,000-word vocabulary (several strides of the 1,024
    // threads; rows of whole 16-byte packs) and × 4,999 (the scalar path), every fifth row
    // ignored; dlogits and per-row losses against the CPU loop in f32. The loss is the op's
    // forward, dlogits its backward.
    for vocab in [5000u32, 4999] {
        let logits = (Tensor::randn(0f32, 1.0, (37, vocab as usize), &Device::Cpu)? * 3.0)?;
        let targets: Vec<u32> = (0..37u32).map(|r| (r * 131 + 7) % vocab).collect();
        let weights: Vec<f32> = (0..37)
            .map(|r| if r % 5 == 4 { 0.0 } else { 1.0 })
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                cross_entropy_rows(
                    &logits.to_dtype(dtype)?.to_device(d)?,
                    &Tensor::from_slice(&targets, 37, d)?,
                    &Tensor::from_slice(&weights, 37, d)?,
                    0.5,
                )
            };
            let ((dx, loss), (dx_ref, loss_ref)) = (run(device)?, run(&Device::Cpu)?);
            let row = |pass| lookup("cross_entropy_rows", dtype.as_str(), pass);
            out.push(compare(
                &format!("cross_entropy_rows V {vocab} {dtype:?} dlogits"),
                &dx,
                &dx_ref,
                row(Pass::Backward)?,
            )?);
            out.push(compare(
                &format!("cross_entropy_rows V {vocab} {dtype:?} loss"),
                &loss,
                &loss_ref,
                row(Pass::Forward)?,
            )?);
        }
    }
    out.extend(rows::check_rows(device)?);
    out.extend(adamw::check_adamw(device)?);
    out.extend(thin::check_thin_gemm(device)?);
    out.extend(in_k::check_lora_in_k(device)?);
    out.extend(chunks::check_chunk_buffers(device)?);
    #[cfg(feature = "cuda")]
    out.extend(sm90::check_sm90_grouped(device)?);
    #[cfg(feature = "cuda")]
    out.extend(cudnn::check_cudnn_attention(device)?);
    // Generated frozen weights (model_files::generated): the counter-based normal stream on the
    // device against its CPU twin (bf16), 3·10^6 values across several launch blocks.
    let row = lookup("generated weights", "bf16", Pass::Forward)?;
    for (key, std, offset) in [(7u64, 0.02f32, 0.0f32), (u64::MAX - 3, 0.02, 1.0)] {
        let draw = |d: &Device| generated::draw(key, 3_000_001, std, offset, d);
        out.push(compare(
            &format!("generated weights N({offset}, {std}) key {key}"),
            &draw(device)?,
            &draw(&Device::Cpu)?,
            row,
        )?);
    }
    Ok(out)
}
