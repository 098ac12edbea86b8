//! Two parts of Qwen3-Next's Gated DeltaNet layer around the delta rule (`delta_rule.rs`), as
//! transformers 5.17 computes them (`models/qwen3_next/modeling_qwen3_next.py`):
//!
//! - [`causal_conv1d_silu`]: the short depthwise causal convolution over the concatenated
//!   q, k, v channels, followed by SiLU. Transformers' fallback `causal_conv1d_fn` runs
//!   `F.conv1d(x.to(w.dtype), w.unsqueeze(1), padding=K−1, groups=C)[:, :, :T]`, then
//!   `silu`, then `.to(x.dtype)`; `self.conv1d` has no bias. Output t sees inputs
//!   t−K+1..=t (zeros before 0), weight tap K−1 on the current position:
//!   `y[t, c] = silu(Σ_k w[c, k] · x[t + k − (K−1), c])`.
//! - [`gated_rms_norm`]: `Qwen3NextRMSNormGated`, the per-head output norm gated by z. Its
//!   weight is used as is (initialised to ones), not as `(1 + weight)` like the decoder's
//!   `Qwen3NextRMSNorm`.
//!
//! Both are CPU references made only of candle ops with autograd (gradients of every input),
//! for a CUDA kernel to be tested against forward and backward; `tests/linear_attn_parts.rs`
//! proves them against hand computations and finite differences.

use candle_core::{bail, DType, Result, Tensor, D};

/// The dtype torch's type promotion gives a binary op of two float tensors.
fn promote(a: DType, b: DType) -> DType {
    let rank = |d: DType| match d {
        DType::F64 => 3,
        DType::F32 => 2,
        _ => 1,
    };
    match (a, b) {
        _ if a == b => a,
        // bf16 with f16 promotes to f32 in torch.
        (DType::BF16, DType::F16) | (DType::F16, DType::BF16) => DType::F32,
        _ if rank(a) >= rank(b) => a,
        _ => b,
    }
}

/// `silu(v)` computed in f32 (or f64 for f64 inputs) and rounded once to v's dtype, as torch's
/// reduced-precision `silu` does.
fn silu_rounded(v: &Tensor) -> Result<Tensor> {
    let wide = promote(v.dtype(), DType::F32);
    v.to_dtype(wide)?.silu()?.to_dtype(v.dtype())
}

/// `sigmoid(x)` computed in f32 and rounded once to x's dtype, as torch computes it for
/// reduced-precision tensors (Gated DeltaNet's `beta`, gated attention's output gate).
pub fn sigmoid_rounded(x: &Tensor) -> Result<Tensor> {
    let f = x.to_dtype(DType::F32)?;
    (f.neg()?.exp()? + 1.0)?.recip()?.to_dtype(x.dtype())
}

/// Depthwise causal conv1d over time followed by SiLU, as `Qwen3NextGatedDeltaNet` applies it to
/// `mixed_qkv` on a prefill / training pass (no carried conv state).
/// x: [B, T, C], weight: [C, K] (transformers' `conv1d.weight.squeeze(1)`) → [B, T, C] in x's
/// dtype.
///
/// Dtypes as transformers: x is cast to the weight's dtype; the convolution accumulates in
/// f32 (f64 for f64 weights), as cuDNN / torch's CPU conv do, and is rounded to the weight's
/// dtype; SiLU is computed wide and rounded to the weight's dtype; the result is cast to x's
/// dtype. The sum runs over taps k = 0..K in order.
pub fn causal_conv1d_silu(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let (wc, k) = weight.dims2()?;
    if wc != c || k == 0 {
        bail!(
            "causal_conv1d_silu: weight {:?} must be [C, K] with C = {c} (x {:?}) and K ≥ 1",
            weight.dims(),
            x.dims()
        );
    }
    let w_dtype = weight.dtype();
    let acc = promote(w_dtype, DType::F32);
    // Rounding x to the weight's dtype first is transformers' `x.to(weight.dtype)`.
    let xa = x.to_dtype(w_dtype)?.to_dtype(acc)?;
    let wa = weight.to_dtype(acc)?;
    // xp: [B, K−1+T, C], the left zero padding; the right padding of nn.Conv1d only feeds the
    // positions ≥ T that transformers cuts off.
    let xp = if k > 1 {
        let zeros = Tensor::zeros((b, k - 1, c), acc, x.device())?;
        Tensor::cat(&[&zeros, &xa], 1)?
    } else {
        xa
    };
    // y: [B, T, C] = Σ_k xp[:, k..k+T, :] · w[:, k]
    let mut y: Option<Tensor> = None;
    for tap in 0..k {
        let w_tap = wa.narrow(1, tap, 1)?.squeeze(1)?; // [C]
        let term = xp.narrow(1, tap, t)?.broadcast_mul(&w_tap)?;
        y = Some(match y {
            None => term,
            Some(y) => (y + term)?,
        });
    }
    let y = match y {
        Some(y) => y,
        None => bail!("causal_conv1d_silu: kernel size K = 0"),
    };
    silu_rounded(&y.to_dtype(w_dtype)?)?.to_dtype(x.dtype())
}

/// `Qwen3NextRMSNormGated.forward(x, gate)` with its weight and eps.
/// x, gate: [.., D], weight: [D] → [.., D] in x's dtype.
///
/// In order, as the class does it (in = x's dtype):
/// 1. `n = x.f32 · rsqrt(mean(x.f32²) + eps)`, rounded to `in`;
/// 2. `p = weight · n` in the promoted dtype of weight and `in` (for a bf16 model, bf16:
///    computed wide, rounded once);
/// 3. `y = p · silu(gate.f32)` in f32 (promoted with p), then rounded to `in`.
///
/// `rsqrt` is written `1 / sqrt(..)`: it can differ from torch's `rsqrt` by an ulp in f32.
pub fn gated_rms_norm(x: &Tensor, gate: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    gated_rms_norm_in(x, gate, weight, eps, DType::F32)
}

/// [`gated_rms_norm`] with the class's f32 upcasts (steps 1 and 3) done in `compute` instead.
/// `DType::F32` is the class; `DType::F64` exists so that finite differences of f64 inputs can
/// check the gradients without f32 rounding in the way.
pub fn gated_rms_norm_in(
    x: &Tensor,
    gate: &Tensor,
    weight: &Tensor,
    eps: f64,
    compute: DType,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gate.dims() != x.dims() || weight.dims() != [d] {
        bail!(
            "gated_rms_norm: gate {:?} must match x {:?} and weight {:?} must be [D] = [{d}]",
            gate.dims(),
            x.dims(),
            weight.dims()
        );
    }
    let in_dtype = x.dtype();
    // n: [.., D] in `in`
    let xf = x.to_dtype(compute)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let n = xf.broadcast_mul(&inv)?.to_dtype(in_dtype)?;
    // p: [.., D] in promote(weight, in)
    let p_dtype = promote(weight.dtype(), in_dtype);
    let p = n
        .to_dtype(promote(p_dtype, compute))?
        .broadcast_mul(&weight.to_dtype(promote(p_dtype, compute))?)?
        .to_dtype(p_dtype)?;
    // y: [.., D] in promote(p, compute), then `in`
    let y_dtype = promote(p_dtype, compute);
    let g = gate.to_dtype(compute)?.silu()?.to_dtype(y_dtype)?;
    (p.to_dtype(y_dtype)? * g)?.to_dtype(in_dtype)
}
