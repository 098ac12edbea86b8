//! Every GPU path compared with its CPU reference on random data, in one place, with its
//! tolerance from one table (`tolerance::TOLERANCES`):
//! - `ops`: the custom ops, forward and backward, and the kernels around them (routing plan,
//!   embedding rows, drawn weights);
//! - `quant`: the CUDA quantization kernels, byte for byte (CUDA builds);
//! - `train_step`: the whole training step of each architecture;
//! - `nccl`: the NCCL collectives against the CPU collective (`moeq nccl-check`; NCCL builds).
//!
//! `moeq gpu-check` runs the first three on CUDA; the CPU test suite runs `ops` and
//! `train_step` on the CPU so the machinery itself is exercised in CI.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ops;
#[cfg(feature = "cuda")]
pub mod quant;
pub mod tolerance;
pub mod train_step;

use candle_core::{DType, Device, Result, Tensor};
use std::fmt;
use tolerance::Tolerance;

#[derive(Debug, Clone)]
pub struct Comparison {
    pub what: String,
    /// The table row the tolerance came from.
    pub row: &'static Tolerance,
    pub max_abs: f32,
    /// Largest |got − want| / (atol + rtol·|want|); ≤ 1 passes.
    pub worst_ratio: f32,
    pub rtol: f32,
    /// The row's atol rule resolved against this reference.
    pub atol: f32,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0 && self.worst_ratio.is_finite()
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<5} {:<32} max|diff| {:.3e}  worst/tol {:.3}  (rtol {:.1e}, atol {:.1e})",
            if self.passed() { "PASS" } else { "FAIL" },
            self.what,
            self.max_abs,
            self.worst_ratio,
            self.rtol,
            self.atol
        )
    }
}

/// `got` against `want` within the tolerance of `row`, elementwise in f32.
pub fn compare(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    row: &'static Tolerance,
) -> Result<Comparison> {
    let got: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if got.len() != want.len() {
        candle_core::bail!(
            "{what}: {} values vs {} in the reference",
            got.len(),
            want.len()
        );
    }
    let max_ref = if row.atol.needs_max() {
        want.iter().fold(0f32, |m, w| m.max(w.abs()))
    } else {
        0.0
    };
    let (rtol, atol) = (row.rtol as f32, row.atol.resolve(max_ref));
    let (mut max_abs, mut worst) = (0f32, 0f32);
    for (g, w) in got.iter().zip(&want) {
        let d = (g - w).abs();
        max_abs = max_abs.max(d);
        let ratio = if d.is_nan() {
            f32::INFINITY
        } else {
            d / (atol + rtol * w.abs())
        };
        worst = worst.max(ratio);
    }
    Ok(Comparison {
        what: what.to_string(),
        row,
        max_abs,
        worst_ratio: worst,
        rtol,
        atol,
    })
}

/// One part of `moeq gpu-check` (`--only`).
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Part {
    /// The ops forward and backward against their CPU references.
    Ops,
    /// The quantization kernels (CUDA builds).
    Quant,
    /// The whole training step of every model type.
    TrainStep,
}

/// What `moeq gpu-check` compares on `device` (a CUDA device), in order: the ops, the
/// quantization kernels, the training step; `only` picks one of them.
pub fn run_all(device: &Device, only: Option<Part>) -> Result<Vec<Comparison>> {
    let runs = |part| only.is_none_or(|o| o == part);
    let mut out = Vec::new();
    if runs(Part::Ops) {
        out.extend(ops::run_all(device)?);
    }
    #[cfg(feature = "cuda")]
    if runs(Part::Quant) {
        out.extend(quant::run_all(device)?);
    }
    if runs(Part::TrainStep) {
        out.extend(train_step::run_all(device)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::tolerance::{Check, TOLERANCES};
    use candle_core::Device;

    /// Every row of the table is some comparison's tolerance: rows of the checks that run on the
    /// CPU are used by the CPU run; the CUDA- and NCCL-only rows (quant, nccl, the Hopper
    /// kernels' checks: the grouped GEMM's twin, the attention backward's rerun) are looked up
    /// by name in their check's source.
    #[test]
    fn every_row_is_used() {
        let mut results = super::ops::run_all(&Device::Cpu).unwrap();
        results.extend(super::train_step::run_all(&Device::Cpu).unwrap());
        let sources = [
            (Check::Quant, include_str!("quant.rs")),
            (Check::Nccl, include_str!("nccl.rs")),
        ];
        for t in TOLERANCES {
            let used = match sources.iter().find(|(c, _)| *c == t.check) {
                Some((_, src)) => src.contains(&format!("\"{}\"", t.op)),
                None => {
                    let name = format!("\"{}\"", t.op);
                    results.iter().any(|r| r.row == t)
                        || include_str!("ops/sm90.rs").contains(&name)
                        || include_str!("ops/cudnn.rs").contains(&name)
                }
            };
            assert!(used, "row {} {} {} is not used", t.op, t.dtype, t.pass);
        }
    }
}
