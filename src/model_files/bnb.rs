//! bitsandbytes' 4-bit serialization (what transformers saves and loads for a
//! `load_in_4bit` model). For a parameter `N` (`…q_proj.weight`, or a 3-D expert parameter
//! `…mlp.experts.gate_up_proj` as bitsandbytes' parametrize names it):
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `N` | U8 | `[(n+1)/2, 1]` |
//! | `N.absmax` | U8 (nested) or F32 | `[nblocks]` |
//! | `N.quant_map` | F32 | `[16]` |
//! | `N.nested_absmax` | F32 | `[ceil(nblocks/256)]` (nested only) |
//! | `N.nested_quant_map` | F32 | `[256]` (nested only) |
//! | `N.quant_state.bitsandbytes__<nf4\|fp4>` | U8 | UTF-8 JSON |
//!
//! The JSON is `QuantState.as_dict(packed=True)`'s, written by Python's `json.dumps`.

use super::writer::TensorDecl;
use super::{ModelDir, ModelFilesError};
use crate::quant::codebook::dynamic_map;
use crate::quant::{
    Absmax, NestedAbsmax, QuantKind, QuantSettings, QuantizedParam, NESTED_BLOCKSIZE,
};
use std::borrow::Cow;

/// Python's `repr(float)`: shortest round-trip digits, positional for 1e-4 ≤ |x| < 1e16,
/// otherwise `d.ddde-05` style.
pub fn py_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{x:e}"); // e.g. "-1.2345e-5": shortest round-trip digits
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

/// `str(torch.dtype).strip("torch.")` for the dtypes moeq reads.
pub fn torch_dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F16 => "float16",
        candle_core::DType::F32 => "float32",
        _ => "bfloat16",
    }
}

pub fn quant_state_json(q: &QuantizedParam, dtype_name: &str) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{dtype_name}\", \"shape\": [{}]",
        q.settings.kind.as_str(),
        q.settings.blocksize,
        shape.join(", ")
    );
    if let Absmax::Nested(n) = &q.absmax {
        s += &format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            py_float_repr(n.offset as f64)
        );
    }
    s + "}"
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors bitsandbytes stores for one quantized parameter, with their bytes (the
/// packed codes borrowed, not copied: they are most of a checkpoint).
pub fn entries<'a>(
    name: &str,
    q: &'a QuantizedParam,
    dtype_name: &str,
) -> Vec<(TensorDecl, Cow<'a, [u8]>)> {
    let decl = |suffix: &str, dtype: &'static str, len: usize| {
        TensorDecl::new(format!("{name}{suffix}"), dtype, vec![len])
    };
    let mut out = vec![(
        TensorDecl::new(name, "U8", vec![q.packed.len(), 1]),
        Cow::Borrowed(q.packed.as_slice()),
    )];
    match &q.absmax {
        Absmax::Plain(a) => out.push((decl(".absmax", "F32", a.len()), Cow::Owned(f32_bytes(a)))),
        Absmax::Nested(n) => out.push((
            decl(".absmax", "U8", n.codes.len()),
            Cow::Borrowed(n.codes.as_slice()),
        )),
    }
    let code = q.settings.kind.code();
    out.push((decl(".quant_map", "F32", 16), Cow::Owned(f32_bytes(&code))));
    if let Absmax::Nested(n) = &q.absmax {
        let len = n.nested_absmax.len();
        out.push((
            decl(".nested_absmax", "F32", len),
            Cow::Owned(f32_bytes(&n.nested_absmax)),
        ));
        out.push((
            decl(".nested_quant_map", "F32", 256),
            Cow::Owned(f32_bytes(&dynamic_map())),
        ));
    }
    let json = quant_state_json(q, dtype_name).into_bytes();
    let key = format!(".quant_state.bitsandbytes__{}", q.settings.kind.as_str());
    out.push((decl(&key, "U8", json.len()), Cow::Owned(json)));
    out
}

/// `quantization_config` for config.json, as transformers' `BitsAndBytesConfig.to_dict()`
/// writes the fields a loader reads.
pub fn quantization_config(settings: &QuantSettings, compute_dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": settings.kind.as_str(),
        "bnb_4bit_use_double_quant": settings.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0
    })
}

fn format_err(dir: &ModelDir, name: &str, problem: impl std::fmt::Display) -> ModelFilesError {
    let path = dir
        .locate(name)
        .map(|s| s.path.display().to_string())
        .unwrap_or_else(|| dir.root.display().to_string());
    ModelFilesError::Format {
        path,
        problem: format!("'{name}': {problem}"),
    }
}

