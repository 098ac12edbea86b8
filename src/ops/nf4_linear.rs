//! Linear layer over a frozen 4-bit weight, bitsandbytes `MatMul4Bit` semantics:
//! x: [.., in] → y = x · dequant(W)ᵀ : [.., out]; backward: dL/dx = dL/dy · dequant(W),
//! dequantized again (nothing kept between forward and backward), and no gradient for W.
//! The dequantized weight exists only inside each call, so the autograd graph holds the
//! 4-bit codes, never a bf16/f32 copy of the weight (DESIGN decision 2).

use crate::quant::{op::dequantize, QuantKind, QuantizedParam};
use candle_core::{bail, CustomOp1, DType, Device, Result, Tensor};

/// A frozen 4-bit weight `[out, in]` on a device: packed codes and f32 block scales (nested
/// statistics already expanded).
#[derive(Clone)]
pub struct Nf4Weight {
    pub packed: Tensor,
    pub absmax: Tensor,
    pub out_features: usize,
    pub in_features: usize,
    pub kind: QuantKind,
    pub blocksize: usize,
}

impl Nf4Weight {
    pub fn from_param(q: &QuantizedParam, device: &Device) -> Result<Nf4Weight> {
        let [out_features, in_features] = q.shape[..] else {
            bail!("Nf4Weight: expected a 2-D weight, got shape {:?}", q.shape)
        };
        let scales = q.absmax.values();
        Ok(Nf4Weight {
            packed: Tensor::from_slice(&q.packed, q.packed.len(), device)?,
            absmax: Tensor::from_vec(scales.clone(), scales.len(), device)?,
            out_features,
            in_features,
            kind: q.settings.kind,
            blocksize: q.settings.blocksize,
        })
    }

    /// The weight `[out, in]` in `dtype`, freshly dequantized.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        dequantize(
            &self.packed,
            &self.absmax,
            &[self.out_features, self.in_features],
            self.kind,
            self.blocksize,
            dtype,
        )
    }
}

struct Nf4Linear(Nf4Weight);

/// x [.., in] (contiguous) · Wᵀ with W dequantized in x's dtype.
fn forward(x: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let wt = w.dequantize(x.dtype())?.t()?;
    x.broadcast_matmul(&wt)
}

impl Nf4Linear {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        forward(x, &self.0)
    }
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4_linear"
    }

    super::tensor_forward!(1, "nf4_linear", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: nf4_linear", x.device());
        let w = self.0.dequantize(grad.dtype())?;
        Ok(Some(grad.broadcast_matmul(&w)?.to_dtype(x.dtype())?))
    }
}

/// `x · dequant(W)ᵀ` with a gradient for `x` only.
pub fn nf4_linear(x: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    if x.dim(candle_core::D::Minus1)? != w.in_features {
        bail!(
            "nf4_linear: input has {} features, weight expects {}",
            x.dim(candle_core::D::Minus1)?,
            w.in_features
        );
    }
    x.contiguous()?.apply_op1(Nf4Linear(w.clone()))
}
