//! gpu-check entry for Gated DeltaNet's conv + SiLU op (`ops::conv_silu_op::apply`,
//! `kernels/conv_silu.cu`) against autograd through its reference
//! (`ops::linear_attn_parts::causal_conv1d_silu`) on the CPU in the same dtype: the output,
//! d x and d weight (the weight is a variable here; in training it is frozen and the op skips
//! its gradient) for loss = Σ y·up. Shapes: the tiny model's (C = 24, T = 37, two rows) and
//! Qwen3.5-35B-A3B's (C = 8,192 channels of q, k, v, T = 512), K = 4.

use super::{compare, lookup, Comparison, Pass};
use crate::ops::conv_silu_op::apply;
use crate::ops::linear_attn_parts::causal_conv1d_silu;
use candle_core::{DType, Device, Result, Tensor, Var};

type Form = fn(&Tensor, &Tensor) -> Result<Tensor>;

pub(super) fn check_conv_silu(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    for (b, t, c) in [(2usize, 37usize, 24usize), (1, 512, 8192)] {
        let k = 4;
        let x = Tensor::randn(0f32, 1.0, (b, t, c), cpu)?.to_dtype(dtype)?;
        let w = Tensor::randn(0f32, 0.5, (c, k), cpu)?.to_dtype(dtype)?;
        let up = Tensor::randn(0f32, 1.0, (b, t, c), cpu)?;
        let run = |d: &Device, form: Form| -> Result<Vec<Tensor>> {
            let (vx, vw) = (
                Var::from_tensor(&x.to_device(d)?)?,
                Var::from_tensor(&w.to_device(d)?)?,
            );
            let y = form(vx.as_tensor(), vw.as_tensor())?;
            let loss = (y.to_dtype(DType::F32)? * up.to_device(d)?)?.sum_all()?;
            let grads = loss.backward()?;
            let mut res = vec![y.to_device(cpu)?];
            for v in [&vx, &vw] {
                let g = grads.get(v.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg("conv_silu: an input got no gradient".into())
                })?;
                res.push(g.to_device(cpu)?);
            }
            Ok(res)
        };
        let got = run(device, apply)?;
        let want = run(cpu, causal_conv1d_silu)?;
        for (i, part) in ["y", "dx", "dw"].iter().enumerate() {
            let pass = if i == 0 {
                Pass::Forward
            } else {
                Pass::Backward
            };
            out.push(compare(
                &format!("conv_silu B{b} T{t} C{c} K{k} {dtype:?} {part}"),
                &got[i],
                &want[i],
                lookup("conv_silu", dtype.as_str(), pass)?,
            )?);
        }
    }
    Ok(out)
}
