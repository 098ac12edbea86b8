//! gpu-check entry for Hopper's grouped GEMM (`ops::grouped_gemm::sm90`): the expert products
//! at Qwen3-30B-A3B's shapes through each of its compiled variants and through cuBLAS, all
//! against the CPU in f32.

use super::{compare, lookup, Comparison, Pass};
use crate::ops::grouped_gemm::sm90::{
    backend, forced, launches, set_backend, set_variant, Backend, VARIANTS,
};
use crate::ops::grouped_gemm::{grouped_gemm, Gemm, Product};
use candle_core::{DType, Device, Result, Tensor};

/// Restores the backend and the forced variant (if any) of before however the check ends.
struct Restore(Backend, Option<usize>);

impl Drop for Restore {
    fn drop(&mut self) {
        set_backend(self.0);
        set_variant(self.1);
    }
}

pub(super) fn check_sm90_grouped(device: &Device) -> Result<Vec<Comparison>> {
    let Device::Cuda(dev) = device else {
        return Ok(Vec::new());
    };
    let cc = dev.cuda_stream().context().compute_capability();
    if !matches!(cc, Ok((9, 0))) {
        println!("grouped GEMM (Hopper kernel): skipped, compute capability {cc:?} is not 9.0");
        return Ok(Vec::new());
    }
    let _restore = Restore(backend(), forced());
    let cpu = &Device::Cpu;
    let row = lookup("grouped_gemm sm90", "bf16", Pass::Forward)?;
    let mut out = Vec::new();
    // 12 experts with random rows, one empty, one of a single row and the rest not whole
    // 128-row tiles; rows offset into one token matrix and one output as the expert op lays
    // them out. Shapes: gate_up forward (A·Bᵀ, [1536, 2048] weights), down forward ([2048, 768]),
    // and the input gradients through both (A·B).
    let mut counts: Vec<usize> = Tensor::rand(1f32, 700.0, 12, cpu)?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| *v as usize)
        .collect();
    counts[3] = 0;
    counts[7] = 1;
    let rows: usize = counts.iter().sum();
    for (what, n, k, gemm) in [
        ("x·Wᵀ gate_up", 1536usize, 2048usize, Gemm::nt(1.0)),
        ("x·Wᵀ down", 2048, 768, Gemm::nt(1.0)),
        ("dy·W gate_up", 2048, 1536, Gemm::nn(1.0)),
        ("dy·W down ×0.5", 768, 2048, Gemm::nn(0.5)),
    ] {
        let a = Tensor::randn(0f32, 1.0, (rows, k), cpu)?.to_dtype(DType::BF16)?;
        let b = (Tensor::randn(0f32, 0.05, (counts.len(), n * k), cpu)?).to_dtype(DType::BF16)?;
        let mut products = Vec::new();
        let mut at = 0;
        for (e, &c) in counts.iter().enumerate() {
            products.push(Product {
                a: at * k,
                b: e * n * k,
                c: at * n,
                m: c,
                n,
                k,
            });
            at += c;
        }
        let want = grouped_gemm(
            &a.to_dtype(DType::F32)?,
            &b.to_dtype(DType::F32)?,
            rows * n,
            &products,
            gemm,
        )?;
        let (ad, bd) = (a.to_device(device)?, b.to_device(device)?);
        let variants = (0..VARIANTS.len()).map(Some);
        for (backend, variant) in variants
            .map(|v| (Backend::Auto, v))
            .chain([(Backend::Cublas, None)])
        {
            set_backend(backend);
            set_variant(variant);
            let before = launches();
            let got = grouped_gemm(&ad, &bd, rows * n, &products, gemm)?;
            let took = launches() > before;
            if took != (backend == Backend::Auto) {
                candle_core::bail!(
                    "grouped_gemm {what}: {backend:?} took the Hopper kernel: {took}"
                );
            }
            let name = match variant {
                Some(v) => format!("Hopper kernel {v}: {}", VARIANTS[v]),
                None => "cuBLAS".into(),
            };
            out.push(compare(
                &format!(
                    "grouped_gemm {what}, {} experts, {rows} rows ({name})",
                    counts.len()
                ),
                &got,
                &want,
                row,
            )?);
        }
    }
    Ok(out)
}
