//! gpu-check entries for the 4-bit linear op (nf4_linear) and the projection + LoRA op
//! (lora_linear) against the CPU.

use super::{compare, device_vs_cpu, lookup, Comparison, Pass};
use crate::ops::lora_linear::lora_linear;
use crate::ops::nf4_linear::{nf4_linear, Nf4Weight};
use crate::quant::{QuantSettings, QuantizedParam};
use candle_core::{DType, Device, Result, Tensor, Var};

/// The 4-bit linear op on `device` vs the same op on the CPU, forward and input gradient.
pub(super) fn check_nf4_linear(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let (out_f, in_f, tokens) = (384, 256, 129);
    let w: Vec<f32> = Tensor::randn(0f32, 0.05, out_f * in_f, &Device::Cpu)?.to_vec1()?;
    let q = QuantizedParam::quantize(&w, &[out_f, in_f], QuantSettings::default())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let x = Tensor::randn(0f32, 1.0, (tokens, in_f), &Device::Cpu)?.to_dtype(dtype)?;
    let upstream = Tensor::randn(0f32, 1.0, (tokens, out_f), &Device::Cpu)?;
    let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
        let weight = Nf4Weight::from_param(&q, dev)?.into();
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let y = nf4_linear(xv.as_tensor(), &weight)?;
        let loss = (y.to_dtype(DType::F32)? * upstream.to_device(dev)?)?.sum_all()?;
        let grads = loss.backward()?;
        let gx = grads
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("nf4_linear: no gradient".into()))?;
        Ok((y.to_device(&Device::Cpu)?, gx.to_device(&Device::Cpu)?))
    };
    let (y, gx) = run(device)?;
    let (y_ref, gx_ref) = run(&Device::Cpu)?;
    let row = |pass| lookup("nf4_linear", dtype.as_str(), pass);
    let mut out = vec![
        compare(
            &format!("nf4_linear {dtype:?} forward"),
            &y,
            &y_ref,
            row(Pass::Forward)?,
        )?,
        compare(
            &format!("nf4_linear {dtype:?} d_x"),
            &gx,
            &gx_ref,
            row(Pass::Backward)?,
        )?,
    ];
    // The same projection with a bias and a LoRA update (r 16, scaling 2) as one op: the same
    // sums plus rank-16 products; gradients for x, A and B.
    let cpu = &Device::Cpu;
    let lora_inputs = [
        Tensor::randn(0f32, 1.0, (tokens, in_f), cpu)?,
        Tensor::randn(0f32, 0.3, (16, in_f), cpu)?,
        Tensor::randn(0f32, 0.3, (out_f, 16), cpu)?,
    ];
    let bias = Tensor::randn(0f32, 1.0, out_f, cpu)?;
    out.extend(device_vs_cpu(
        "lora_linear (bias, r 16)",
        "lora_linear",
        device,
        dtype,
        &lora_inputs,
        &|t| {
            let d = t[0].device();
            let weight = Nf4Weight::from_param(&q, d)?.into();
            let bias = bias.to_dtype(t[0].dtype())?.to_device(d)?;
            lora_linear(&t[0], &weight, Some(&bias), &t[1], &t[2], 2.0, None)
        },
    )?);
    Ok(out)
}
