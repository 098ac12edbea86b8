//! gpu-check entry for the fused AdamW update (`ops::adamw`, `kernels/adamw.cu`): three steps
//! of `train::adamw::AdamW` on the device against the same steps with candle's tensor ops on
//! the CPU — parameters and both moments, bit for bit.

use super::{compare, lookup, Comparison, Pass};
use crate::train::adamw::{AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};

pub(super) fn check_adamw(device: &Device) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    // Sizes: a matrix, a vector of one launch block and a length that is not a multiple of the
    // block (70,001); random parameters and gradients of several scales, never zeros.
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
    let config = AdamWConfig {
        weight_decay: 0.01,
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
    let mut out = Vec::new();
    for (i, (d, c)) in dev_vars.iter().zip(&cpu_vars).enumerate() {
        out.push(compare(
            &format!("adamw fused, 3 steps: p{i} {:?}", shapes[i]),
            d.as_tensor(),
            c.as_tensor(),
            row,
        )?);
    }
    for ((name, d), (_, c)) in dev_opt.state().iter().zip(cpu_opt.state().iter()) {
        out.push(compare(
            &format!("adamw fused, 3 steps: {name}"),
            d,
            c,
            row,
        )?);
    }
    Ok(out)
}
