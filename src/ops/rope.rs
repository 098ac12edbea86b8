//! Rotary position embeddings, transformers' `rotate_half` convention (the two halves of a
//! head are the rotated pairs): `x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [−b, a]`.
//! Scaled variants (linear, dynamic, yarn, llama3) change the frequencies and, for yarn, the
//! cos/sin scale. Tables are computed once per model in f32 for positions `0..max`, gathered per token by
//! position id (positions restart inside packed rows), and applied with primitive ops so the
//! gradient reaches q and k.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::{Map, Value};

/// Rotary embedding parameters from config.json (`arch::ArchSpec::rope`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RopeSpec {
    pub theta: f64,
    /// `default`, `linear`, `dynamic`, `yarn`, `llama3` or `longrope`.
    pub rope_type: String,
    pub factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// The remaining rope parameters as written in config.json (yarn betas, llama3 freq factors…).
    pub extra: Map<String, Value>,
}

pub struct Rope {
    /// [max, head_dim] f32
    cos: Tensor,
    sin: Tensor,
    pub max_positions: usize,
}

/// A number from the rope parameters beyond `factor`, or `default` when absent or null.
fn param(spec: &RopeSpec, key: &str, default: Option<f64>) -> Result<f64> {
    match spec.extra.get(key).and_then(|v| v.as_f64()).or(default) {
        Some(v) => Ok(v),
        None => candle_core::bail!(
            "rope type '{}' needs '{key}' in rope_parameters",
            spec.rope_type
        ),
    }
}

/// The inverse frequencies for `head_dim` with the configured scaling, and the factor cos/sin
/// are multiplied by, as transformers computes them (`modeling_rope_utils.py`). `model_max` is
/// config.json's `max_position_embeddings`, `positions` the table length this run needs.
pub fn inv_freq(
    spec: &RopeSpec,
    head_dim: usize,
    model_max: usize,
    positions: usize,
) -> Result<(Vec<f64>, f64)> {
    let dim = head_dim as f64;
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / spec.theta.powf((2 * i) as f64 / dim))
        .collect();
    let factor = spec.factor.unwrap_or(1.0);
    let original_max = spec.original_max_position_embeddings.unwrap_or(model_max) as f64;
    match spec.rope_type.as_str() {
        "default" => Ok((base, 1.0)),
        "linear" => Ok((base.into_iter().map(|x| x / factor).collect(), 1.0)),
        // Dynamic NTK changes the frequencies only for a batch longer than the model's
        // maximum, and then per batch; within the maximum it is the default rope.
        // Hunyuan's `alpha`: a larger base, theta·alpha^(d/(d−2)), at every length.
        "dynamic" if positions <= model_max => match spec.extra.get("alpha").and_then(|v| v.as_f64()) {
            Some(alpha) => {
                let theta = spec.theta * alpha.powf(dim / (dim - 2.0));
                Ok(((0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim)).collect(), 1.0))
            }
            None => Ok((base, 1.0)),
        },
        "dynamic" => candle_core::bail!(
            "rope type 'dynamic' beyond max_position_embeddings ({model_max}) changes the frequencies per batch, which moeq does not implement: set sequence_len <= {model_max}"
        ),
        "yarn" => {
            let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention = match spec.extra.get("attention_factor").and_then(|v| v.as_f64()) {
                Some(a) => a,
                None => match (param(spec, "mscale", Some(0.0))?, param(spec, "mscale_all_dim", Some(0.0))?) {
                    (m, all) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                },
            };
            let beta_fast = param(spec, "beta_fast", Some(32.0))?;
            let beta_slow = param(spec, "beta_slow", Some(1.0))?;
            let truncate = spec.extra.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true);
            let correction_dim = |rotations: f64| {
                dim * (original_max / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * spec.theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let freq = base
                .iter()
                .enumerate()
                .map(|(i, &extrapolation)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp; // share of the unscaled frequency
                    extrapolation / factor * (1.0 - keep) + extrapolation * keep
                })
                .collect();
            Ok((freq, attention))
        }
        "llama3" => {
            let low_freq_factor = param(spec, "low_freq_factor", None)?;
            let high_freq_factor = param(spec, "high_freq_factor", None)?;
            let (low_wavelen, high_wavelen) = (original_max / low_freq_factor, original_max / high_freq_factor);
            let freq = base
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            Ok((freq, 1.0))
        }
        other => candle_core::bail!(
            "rope type '{other}' is not implemented (supported: default, linear, dynamic, yarn, llama3)"
        ),
    }
}

