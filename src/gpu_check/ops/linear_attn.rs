//! gpu-check entries for the linear-attention layer's fused ops against autograd through the
//! candle ops they replace, on the CPU in the same dtype: `ops::delta_prep_op` (the conv output's
//! heads → packed q̂ | k̂ | v, `kernels/delta_prep.cu`) and `ops::gated_norm_op` (the gated
//! RMSNorm, `kernels/gated_norm.cu`), output and every input gradient for loss = Σ y·up. Shapes:
//! the tiny model's (two value heads per key head, heads of 8 and 6) and Qwen3.5-35B-A3B's
//! (16 key heads, 32 value heads of 128, T = 256).

use super::{compare, lookup, Comparison, Pass};
use crate::ops::delta_prep_op::{self, Heads};
use crate::ops::gated_norm_op;
use crate::ops::linear_attn_parts::gated_rms_norm;
use candle_core::{DType, Device, Result, Tensor, Var};

/// y and the gradients of `vars` for loss = Σ y·up, all on the CPU.
fn run(
    device: &Device,
    inputs: &[Tensor],
    up: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let cpu = &Device::Cpu;
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(device)?))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let grads = (y.to_dtype(DType::F32)? * up.to_device(device)?)?
        .sum_all()?
        .backward()?;
    let mut out = vec![y.to_device(cpu)?];
    for v in &vars {
        let g = grads.get(v.as_tensor()).ok_or_else(|| {
            candle_core::Error::Msg("linear-attention op: an input got no gradient".into())
        })?;
        out.push(g.to_device(cpu)?);
    }
    Ok(out)
}

fn pass(i: usize) -> Pass {
    if i == 0 {
        Pass::Forward
    } else {
        Pass::Backward
    }
}

pub(super) fn check_delta_prep(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    let shapes = [
        (
            2,
            37,
            Heads {
                key_heads: 2,
                value_heads: 4,
                dk: 8,
                dv: 6,
            },
        ),
        (
            1,
            256,
            Heads {
                key_heads: 16,
                value_heads: 32,
                dk: 128,
                dv: 128,
            },
        ),
    ];
    for (b, t, h) in shapes {
        let c = 2 * h.key_heads * h.dk + h.value_heads * h.dv;
        let conv = Tensor::randn(0f32, 1.0, (b, t, c), cpu)?.to_dtype(dtype)?;
        let up = Tensor::randn(0f32, 1.0, (b, t, h.value_heads, 2 * h.dk + h.dv), cpu)?;
        let got = run(device, std::slice::from_ref(&conv), &up, &|x| {
            delta_prep_op::apply(&x[0], h)
        })?;
        let want = run(cpu, &[conv], &up, &|x| delta_prep_op::reference(&x[0], h))?;
        for (i, part) in ["y", "dconv"].iter().enumerate() {
            out.push(compare(
                &format!(
                    "delta_prep B{b} T{t} Hk{} Hv{} Dk{} Dv{} {dtype:?} {part}",
                    h.key_heads, h.value_heads, h.dk, h.dv
                ),
                &got[i],
                &want[i],
                lookup("delta_prep", dtype.as_str(), pass(i))?,
            )?);
        }
    }
    Ok(out)
}

pub(super) fn check_gated_norm(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    for (rows, d) in [(2 * 37 * 4, 6), (256 * 32, 128)] {
        let rand =
            |s: f32| -> Result<Tensor> { Tensor::randn(0f32, s, (rows, d), cpu)?.to_dtype(dtype) };
        let (x, gate) = (rand(1.0)?, rand(2.0)?);
        let w = (Tensor::randn(0f32, 0.3, d, cpu)? + 1.0)?.to_dtype(dtype)?;
        let up = Tensor::randn(0f32, 1.0, (rows, d), cpu)?;
        let (wd, eps) = (w.to_device(device)?, 1e-6);
        let got = run(device, &[x.clone(), gate.clone()], &up, &|t| {
            gated_norm_op::apply(&t[0], &t[1], &wd, eps)
        })?;
        let want = run(cpu, &[x, gate], &up, &|t| {
            gated_rms_norm(&t[0], &t[1], &w, eps)
        })?;
        for (i, part) in ["y", "dx", "dgate"].iter().enumerate() {
            out.push(compare(
                &format!("gated_norm {rows}×{d} {dtype:?} {part}"),
                &got[i],
                &want[i],
                lookup("gated_norm", dtype.as_str(), pass(i))?,
            )?);
        }
    }
    Ok(out)
}