fn read_f32s(dir: &ModelDir, name: &str) -> Result<Vec<f32>, ModelFilesError> {
    let (bytes, dtype, _) = dir.raw(name, None)?;
    if dtype != candle_core::DType::F32 {
        return Err(format_err(
            dir,
            name,
            format!("expected F32, found {dtype:?}"),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads one bitsandbytes 4-bit parameter of a pre-quantized checkpoint, by its canonical
/// name or, where the checkpoint spells it so, transformers' runtime name.
pub fn read(dir: &ModelDir, canonical: &str) -> Result<QuantizedParam, ModelFilesError> {
    let runtime = dir.spec.model_type.runtime_weight_name(canonical);
    let (name, state_key) = [canonical, runtime.as_str()]
        .into_iter()
        .flat_map(|n| {
            QuantKind::ALL
                .iter()
                .map(move |k| (n, format!("{n}.quant_state.bitsandbytes__{}", k.as_str())))
        })
        .find(|(_, k)| dir.locate(k).is_some())
        .unzip();
    let name = name.unwrap_or(canonical);
    let state_key = state_key.ok_or_else(|| {
        format_err(
            dir,
            canonical,
            "no quant_state entry: not a bitsandbytes 4-bit parameter",
        )
    })?;
    let (json, _, _) = dir.raw(&state_key, None)?;
    let state: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| format_err(dir, &state_key, format!("invalid JSON: {e}")))?;
    let kind = match state["quant_type"].as_str().and_then(QuantKind::parse) {
        Some(k) => k,
        None => {
            let other = state["quant_type"].as_str();
            return Err(format_err(
                dir,
                &state_key,
                format!("unsupported quant_type {other:?}"),
            ));
        }
    };
    let blocksize = state["blocksize"]
        .as_u64()
        .ok_or_else(|| format_err(dir, &state_key, "missing blocksize"))?
        as usize;
    let shape: Vec<usize> = state["shape"]
        .as_array()
        .ok_or_else(|| format_err(dir, &state_key, "missing shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| format_err(dir, &state_key, "shape must be a list of integers"))?;
    let nested = state.get("nested_offset").is_some_and(|v| !v.is_null());
    let settings = QuantSettings {
        kind,
        blocksize,
        double_quant: nested,
    };
    settings
        .validate()
        .map_err(|e| format_err(dir, &state_key, e))?;
    let n: usize = shape.iter().product();
    let nblocks = n.div_ceil(blocksize);
    let (packed, _, packed_shape) = dir.raw(name, None)?;
    if packed.len() != n.div_ceil(2) {
        return Err(format_err(
            dir,
            name,
            format!(
                "{} packed bytes (shape {packed_shape:?}) for {n} values",
                packed.len()
            ),
        ));
    }
    let absmax = if nested {
        let (codes, _, _) = dir.raw(&format!("{name}.absmax"), None)?;
        let nested_absmax = read_f32s(dir, &format!("{name}.nested_absmax"))?;
        let offset = state["nested_offset"]
            .as_f64()
            .ok_or_else(|| format_err(dir, &state_key, "nested_offset must be a number"))?
            as f32;
        if codes.len() != nblocks || nested_absmax.len() != nblocks.div_ceil(NESTED_BLOCKSIZE) {
            return Err(format_err(
                dir,
                name,
                "absmax sizes do not match shape and blocksize",
            ));
        }
        Absmax::Nested(NestedAbsmax {
            offset,
            codes: codes.to_vec(),
            nested_absmax,
        })
    } else {
        let a = read_f32s(dir, &format!("{name}.absmax"))?;
        if a.len() != nblocks {
            return Err(format_err(
                dir,
                name,
                "absmax size does not match shape and blocksize",
            ));
        }
        Absmax::Plain(a)
    };
    Ok(QuantizedParam {
        shape,
        settings,
        packed: packed.to_vec(),
        absmax,
    })
}

#[cfg(test)]
mod tests {
    use super::py_float_repr;

    #[test]
    fn floats_print_like_python_repr() {
        // Expected strings are Python 3's repr() of the same doubles.
        let cases = [
            (0.0123, "0.0123"),
            (1e-05, "1e-05"),
            (1.5e-05, "1.5e-05"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (-0.25, "-0.25"),
            (0.004069387633353472, "0.004069387633353472"),
            (0.0, "0.0"),
            (12345.678, "12345.678"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
        // An f32 offset widened to f64, as `tensor.item()` gives it.
        assert_eq!(py_float_repr(0.1f32 as f64), "0.10000000149011612");
    }
}
