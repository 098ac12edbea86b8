//! gpu-check entry for the expert adapters' weight gradients (`grouped_gemm::grouped_outer`):
//! CUDA's own kernel for small groups and cuBLAS for large ones, against the CPU products.

use super::{compare, lookup, Comparison, Pass};
use crate::ops::grouped_gemm::grouped_outer;
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_grouped_outer(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // The expert adapters' weight gradients (`grouped_outer`) at a rank that is not whole
    // chunks of 16 (24) and 200 columns (a partial 128-column tile): groups of 45 and 70 rows
    // (partial 32-row tiles), one of one row and one empty, which CUDA runs with its own
    // kernel; then groups of 700 and 900 rows, which it leaves to cuBLAS (`OUTER_KERNEL_ROWS`).
    // A kernel of the backward pass (the weight gradients): its backward rows.
    let row = lookup("grouped_outer", dtype.as_str(), Pass::Backward)?;
    let (rk, cols) = (24usize, 200usize);
    for (what, groups) in [
        (
            "kernel",
            vec![
                (1usize, 0usize, 45usize),
                (2, 45, 0),
                (4, 45, 1),
                (5, 46, 70),
            ],
        ),
        ("cuBLAS", vec![(0, 0, 700), (3, 700, 900)]),
    ] {
        let rows: usize = groups.iter().map(|g| g.2).sum();
        let rm = Tensor::randn(0f32, 1.0, (rows, rk), cpu)?;
        let xm = Tensor::randn(0f32, 1.0, (rows, cols), cpu)?;
        let outer = |d: &Device| {
            let r2 = rm.to_dtype(dtype)?.to_device(d)?;
            let x2 = xm.to_dtype(dtype)?.to_device(d)?;
            grouped_outer(&r2, &x2, &groups, 6, 0.5)
        };
        let want = outer(&Device::Cpu)?;
        out.push(compare(
            &format!(
                "grouped_outer r{rk} × {cols}, {} groups ({what}) {dtype:?}",
                groups.len()
            ),
            &outer(device)?,
            &want,
            row,
        )?);
    }
    Ok(out)
}
