//! `moeq gpu-check` for quantization: the CUDA kernels against the CPU reference on random
//! data, which must agree byte for byte: packed codes, absmax, dequantized values, and the
//! nested absmax reconstruction. CUDA builds only.

use super::tolerance::{lookup, Pass};
use super::{compare, Comparison};
use crate::quant::cuda::{dequantize_absmax_on_gpu, dequantize_nested_on_gpu, quantize_on_gpu};
use crate::quant::{dequantize_4bit, nested, op, quantize_4bit, QuantKind, QuantSettings};
use candle_core::{DType, Device, Result, Tensor};

fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => t.flatten_all()?.to_vec1::<u8>()?,
    })
}

/// Compares bit patterns (as u8 values) within the exact row of `op`, so NaN or -0.0
/// differences are caught too.
fn same_bits(what: String, op: &str, got: &Tensor, want: &Tensor) -> Result<Comparison> {
    let (g, w) = (bytes_of(got)?, bytes_of(want)?);
    let g = Tensor::from_vec(
        g.iter().map(|&b| b as f32).collect::<Vec<_>>(),
        g.len(),
        &Device::Cpu,
    )?;
    let w = Tensor::from_vec(
        w.iter().map(|&b| b as f32).collect::<Vec<_>>(),
        w.len(),
        &Device::Cpu,
    )?;
    compare(&what, &g, &w, lookup(op, "any", Pass::Exact)?)
}

/// The table's op names of the kernels.
const QUANTIZE: &str = "quantize_on_gpu";
const NESTED: &str = "dequantize_absmax_on_gpu";

fn check_one(
    device: &Device,
    n: usize,
    dtype: DType,
    settings: QuantSettings,
) -> Result<Vec<Comparison>> {
    // Normal data with per-row scale changes and one all-zero block; never all zeros.
    let mut x = (Tensor::randn(0f32, 1.0, n, &Device::Cpu)? * 0.05)?;
    if n > 3 * settings.blocksize {
        let bs = settings.blocksize;
        let zeros = Tensor::zeros(bs, DType::F32, &Device::Cpu)?;
        x = Tensor::cat(
            &[x.narrow(0, 0, bs)?, zeros, x.narrow(0, 2 * bs, n - 2 * bs)?],
            0,
        )?;
    }
    let x = x.to_dtype(dtype)?;
    let label = format!(
        "nf4-kernels {:?} n={n} {} bs={}",
        dtype,
        settings.kind.as_str(),
        settings.blocksize
    );
    let (packed_gpu, absmax_gpu) = quantize_on_gpu(&x.to_device(device)?, &settings)?;
    let (packed_cpu, absmax_cpu) = match dtype {
        DType::BF16 => quantize_4bit(
            &x.to_vec1::<half::bf16>()?,
            settings.blocksize,
            settings.kind,
        ),
        DType::F16 => quantize_4bit(
            &x.to_vec1::<half::f16>()?,
            settings.blocksize,
            settings.kind,
        ),
        _ => quantize_4bit(&x.to_vec1::<f32>()?, settings.blocksize, settings.kind),
    };
    let packed_cpu_t = Tensor::from_vec(packed_cpu.clone(), packed_cpu.len(), &Device::Cpu)?;
    let absmax_cpu_t = Tensor::from_vec(absmax_cpu.clone(), absmax_cpu.len(), &Device::Cpu)?;
    let mut out = vec![
        same_bits(
            format!("{label} codes"),
            QUANTIZE,
            &packed_gpu,
            &packed_cpu_t,
        )?,
        same_bits(
            format!("{label} absmax"),
            QUANTIZE,
            &absmax_gpu,
            &absmax_cpu_t,
        )?,
    ];
    let deq_gpu = op::dequantize(
        &packed_gpu,
        &absmax_gpu,
        &[n],
        settings.kind,
        settings.blocksize,
        dtype,
    )?;
    let deq_cpu = Tensor::from_vec(
        dequantize_4bit(
            &packed_cpu,
            &absmax_cpu,
            n,
            settings.blocksize,
            settings.kind,
        ),
        n,
        &Device::Cpu,
    )?
    .to_dtype(dtype)?;
    out.push(same_bits(
        format!("{label} dequantized"),
        "dequantize",
        &deq_gpu,
        &deq_cpu,
    )?);
    if settings.double_quant {
        let nested = nested::quantize_absmax(&absmax_cpu);
        let codes = Tensor::from_vec(nested.codes.clone(), nested.codes.len(), device)?;
        let na = Tensor::from_vec(
            nested.nested_absmax.clone(),
            nested.nested_absmax.len(),
            device,
        )?;
        let gpu = dequantize_absmax_on_gpu(&codes, &na, nested.offset, 0)?;
        let cpu = nested::dequantize_absmax(&nested);
        let cpu = Tensor::from_vec(cpu.clone(), cpu.len(), &Device::Cpu)?;
        out.push(same_bits(
            format!("{label} nested absmax"),
            NESTED,
            &gpu,
            &cpu,
        )?);
        // A slice starting off a 256-block boundary (what a layer's expert range reads).
        let start = nested.codes.len() / 3 + 1;
        let len = nested.codes.len().saturating_sub(start);
        let gpu =
            dequantize_absmax_on_gpu(&codes.narrow(0, start, len)?, &na, nested.offset, start)?;
        let cpu = nested::dequantize_absmax_range(
            &nested.codes[start..start + len],
            &nested.nested_absmax,
            nested.offset,
            start,
        );
        let cpu = Tensor::from_vec(cpu.clone(), cpu.len(), &Device::Cpu)?;
        out.push(same_bits(
            format!("{label} nested absmax from block {start}"),
            NESTED,
            &gpu,
            &cpu,
        )?);
        // Dequantization with the nested scales expanded in the same kernel, whole and from the
        // same off-boundary block, against the CPU's values from the CPU's expanded scales.
        let full = nested::dequantize_absmax(&nested);
        for from in [0, start] {
            let len = n - from * settings.blocksize;
            let got = dequantize_nested_on_gpu(
                &packed_gpu.narrow(0, from * settings.blocksize / 2, len.div_ceil(2))?,
                &codes.narrow(0, from, nested.codes.len() - from)?,
                &na,
                nested.offset,
                from,
                &[len],
                settings.kind,
                settings.blocksize,
                dtype,
            )?;
            let want = dequantize_4bit(
                &packed_cpu[from * settings.blocksize / 2..],
                &full[from..],
                len,
                settings.blocksize,
                settings.kind,
            );
            let want = Tensor::from_vec(want, len, &Device::Cpu)?.to_dtype(dtype)?;
            out.push(same_bits(
                format!("{label} dequantized with nested scales from block {from}"),
                "dequantize",
                &got,
                &want,
            )?);
        }
    }
    Ok(out)
}

