//! gpu-check entry for the expert adapters' tensor-core products (`ops::thin_gemm`,
//! `kernels/grouped_lora.cu`) as the routed experts use them: `GroupedLora::forward_into`
//! (the update added onto a base output) and `backward_into` (dx added onto a base dx, dA,
//! dB) in bf16 on the device against the same calls on the CPU in f32 (the `grouped_gemm`
//! formulation). Shapes cross every tile edge: groups of 1, 63, 64, 65 and 600 rows (three
//! 256-row partial sums in `outer`) and an empty one, reductions of 200 and 264 (not whole
//! 64-wide slices), outputs of 72, 136 and 264 columns (partial 128-column tiles), ranks 8, 16
//! and 40 (zero-padded to 16, 16, 64); and the tiny models' shapes (32 and 64 wide, rank 8).

use super::{compare, lookup, Comparison, Pass};
use crate::ops::experts::GroupedLora;
use crate::ops::thin_gemm;
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_thin_gemm(device: &Device) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    // Local experts 2..9 of 10 (a rank's slice), rows per expert:
    let counts = [1usize, 0, 63, 64, 65, 600, 7];
    let (experts, first) = (10usize, 2usize);
    let m: usize = counts.iter().sum();
    let mut out = Vec::new();
    for (r, inp, outf, keep_h) in [
        (16usize, 200usize, 136usize, true),
        (8, 264, 72, false),
        (40, 128, 264, true),
        // At the tiny models' widths (gpu-check's train step: H 64, I 32): reductions shorter
        // than one 64-wide slice, outputs narrower than one tile.
        (8, 32, 64, false),
        (8, 64, 32, true),
    ] {
        let randn = |std: f32, shape: (usize, usize)| Tensor::randn(0f32, std, shape, cpu);
        let (x, dy) = (randn(1.0, (m, inp))?, randn(1.0, (m, outf))?);
        let (y0, dx0) = (randn(1.0, (m, outf))?, randn(1.0, (m, inp))?);
        let (a, b) = (
            randn(0.1, (r * experts, inp))?,
            randn(0.1, (outf, r * experts))?,
        );
        let run = |d: &Device, dt: DType| -> Result<Vec<Tensor>> {
            let l = GroupedLora::new(&counts, first, r, 1.5);
            let on = |t: &Tensor| t.to_dtype(dt)?.to_device(d);
            // The factors stay f32, as trainable parameters are.
            let (ad, bd) = (a.to_device(d)?, b.to_device(d)?);
            let xd = on(&x)?;
            let (y, h) = l.forward_into(on(&y0)?, &xd, &ad, &bd)?;
            let kept = keep_h.then_some(&h);
            let (dx, da, db) = l.backward_into(&xd, &ad, &bd, &on(&dy)?, kept, Some(on(&dx0)?))?;
            [y, h, dx, da, db]
                .iter()
                .map(|t| t.to_device(cpu))
                .collect()
        };
        let before = thin_gemm::launches();
        let got = run(device, DType::BF16)?;
        let launched = thin_gemm::launches() - before;
        // project + expand, then project (dh), two outer, expand (dx); one more project when
        // the backward recomputes the hidden; none with `MOEQ_GROUPED_LORA=cublas`.
        let expected = match (thin_gemm::disabled(), keep_h) {
            (true, _) => 0,
            (false, true) => 6,
            (false, false) => 7,
        };
        if device.is_cuda() && launched != expected {
            candle_core::bail!(
                "thin_gemm r{r}: {launched} kernel launches on the device, expected {expected}"
            );
        }
        let want = run(cpu, DType::F32)?;
        for (i, name) in ["y + update", "hidden", "dx + base", "dA", "dB"]
            .iter()
            .enumerate()
        {
            let pass = if i < 2 { Pass::Forward } else { Pass::Backward };
            out.push(compare(
                &format!("thin_gemm r{r} {inp}→{outf} BF16 {name}"),
                &got[i],
                &want[i],
                lookup("thin_gemm", "bf16", pass)?,
            )?);
        }
    }
    Ok(out)
}