impl Rope {
    /// Tables for positions `0..max` of a model whose config.json says `model_max` positions.
    pub fn new(
        spec: &RopeSpec,
        head_dim: usize,
        model_max: usize,
        max: usize,
        device: &Device,
    ) -> Result<Rope> {
        let (freq, scale) = inv_freq(spec, head_dim, model_max, max)?;
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max * head_dim);
        let mut sin = Vec::with_capacity(max * head_dim);
        for p in 0..max {
            let angles: Vec<f32> = freq.iter().map(|&f| (p as f32) * (f as f32)).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() * scale as f32));
                sin.extend(angles.iter().map(|a| a.sin() * scale as f32));
            }
            debug_assert_eq!(cos.len(), (p + 1) * 2 * half);
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max, head_dim), device)?,
            max_positions: max,
        })
    }

    /// cos and sin for each token: positions [N] u32 → ([N, 1, hd], [N, 1, hd]) in `dtype`.
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

/// x: [N, heads, hd], cos/sin: [N, 1, hd] → [N, heads, hd], from primitive ops in x's dtype
/// (transformers' arithmetic; what the fused `apply_rope` is tested against).
pub fn apply_rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(2)?;
    let (a, b) = (x.narrow(2, 0, hd / 2)?, x.narrow(2, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&b.neg()?, &a], 2)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// x: [N, heads, hd], cos/sin: [N, 1, hd] → [N, heads, hd]: one op computed in f32 with one
/// rounding (`kernels/rope.cu`; CPU: f32 candle ops), whose backward is the transposed
/// rotation in one more pass. cos and sin are tables and get no gradient.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, _, hd) = x.dims3()?;
    if hd % 2 != 0 || cos.dims() != [n, 1, hd] || sin.dims() != [n, 1, hd] {
        candle_core::bail!(
            "rope: x {:?} with cos {:?} and sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let table = |t: &Tensor| super::at_offset_zero(&t.to_dtype(x.dtype())?);
    let (x, cos, sin) = (super::at_offset_zero(x)?, table(cos)?, table(sin)?);
    let op = Rotary { backward: false };
    if super::records_graph(&[&x]) {
        x.apply_op3(&cos, &sin, op)
    } else {
        super::direct(op.fwd(&x, &cos, &sin)?)
    }
}

/// The rotation (`backward`: its transpose) on any device, no graph: x `[N, heads, hd]`,
/// cos/sin `[N, 1, hd]` in x's dtype, all contiguous from offset 0.
pub(crate) fn rope_forward(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    backward: bool,
) -> Result<Tensor> {
    Rotary { backward }.fwd(x, cos, sin)
}

/// The rotation (`backward`: its transpose) of `kernels/rope.cu` as an op on (x, cos, sin).
struct Rotary {
    backward: bool,
}

impl Rotary {
    fn fwd(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return rope_cuda(x, cos, sin, self.backward);
        }
        rope_cpu(x, cos, sin, self.backward)
    }
}

impl candle_core::CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rope"
    }

    super::tensor_forward!(3, "rope", fwd);

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: rope", dy.device());
        let dy = super::at_offset_zero(&dy.to_dtype(cos.dtype())?)?;
        let dx = super::direct(Rotary { backward: true }.fwd(&dy.detach(), cos, sin)?)?;
        Ok((Some(dx), None, None))
    }
}

/// The CPU twin of `kernels/rope.cu`: the same f32 arithmetic with candle ops, one rounding.
fn rope_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> Result<Tensor> {
    let hd = x.dim(2)?;
    let half = hd / 2;
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let (xf, c, s) = (f(x)?, f(cos)?, f(sin)?);
    let (a, b) = (xf.narrow(2, 0, half)?, xf.narrow(2, half, half)?);
    let (c1, c2) = (c.narrow(2, 0, half)?, c.narrow(2, half, half)?);
    let (s1, s2) = (s.narrow(2, 0, half)?, s.narrow(2, half, half)?);
    let (lo, hi) = if backward {
        (
            (a.broadcast_mul(&c1)? + b.broadcast_mul(&s2)?)?,
            (b.broadcast_mul(&c2)? - a.broadcast_mul(&s1)?)?,
        )
    } else {
        (
            (a.broadcast_mul(&c1)? - b.broadcast_mul(&s1)?)?,
            (b.broadcast_mul(&c2)? + a.broadcast_mul(&s2)?)?,
        )
    };
    Tensor::cat(&[lo, hi], 2)?.to_dtype(x.dtype())
}