/// Values exactly on every NF4/FP4 threshold and code point and their f32 neighbours, in
/// blocks whose absmax is 1.0: where a tree and its branch-free twin could disagree.
fn threshold_values() -> Vec<f32> {
    #[allow(clippy::excessive_precision)]
    let mut points: Vec<f32> = vec![
        0.8614784181118011,
        0.6427869200706482,
        0.5016634166240692,
        0.3893125355243683,
        0.2920137718319893,
        0.2035212516784668,
        0.1202552504837513,
        0.03979014977812767,
        -0.045525018125772476,
        -0.13791173323988914,
        -0.23460740596055984,
        -0.33967943489551544,
        -0.4599952697753906,
        -0.6106329262256622,
        -0.8480964004993439,
        0.29166667,
        0.583333,
        0.8333333,
        0.4166667,
        0.0859375,
        0.20833333,
        0.00260417,
    ];
    points.extend(QuantKind::Nf4.code());
    points.extend(QuantKind::Fp4.code());
    let mut values = Vec::new();
    for p in points {
        for v in [
            p,
            f32::from_bits(p.to_bits() + 1),
            f32::from_bits(p.to_bits().wrapping_sub(1)),
        ] {
            values.extend([v, -v]);
        }
    }
    values
        .chunks(63)
        .flat_map(|c| {
            let mut block = vec![1.0f32];
            block.extend_from_slice(c);
            block.resize(64, 0.0);
            block
        })
        .collect()
}

fn check_thresholds(device: &Device) -> Result<Vec<Comparison>> {
    let values = threshold_values();
    let mut out = Vec::new();
    for kind in [QuantKind::Nf4, QuantKind::Fp4] {
        let settings = QuantSettings {
            kind,
            blocksize: 64,
            double_quant: false,
        };
        let x = Tensor::from_vec(values.clone(), values.len(), device)?;
        let (gpu, _) = quantize_on_gpu(&x, &settings)?;
        let (cpu, _) = quantize_4bit(&values, 64, kind);
        let cpu = Tensor::from_vec(cpu.clone(), cpu.len(), &Device::Cpu)?;
        out.push(same_bits(
            format!("nf4-kernels thresholds {} codes", kind.as_str()),
            QUANTIZE,
            &gpu,
            &cpu,
        )?);
    }
    Ok(out)
}

/// The quantization comparisons on `device` (CUDA), in the order `moeq gpu-check` prints them.
pub fn run_all(device: &Device) -> Result<Vec<Comparison>> {
    let mut out = check_thresholds(device)?;
    for (n, dtype) in [
        (1 << 20, DType::BF16),
        (123_457, DType::F32),
        (4097, DType::F16),
        (8 * 1536 * 2048, DType::BF16),
        // Whole words of 8 in f32 and f16 (the one-kernel nested dequantization's sizes).
        (123_456, DType::F32),
        (4096, DType::F16),
    ] {
        for kind in [QuantKind::Nf4, QuantKind::Fp4] {
            for blocksize in [32, 64, 128, 256, 4096] {
                let settings = QuantSettings {
                    kind,
                    blocksize,
                    double_quant: true,
                };
                out.extend(check_one(device, n, dtype, settings)?);
            }
        }
    }
    Ok(out)
}
