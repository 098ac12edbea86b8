//! gpu-check entry for the expert adapters inside their products' K (`ops::lora_in_k`, the
//! default unless `MOEQ_LORA_IN_K=0`): `lora_in_k::forward` (the hidden projected into the
//! rows' last r columns, each chunk of experts dequantized beside s·B) and
//! `lora_in_k::backward` (dh into the gradient rows' last columns, dx over [dy | dh]·[W; A]
//! with A below each expert's rows, dA and dB reading x, h and dy where they lie), bf16 on the device against the same calls
//! on the CPU in f32, for nested and plain statistics; and, on the device, the pieces against
//! their contiguous forms bit for bit: the wide row gather's and the wide SwiGLU's first
//! columns, a chunk dequantized beside its tail, the hidden projected into a view.

use super::super::tolerance::{lookup, Pass};
use super::super::{compare, Comparison};
use crate::ops::experts::{ExpertWeights, GroupedLora};
use crate::ops::lora_in_k;
use crate::ops::nf4_linear::Nf4Weight;
use crate::ops::routing::{
    combine_backward_rows, combine_backward_rows_wide, gather_forward, gather_forward_wide,
    RowOrder,
};
use crate::ops::swiglu::{
    packed_backward, packed_backward_dot, packed_backward_wide, packed_forward,
    packed_forward_wide, Glu,
};
use crate::ops::thin_gemm::{project, project_into, ThinPlan};
use crate::quant::{QuantSettings, QuantizedParam};
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_lora_in_k(device: &Device) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    // 8 experts; groups crossing the thin kernels' 64-row tiles, two without rows. 264 inputs
    // (+16: K 280, a partial 64-wide step), 136 outputs; chunks of 3 experts.
    let counts = [5usize, 0, 63, 64, 130, 7, 0, 33];
    let (e, inp, out, r) = (8usize, 264usize, 136usize, 16usize);
    let m: usize = counts.iter().sum();
    let randn = |std: f32, shape: (usize, usize)| Tensor::randn(0f32, std, shape, cpu);
    let (x, dy) = (randn(1.0, (m, inp))?, randn(1.0, (m, out))?);
    let (a, b) = (randn(0.1, (r * e, inp))?, randn(0.1, (out, r * e))?);
    let fwd = lookup("lora in K", "bf16", Pass::Forward)?;
    let bwd = lookup("lora in K", "bf16", Pass::Backward)?;
    let mut res = Vec::new();
    for double_quant in [true, false] {
        let settings = QuantSettings {
            double_quant,
            ..QuantSettings::default()
        };
        let params = (0..e)
            .map(|_| {
                let w: Vec<f32> = Tensor::randn(0f32, 0.1, out * inp, cpu)?.to_vec1()?;
                QuantizedParam::quantize(&w, &[out, inp], settings)
                    .map_err(|err| candle_core::Error::Msg(err.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = |d: &Device| -> Result<ExpertWeights> {
            let ws = params
                .iter()
                .map(|q| Nf4Weight::from_param(q, d))
                .collect::<Result<Vec<_>>>()?;
            ExpertWeights::stack(&ws)
        };
        let run = |d: &Device, dt: DType| -> Result<Vec<Tensor>> {
            let (w, l) = (weights(d)?, GroupedLora::new(&counts, 0, r, 1.5));
            let on = |t: &Tensor| t.to_dtype(dt)?.to_device(d);
            let (ad, bd) = (a.to_device(d)?, b.to_device(d)?);
            // Tails of large values, not zeros: a tail left unwritten would show.
            let junk = |rows: usize| Tensor::ones((rows, r), dt, d)? * 1e3;
            let xw = Tensor::cat(&[on(&x)?, junk(m)?], 1)?;
            let chunk = 3 * out * (inp + r) * dt.size_in_bytes();
            let (y, h) = lora_in_k::forward(&l, &xw, &w, (&ad, &bd), chunk)?;
            let xv = xw.narrow(1, 0, inp)?;
            let dyw = Tensor::cat(&[on(&dy)?, junk(m)?], 1)?;
            let (dx, da, db) = lora_in_k::backward(&l, &dyw, &w, (&ad, &bd), (&xv, &h), chunk)?;
            let dh = dyw.narrow(1, out, r)?;
            [y, h, dx, dh, da, db]
                .iter()
                .map(|t| t.to_device(cpu))
                .collect()
        };
        let (got, want) = (run(device, DType::BF16)?, run(cpu, DType::F32)?);
        let stats = if double_quant { "nested" } else { "plain" };
        for (i, name) in ["output", "hidden", "dx", "dh", "dA", "dB"]
            .iter()
            .enumerate()
        {
            let row = if i < 2 { fwd } else { bwd };
            let what = format!("lora in K {inp}+{r}→{out} BF16 {stats} {name}");
            res.push(compare(&what, &got[i], &want[i], row)?);
        }
        // Three experts dequantized with a factor beside each row (the forward's [W | s·B]) or
        // below each expert's rows (the input gradients' [W; A]), against the plain
        // dequantization and the factor concatenated.
        let (w, exact) = (
            weights(device)?,
            lookup("lora in K pieces", "any", Pass::Exact)?,
        );
        for (transpose, shape, dim, side) in [
            (true, (3, out, r), 2, "beside"),
            (false, (3, r, inp), 1, "below"),
        ] {
            let factor = Tensor::randn(0f32, 1.0, shape, cpu)?
                .to_dtype(DType::BF16)?
                .to_device(device)?;
            let with = w.dequantize_with(2..5, DType::BF16, &factor, transpose)?;
            let cat = Tensor::cat(&[w.dequantize(2..5, DType::BF16)?, factor], dim)?;
            let what = format!("lora in K dequantized {side} ({stats})");
            res.push(compare(
                &what,
                &with.to_device(cpu)?,
                &cat.to_device(cpu)?,
                exact,
            )?);
        }
    }
    res.extend(pieces(device, (&x, &a), (m, inp, r))?);
    Ok(res)
}

/// On `device`, bit for bit: the first columns of the wide gather, activations, activation
/// gradients (with and without row dots) and weighted rows against the plain ones, and the
/// hidden projected into the last columns of a wide buffer against a new one.
fn pieces(
    device: &Device,
    (x, a): (&Tensor, &Tensor),
    (m, inp, r): (usize, usize, usize),
) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let exact = lookup("lora in K pieces", "any", Pass::Exact)?;
    let xd = x.to_dtype(DType::BF16)?.to_device(device)?;
    // A routing of the m rows, k = 2: each token's two rows in different places.
    let (n, k) = (m / 2, 2usize);
    let order = RowOrder::new(
        (0..n * k).map(|i| ((i * 7) % n) as u32).collect(),
        (0..n * k)
            .map(|i| (((i * 7) % n) * k + i / n) as u32)
            .collect(),
        k,
        device,
    )?;
    let src = xd.narrow(0, 0, n)?;
    let wide = gather_forward_wide(&src, &order, r)?.narrow(1, 0, inp)?;
    let plain = gather_forward(&src, &order)?;
    let mut res = vec![compare(
        "lora in K wide row gather",
        &wide.to_device(cpu)?,
        &plain.to_device(cpu)?,
        exact,
    )?];
    // The packed SwiGLU written into rows r wider (down's adapter in its K): its first columns.
    let gu = Tensor::cat(&[&xd, &xd.affine(-0.5, 0.25)?], 1)?;
    let wide = packed_forward_wide(&gu, Glu::Silu, r)?.narrow(1, 0, inp)?;
    res.push(compare(
        "lora in K wide activations",
        &wide.to_device(cpu)?,
        &packed_forward(&gu, Glu::Silu)?.to_device(cpu)?,
        exact,
    )?);
    // The packed SwiGLU's backward into rows r wider (gate_up's input gradient in its K),
    // without and with the row dots; the combine backward's weighted rows r wider (down's).
    let dy = xd.affine(0.5, -0.125)?;
    let (dgu, _) = packed_backward_wide(&gu, &dy, Glu::Silu, r, false)?;
    let (dgu_dot, dot) = packed_backward_wide(&gu, &dy, Glu::Silu, r, true)?;
    let (want_dgu, want_dot) = packed_backward_dot(&gu, &dy, Glu::Silu)?;
    let plain_dgu = packed_backward(&gu, &dy, Glu::Silu)?;
    let two_i = 2 * inp;
    let dot = dot.ok_or_else(|| candle_core::Error::Msg("lora in K: no row dots".into()))?;
    for (what, got, want) in [
        (
            "wide activation gradients",
            dgu.narrow(1, 0, two_i)?,
            plain_dgu,
        ),
        (
            "wide activation gradients with dots",
            dgu_dot.narrow(1, 0, two_i)?,
            want_dgu,
        ),
        ("wide activation gradients' dots", dot, want_dot),
    ] {
        let (got, want) = (got.to_device(cpu)?, want.to_device(cpu)?);
        res.push(compare(&format!("lora in K {what}"), &got, &want, exact)?);
    }
    let w = Tensor::rand(0.1f32, 1.0, (n, k), cpu)?.to_device(device)?;
    let wide = combine_backward_rows_wide(&w, &order, &src, DType::BF16, r)?.narrow(1, 0, inp)?;
    let plain = combine_backward_rows(&w, &order, &src, DType::BF16)?;
    res.push(compare(
        "lora in K wide weighted rows",
        &wide.to_device(cpu)?,
        &plain.to_device(cpu)?,
        exact,
    )?);
    let groups = vec![(0usize, 0usize, m / 3), (3, m / 3, m - m / 3)];
    let plan = ThinPlan::new(groups);
    let a3 = a
        .to_dtype(DType::BF16)?
        .to_device(device)?
        .reshape((a.dim(0)? / r, r, inp))?;
    if plan.applies(&xd, r, &[inp]) {
        let xw = Tensor::cat(&[&xd, &Tensor::zeros((m, r), DType::BF16, device)?], 1)?;
        let into = project_into(
            &xw.narrow(1, 0, inp)?,
            &a3,
            &plan,
            1.0,
            &xw.narrow(1, inp, r)?,
        )?;
        let new = project(&xd, &a3, &plan, 1.0)?;
        res.push(compare(
            "lora in K hidden into a view",
            &into.to_device(cpu)?,
            &new.to_device(cpu)?,
            exact,
        )?);
    }
    Ok(res)
}
