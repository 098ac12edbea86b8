//! gpu-check entry for the cross-entropy written over the logits (`MOEQ_CE_IN_PLACE`,
//! `kernels/cross_entropy.cu`'s `_in_place` entry): against the allocating kernel on the same
//! device bit for bit (the same arithmetic row by row). 300 rows — more than any GPU's blocks
//! of the persistent grid, so each block loops over rows and reuses its shared partials —,
//! every seventh ignored, vocabularies of 20,000 (whole packs: bf16 threads take two packs an
//! iteration and a last one alone) and 20,001 (the scalar path), f32 and bf16; the rows fail
//! if the in-place kernel did not run on CUDA. Its values against the CPU are the allocating
//! kernel's rows ("cross_entropy_rows V …").

use super::super::tolerance::{lookup, Pass};
use super::super::{compare, Comparison};
use crate::ops::cross_entropy::{
    cross_entropy_rows, cross_entropy_rows_owned, in_place_launches, CE_IN_PLACE,
};
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_in_place(device: &Device) -> Result<Vec<Comparison>> {
    const ROWS: usize = 300;
    let exact = lookup("cross_entropy_rows in place", "any", Pass::Exact)?;
    let mut out = Vec::new();
    for vocab in [20_000u32, 20_001] {
        // Random logits with a spread like a language model's (never zeros).
        let logits = (Tensor::randn(0f32, 1.0, (ROWS, vocab as usize), &Device::Cpu)? * 4.0)?;
        let targets: Vec<u32> = (0..ROWS as u32).map(|r| (r * 7919 + 11) % vocab).collect();
        let weights: Vec<f32> = (0..ROWS)
            .map(|r| if r % 7 == 6 { 0.0 } else { 1.0 })
            .collect();
        let (t, w) = (
            Tensor::from_slice(&targets, ROWS, device)?,
            Tensor::from_slice(&weights, ROWS, device)?,
        );
        for dtype in [DType::F32, DType::BF16] {
            let x = logits.to_dtype(dtype)?.to_device(device)?;
            let (dx, loss) = cross_entropy_rows(&x, &t, &w, 0.25)?;
            let _on = CE_IN_PLACE.scoped(true);
            let before = in_place_launches();
            let (dx_in, loss_in) = cross_entropy_rows_owned(x.copy()?, &t, &w, 0.25)?;
            if device.is_cuda() && in_place_launches() != before + 1 {
                candle_core::bail!("cross_entropy_rows: the in-place kernel did not run");
            }
            for (what, a, b) in [("dlogits", &dx_in, &dx), ("loss", &loss_in, &loss)] {
                let name = format!(
                    "cross_entropy_rows {ROWS} rows V {vocab} {dtype:?} in place = apart {what}"
                );
                out.push(compare(&name, a, b, exact)?);
            }
        }
    }
    Ok(out)
}
