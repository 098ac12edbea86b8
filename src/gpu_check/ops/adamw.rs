//! gpu-check entries for the fused AdamW updates (`ops::adamw`: `kernels/adamw.cu`, and with
//! 8-bit blockwise moments `kernels/adamw8.cu`): three steps of `train::adamw::AdamW` on the
//! device against the same steps on the CPU (candle's tensor ops; `train::adamw8`'s loop) —
//! parameters and moments (codes and block absmax where 8-bit), bit for bit.

use super::{compare, lookup, Comparison, Pass};
use crate::train::adamw::{AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};

pub(super) fn check_adamw(device: &Device) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    // Sizes: a matrix, a vector of one launch block and a length that is not a multiple of the
    // block (70,001); random parameters and gradients of several scales, never zeros. With
    // 8-bit moments the matrix and the long vector are 8-bit (the last 256-block partial), the
    // 5-element vector keeps fp32 moments (under `MIN_8BIT_SIZE`).
    let shapes: [&[usize]; 3] = [&[257, 96], &[5], &[70_001]];
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 0.5, *s, cpu))
        .collect::<Result<_>>()?;
    let grads: Vec<Vec<Tensor>> = (0..3)
        .map(|step| {
            shapes
                .iter()
                .map(|s| Tensor::randn(0f32, 10f32.powi(step - 2), *s, cpu))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for eight_bit in [false, true] {
        out.extend(compare_steps(device, &shapes, &params, &grads, eight_bit)?);
    }
    Ok(out)
}

/// Three steps on `device` and on the CPU, compared.
fn compare_steps(
    device: &Device,
    shapes: &[&[usize]; 3],
    params: &[Tensor],
    grads: &[Vec<Tensor>],
    eight_bit: bool,
) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let config = AdamWConfig {
        weight_decay: 0.01,
        eight_bit,
        ..AdamWConfig::default()
    };
    // Step 2 clips its gradients (factor 0.3), as `max_grad_norm` does.
    let run = |d: &Device| -> Result<(Vec<Var>, AdamW)> {
        let vars: Vec<Var> = params
            .iter()
            .map(|p| Var::from_tensor(&p.to_device(d)?))
            .collect::<Result<_>>()?;
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()))
            .collect();
        let mut opt = AdamW::new(named, config)?;
        for (step, gs) in grads.iter().enumerate() {
            let mut store = GradStore::default();
            for (v, g) in vars.iter().zip(gs) {
                store.insert(v.as_tensor(), g.to_device(d)?);
            }
            let clip = if step == 1 { 0.3 } else { 1.0 };
            opt.step_clipped(&store, 2e-3, clip)?;
        }
        Ok((vars, opt))
    };
    let before = crate::ops::adamw::launches();
    let (dev_vars, dev_opt) = run(device)?;
    let fused = crate::ops::adamw::launches() - before;
    if device.is_cuda() && fused != 9 {
        candle_core::bail!("adamw: {fused} fused updates ran on the device, expected 3 steps × 3");
    }
    let (cpu_vars, cpu_opt) = run(cpu)?;
    let row = lookup("adamw", "f32", Pass::Exact)?;
    let kind = if eight_bit { "8-bit" } else { "fp32" };
    let mut out = Vec::new();
    for (i, (d, c)) in dev_vars.iter().zip(&cpu_vars).enumerate() {
        out.push(compare(
            &format!("adamw {kind} fused, 3 steps: p{i} {:?}", shapes[i]),
            d.as_tensor(),
            c.as_tensor(),
            row,
        )?);
    }
    let (ds, cs) = (dev_opt.state()?, cpu_opt.state()?);
    if ds.len() != cs.len() {
        candle_core::bail!("adamw {kind}: {} state tensors vs {}", ds.len(), cs.len());
    }
    for ((name, d), (_, c)) in ds.iter().zip(cs.iter()) {
        out.push(compare(
            &format!("adamw {kind} fused, 3 steps: {name}"),
            d,
            c,
            row,
        )?);
    }
    Ok(out)
}
