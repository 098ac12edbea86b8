//! RMSNorm as transformers computes it: in f32, `x · rsqrt(mean(x²) + eps)`, rounded back to
//! the input dtype, then multiplied by the weight.
//! x: [.., D], w: [D] → [.., D] in x's dtype. Built from candle primitive ops, so it has a
//! backward on every device (candle-nn's `rms_norm` records none; DESIGN pitfalls).

use candle_core::{DType, Result, Tensor, D};

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _t = crate::util::phases::Span::start("rms_norm", x.device());
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

/// Softmax over the last dimension from primitive ops, the max subtracted as a constant
/// (it cancels in the gradient). x: [.., N] → [.., N].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
