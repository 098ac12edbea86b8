//! Rotary position embeddings, transformers' `rotate_half` convention (the two halves of a
//! head are the rotated pairs): `x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [−b, a]`.
//! Tables are computed once per model in f32 for positions `0..max`, gathered per token by
//! position id (positions restart inside packed rows), and applied with primitive ops so the
//! gradient reaches q and k.

use crate::arch::RopeSpec;
use candle_core::{DType, Device, Result, Tensor};

pub struct Rope {
    /// [max, head_dim] f32
    cos: Tensor,
    sin: Tensor,
    pub max_positions: usize,
}

/// The inverse frequencies for `head_dim`, with the configured scaling.
fn inv_freq(spec: &RopeSpec, head_dim: usize) -> Result<(Vec<f64>, f64)> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / spec.theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match spec.rope_type.as_str() {
        "default" => Ok((base, 1.0)),
        "linear" => {
            let f = spec.factor.unwrap_or(1.0);
            Ok((base.into_iter().map(|x| x / f).collect(), 1.0))
        }
        other => candle_core::bail!(
            "rope type '{other}' is not implemented yet (supported: default, linear); \
             remove rope_scaling from config.json to train at the native context length"
        ),
    }
}

impl Rope {
    pub fn new(spec: &RopeSpec, head_dim: usize, max: usize, device: &Device) -> Result<Rope> {
        let (freq, scale) = inv_freq(spec, head_dim)?;
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

/// x: [N, heads, hd], cos/sin: [N, 1, hd] → [N, heads, hd].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(2)?;
    let (a, b) = (x.narrow(2, 0, hd / 2)?, x.narrow(2, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&b.neg()?, &a], 2)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}
