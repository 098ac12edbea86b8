//! The backward's row dots against their CPU twins: the packed SwiGLU backward with each row's
//! dot of dy and the stored activation (the routing weights' gradient, `ops::routed_experts`),
//! the norm's backward plus a residual, and the combine's backward by rows with the weights'
//! gradient from such dots.

use super::super::tolerance::{lookup, Pass};
use super::super::{compare, Comparison};
use crate::ops::add::add;
use crate::ops::norm::{rms_norm, rms_norm_backward, rms_norm_backward_plus, rms_norm_wide};
use crate::ops::routing::{
    combine_backward_rows, gather_rows, weights_grad, RowOrder, ROWS_BY_TOKEN,
};
use crate::ops::swiglu::{packed_backward_dot, packed_backward_in_place, Glu};
use candle_core::{DType, Device, Result, Tensor};

/// Runs `f` (no graph: a backward's own arithmetic) on the CPU in f32 and on `device` in
/// `dtype` over the same random inputs and compares each of its outputs within the backward
/// row of `op` in `dtype`.
fn outputs_vs_cpu(
    what: &str,
    op: &str,
    device: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<Vec<Comparison>> {
    let row = lookup(op, dtype.as_str(), Pass::Backward)?;
    let run = |dev: &Device, dt: DType| -> Result<Vec<Tensor>> {
        let ts = inputs
            .iter()
            .map(|t| t.to_dtype(dt)?.to_device(dev))
            .collect::<Result<Vec<_>>>()?;
        f(&ts)?.iter().map(|t| t.to_device(&Device::Cpu)).collect()
    };
    let (got, want) = (run(device, dtype)?, run(&Device::Cpu, DType::F32)?);
    got.iter()
        .zip(&want)
        .enumerate()
        .map(|(i, (g, w))| compare(&format!("{what} {dtype:?} output{i}"), g, w, row))
        .collect()
}

/// The row-dot checks in `dtype`; the combine's over the routing of `check_model_ops` (rows
/// sorted by expert: their tokens and slots, k slots per token).
pub(super) fn check_row_dots(
    device: &Device,
    dtype: DType,
    (tokens, slots): (&[u32], &[u32]),
    k: usize,
) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // The packed SwiGLU's backward with each row's dot of dy and the stored activation: the
    // one-warp-per-row kernel at I = 192, the tensor ops at I = 102.
    for half in [192usize, 102] {
        let gu = (Tensor::randn(0f32, 1.0, (257, 2 * half), cpu)? * 3.0)?;
        let dy = Tensor::randn(0f32, 1.0, (257, half), cpu)?;
        out.extend(outputs_vs_cpu(
            &format!("swiglu_packed dot (I = {half})"),
            "swiglu_packed",
            device,
            dtype,
            &[gu, dy],
            &|t| {
                let (dgu, dot) = packed_backward_dot(&t[0], &t[1], Glu::Silu)?;
                Ok(vec![dgu, dot])
            },
        )?);
    }
    // The same backward written over gu (`packed_backward_in_place`, the experts' chunks in
    // reused buffers), with and without the dots, against the allocating kernels on the same
    // device: equal bit for bit (rows of I = 192 take it; 102 are not whole packs in f32
    // and bf16: None, gu untouched).
    for (half, dots) in [(192usize, true), (192, false), (102, true)] {
        let on = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
        let gu = on((Tensor::randn(0f32, 1.0, (257, 2 * half), cpu)? * 3.0)?)?;
        let dy = on(Tensor::randn(0f32, 1.0, (257, half), cpu)?)?;
        let (want, want_dot) = packed_backward_dot(&gu, &dy, Glu::Silu)?;
        let over = gu.copy()?;
        let served = packed_backward_in_place(&over, &dy, Glu::Silu, dots)?;
        let what = format!("swiglu_packed backward in place (I = {half}, dots {dots}) {dtype:?}");
        let exact = lookup("add", "any", Pass::Exact)?;
        match served {
            Some(dot) => {
                out.push(compare(
                    &what,
                    &over.to_device(cpu)?,
                    &want.to_device(cpu)?,
                    exact,
                )?);
                if let Some(dot) = dot {
                    let (g, w) = (dot.to_device(cpu)?, want_dot.to_device(cpu)?);
                    out.push(compare(&format!("{what} dots"), &g, &w, exact)?);
                }
            }
            // Not served (CPU; rows not whole packs): gu must be untouched.
            None => out.push(compare(
                &what,
                &over.to_device(cpu)?,
                &gu.to_device(cpu)?,
                exact,
            )?),
        }
    }
    // The pre-norm residual's input gradient, plus + the norm's dx, in one pass (CUDA bf16:
    // rows of 2,048 and 1,544 in the norm's row kernels; f32 takes the separate add): against
    // the CPU, and against the separate backward and add on the same device, which it must
    // equal bit for bit.
    for d in [2048usize, 1544] {
        let inputs = [
            Tensor::randn(0f32, 1.0, (21, d), cpu)?,
            (Tensor::randn(0f32, 0.2, d, cpu)? + 1.0)?,
            Tensor::randn(0f32, 1.0, (21, d), cpu)?,
            Tensor::randn(0f32, 1.0, (21, d), cpu)?,
        ];
        let what = format!("rms_norm backward plus a residual (rows of {d})");
        let fused = |t: &[Tensor]| rms_norm_backward_plus(&t[0], &t[1], &t[2], &t[3], 1e-6);
        out.extend(outputs_vs_cpu(
            &what,
            "rms_norm",
            device,
            dtype,
            &inputs,
            &|t| Ok(vec![fused(t)?]),
        )?);
        let on = inputs
            .iter()
            .map(|t| t.to_dtype(dtype)?.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        let separate = add(&on[3], &rms_norm_backward(&on[0], &on[1], &on[2], 1e-6)?)?;
        out.push(compare(
            &format!("{what} {dtype:?} = backward, then add"),
            &fused(&on)?.to_device(cpu)?,
            &separate.to_device(cpu)?,
            lookup("add", "any", Pass::Exact)?,
        )?);
    }
    // The norm written into rows 24 columns wider (`rms_norm_wide`, the joined q/k/v updates'
    // input: `ops::lora_joint::forward_wide`): its first columns equal the plain norm's on the
    // same device bit for bit (the same kernel body, another row stride), rows of 2,048 and
    // 1,544 (the `_vec` kernels on CUDA) and 1,000 (no `_vec` kernel: the concatenation).
    for d in [2048usize, 1544, 1000] {
        let on = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
        let x = on(Tensor::randn(0f32, 1.0, (21, d), cpu)?)?;
        let w = on((Tensor::randn(0f32, 0.2, d, cpu)? + 1.0)?)?;
        let wide = rms_norm_wide(&x, &w, 1e-6, 24)?;
        out.push(compare(
            &format!("rms_norm into wider rows (rows of {d}) {dtype:?} = rms_norm"),
            &wide.narrow(1, 0, d)?.to_device(cpu)?,
            &rms_norm(&x, &w, 1e-6)?.to_device(cpu)?,
            lookup("add", "any", Pass::Exact)?,
        )?);
    }
    let n = tokens.len() / k;
    // The combine's backward by rows (dy = w · dout) and the weights' gradient from row dots
    // (here of dy with a stand-in for the expert outputs): what the layer backward runs. Rows
    // of 128 and 1,032 take the warp-per-row kernel (1,032 in bf16/f16: a second, partial
    // round of packs), rows of 36 the element-wise one in bf16/f16; row by row and token-major
    // (`ROWS_BY_TOKEN`).
    for (h, by_token) in [
        (128usize, false),
        (36, false),
        (1032, false),
        (128, true),
        (1032, true),
    ] {
        let _order = ROWS_BY_TOKEN.scoped(by_token);
        let dout = Tensor::randn(0f32, 1.0, (n, h), cpu)?;
        let wr = Tensor::rand(0.1f32, 1.0, (n, k), cpu)?;
        let ys = Tensor::randn(0f32, 1.0, (n * k, h), cpu)?;
        let read = if by_token { ", token-major" } else { "" };
        out.extend(outputs_vs_cpu(
            &format!("routing combine rows (rows of {h}{read})"),
            "gather_rows/combine_rows",
            device,
            dtype,
            &[dout, wr, ys],
            &|t| {
                let order = RowOrder::new(tokens.to_vec(), slots.to_vec(), k, t[0].device())?;
                let w = t[1].to_dtype(DType::F32)?;
                let dys = combine_backward_rows(&w, &order, &t[0], t[0].dtype())?;
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                let dots = (f32(&dys)? * f32(&t[2])?)?.sum(1)?;
                Ok(vec![dys, weights_grad(&dots, &w, &order)?])
            },
        )?);
    }
    // Token-major against row by row on the device, bit for bit: the row gather and the
    // combine backward's weighted rows, rows of 1,032 (on the CPU both are `index_select`).
    let x = Tensor::randn(0f32, 1.0, (n, 1032), cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let w = Tensor::rand(0.1f32, 1.0, (n, k), cpu)?.to_device(device)?;
    let order = RowOrder::new(tokens.to_vec(), slots.to_vec(), k, device)?;
    let rows = |by_token: bool| -> Result<[Tensor; 2]> {
        let _order = ROWS_BY_TOKEN.scoped(by_token);
        let gathered = gather_rows(&x, &order)?.to_device(cpu)?;
        let weighted = combine_backward_rows(&w, &order, &x, dtype)?.to_device(cpu)?;
        Ok([gathered, weighted])
    };
    let (token_major, row_by_row) = (rows(true)?, rows(false)?);
    let names = ["gather", "combine backward rows"];
    for ((what, a), b) in names.into_iter().zip(token_major).zip(row_by_row) {
        out.push(compare(
            &format!("routing {what} {dtype:?}: token-major = row by row"),
            &a,
            &b,
            lookup("routing rows token-major", "any", Pass::Exact)?,
        )?);
    }
    Ok(out)
}