#[cfg(feature = "cuda")]
fn rope_cuda(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::Storage;
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("rope: not on CUDA")
    };
    let (n, heads, hd) = x.dims3()?;
    let half = hd / 2;
    let suffix = match x.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("rope: {other:?} not supported"),
    };
    let pass = if backward { "bwd" } else { "fwd" };
    let func = dev.get_or_load_custom_func(
        &format!("rope_{pass}_{suffix}"),
        "moeq_rope",
        super::kernels::ROPE,
    )?;
    let pairs = n * heads * half;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (gx, gc, gs) = (
        x.storage_and_layout(),
        cos.storage_and_layout(),
        sin.storage_and_layout(),
    );
    macro_rules! run {
        ($variant:path) => {{
            macro_rules! view {
                ($g:expr, $len:expr) => {
                    match &*$g.0 {
                        Storage::Cuda(c) => match &c.slice {
                            $variant(v) => v.slice($g.1.start_offset()..$g.1.start_offset() + $len),
                            _ => candle_core::bail!("rope: operands differ in dtype"),
                        },
                        _ => candle_core::bail!("rope: not on CUDA"),
                    }
                };
            }
            let (xv, cv, sv) = (
                view!(gx, n * heads * hd),
                view!(gc, n * hd),
                view!(gs, n * hd),
            );
            // SAFETY: the kernel writes every element (every pair of every row).
            let out = unsafe { dev.alloc(n * heads * hd)? };
            let (n64, h64, half64) = (n as u64, heads as u64, half as u64);
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&cv);
            b.arg(&sv);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&h64);
            b.arg(&half64);
            // SAFETY: arguments match kernels/rope.cu.
            unsafe { b.launch(cfg) }.w()?;
            $variant(out)
        }};
    }
    let slice = match x.dtype() {
        DType::F32 => run!(S::F32),
        DType::BF16 => run!(S::BF16),
        _ => run!(S::F16),
    };
    Ok(super::cuda_tensor(slice, dev, x.shape().clone()))
}

#[cfg(test)]
mod tests {
    //! Properties of the scaled frequencies that follow from their definitions; the exact
    //! values are checked against transformers on the GPU machine (verify_hf.py --rope).
    use super::*;

    fn spec(kind: &str, factor: f64, extra: serde_json::Value) -> RopeSpec {
        RopeSpec {
            theta: 10000.0,
            rope_type: kind.into(),
            factor: Some(factor),
            original_max_position_embeddings: Some(256),
            extra: extra.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn scaled_frequencies() {
        let (base, s) =
            inv_freq(&spec("default", 1.0, serde_json::json!({})), 64, 2048, 512).unwrap();
        assert_eq!(s, 1.0);
        let (lin, _) =
            inv_freq(&spec("linear", 4.0, serde_json::json!({})), 64, 2048, 512).unwrap();
        assert!(lin
            .iter()
            .zip(&base)
            .all(|(l, b)| (l * 4.0 - b).abs() <= 1e-15 * b));
        // llama3: wavelengths shorter than original/high_freq_factor keep their frequency,
        // longer than original/low_freq_factor are divided by the factor, between: blended.
        let l3 = spec(
            "llama3",
            8.0,
            serde_json::json!({"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        );
        let (f, s) = inv_freq(&l3, 64, 2048, 512).unwrap();
        assert_eq!(s, 1.0);
        for (x, b) in f.iter().zip(&base) {
            let wavelen = 2.0 * std::f64::consts::PI / b;
            if wavelen < 64.0 {
                assert_eq!(x, b);
            } else if wavelen > 256.0 {
                assert!((x * 8.0 - b).abs() <= 1e-15 * b);
            } else {
                assert!(*x < *b && *x > b / 8.0);
            }
        }
        // yarn: the first (fast) dimensions extrapolate, the last interpolate, attention
        // factor 0.1·ln(factor) + 1.
        let (y, s) = inv_freq(&spec("yarn", 4.0, serde_json::json!({})), 64, 2048, 512).unwrap();
        assert!((s - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        assert_eq!(y[0], base[0]);
        assert!((y[31] * 4.0 - base[31]).abs() <= 1e-15 * base[31]);
        assert!(
            inv_freq(
                &spec("yarn", 4.0, serde_json::json!({"attention_factor": 1.5})),
                64,
                2048,
                512
            )
            .unwrap()
            .1 == 1.5
        );
        // dynamic: the default rope up to the model's maximum, refused beyond.
        let dynamic = spec("dynamic", 2.0, serde_json::json!({}));
        assert_eq!(inv_freq(&dynamic, 64, 2048, 2048).unwrap().0, base);
        assert!(inv_freq(&dynamic, 64, 2048, 4096)
            .unwrap_err()
            .to_string()
            .contains("sequence_len <= 2048"));
        let e = inv_freq(&spec("llama3", 8.0, serde_json::json!({})), 64, 2048, 512).unwrap_err();
        assert!(e.to_string().contains("needs 'low_freq_factor'"), "{e}");
    }
}
