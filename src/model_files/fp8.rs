//! FP8 checkpoints with block scales, as DeepSeek-V3, Kimi K2 and the `-FP8` releases of
//! Qwen3 ship them: each quantized weight `W [rows, cols]` is stored as `float8_e4m3fn` with a
//! sibling `W_scale_inv [⌈rows/b0⌉, ⌈cols/b1⌉]` (f32 or bf16), one scale per block of
//! `quantization_config.weight_block_size = [b0, b1]` (128 × 128 when absent); the weight is
//! `fp8 · scale` per block. moeq turns each tensor (each expert's slice) into bf16 as it
//! reads it — DeepSeek's `fp8_cast_bf16.py` arithmetic: f32 product, one rounding to bf16 — and
//! quantizes it to NF4 from there, so no bf16 copy of the whole model is ever held.

use super::ModelFilesError;
use candle_core::{DType, Device, Tensor};

/// The scale tensor of an FP8 weight.
pub(super) fn scale_name(weight: &str) -> String {
    format!("{weight}_scale_inv")
}

/// `quantization_config.weight_block_size` of config.json, `[128, 128]` when absent.
pub(super) fn block_size(
    config: &serde_json::Value,
    path: &str,
) -> Result<[usize; 2], ModelFilesError> {
    let bad = |problem: String| ModelFilesError::Format {
        path: path.to_string(),
        problem,
    };
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok([128, 128]);
    };
    if let Some(m) = q.get("quant_method").and_then(|m| m.as_str()) {
        if m != "fp8" {
            return Err(bad(format!(
                "FP8 weights with quantization_config.quant_method '{m}': moeq reads block-scaled FP8 ('fp8')"
            )));
        }
    }
    match q.get("weight_block_size") {
        None | Some(serde_json::Value::Null) => Ok([128, 128]),
        Some(serde_json::Value::Array(a)) if a.len() == 2 => {
            let n = |v: &serde_json::Value| v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
            match (n(&a[0]), n(&a[1])) {
                (Some(r), Some(c)) => Ok([r, c]),
                _ => Err(bad(format!("quantization_config.weight_block_size {a:?} must be two positive integers"))),
            }
        }
        Some(v) => Err(bad(format!(
            "quantization_config.weight_block_size {v} must be [rows, cols] (per-tensor FP8 scales are not supported)"
        ))),
    }
}

/// `fp8` bytes of a `[rows, cols]` weight times its block scales `scale [⌈rows/b0⌉, ⌈cols/b1⌉]`,
/// in f32, rounded once to bf16.
pub(super) fn dequantize(
    fp8: &[u8],
    shape: &[usize],
    scale: &Tensor,
    block: [usize; 2],
) -> candle_core::Result<Tensor> {
    let [rows, cols] = shape[..] else {
        candle_core::bail!("FP8 weight of shape {shape:?}: block scales need two dims");
    };
    let (sr, sc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    if scale.dims() != [sr, sc] {
        candle_core::bail!(
            "FP8 scales {:?} for a [{rows}, {cols}] weight in blocks of {block:?} (expected [{sr}, {sc}])",
            scale.dims()
        );
    }
    let w =
        Tensor::from_raw_buffer(fp8, DType::F8E4M3, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
    let s = scale
        .to_dtype(DType::F32)?
        .reshape((sr, 1, sc, 1))?
        .broadcast_as((sr, block[0], sc, block[1]))?
        .reshape((sr * block[0], sc * block[1]))?
        .narrow(0, 0, rows)?
        .narrow(1, 0, cols)?;
    (w * s)?.to_dtype(DType::BF16)
}
