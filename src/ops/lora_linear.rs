//! A frozen 4-bit projection with its LoRA adapter as one op:
//! `y = (x·Wᵀ + bias) + s·((m⊙x)·Aᵀ)·Bᵀ` — PEFT's `base(x) + lora_B(lora_A(dropout(x)))·scaling`
//! with the same rounding steps — and gradients for x, A and B (W, the bias and the dropout mask
//! m are fixed). One graph node instead of about seven (base product, bias, two LoRA products,
//! two transposes, scale, add): candle's backward gives every node's gradient a zero-filled
//! buffer plus an add, a full pass over `[N, out]` per node.

use super::nf4_linear::{forward as nf4_forward, Nf4Weight};
use candle_core::{CustomOp3, Result, Tensor};

struct LoraLinear {
    w: Nf4Weight,
    bias: Option<Tensor>,
    /// Inverted-dropout mask `[N, in]` in x's dtype.
    mask: Option<Tensor>,
    scaling: f64,
}

impl LoraLinear {
    fn lora_input(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x * m,
            None => Ok(x.clone()),
        }
    }

    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut y = nf4_forward(x, &self.w)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let delta = self.lora_input(x)?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        y + (delta * self.scaling)?
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    super::tensor_forward!(3, "lora_linear", forward);

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: lora_linear", x.device());
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let dy = dy.to_dtype(x.dtype())?;
        let xin = self.lora_input(&x)?;
        let dd = (&dy * self.scaling)?; // d(delta)
        let xa = xin.matmul(&a.t()?)?; // [N, r]
        let db = dd.t()?.matmul(&xa)?; // [out, r]
        let dxa = dd.matmul(&b)?; // [N, r]
        let da = dxa.t()?.matmul(&xin)?; // [r, in]
        let mut dx_lora = dxa.matmul(&a)?; // [N, in]
        if let Some(m) = &self.mask {
            dx_lora = (dx_lora * m)?;
        }
        let dx_base = dy.matmul(&self.w.dequantize(dy.dtype())?)?;
        Ok((Some((dx_base + dx_lora)?), Some(da), Some(db)))
    }
}

/// `x [N, in] → [N, out]`: the frozen projection `w` (plus `bias`) and the LoRA update
/// `scaling·((mask⊙x)·aᵀ)·bᵀ`, `a [r, in]` and `b [out, r]` in x's dtype.
pub fn lora_linear(
    x: &Tensor,
    w: &Nf4Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, inf) = x.dims2()?;
    let (r, ain) = a.dims2()?;
    if inf != w.in_features || ain != inf || b.dims2()? != (w.out_features, r) {
        candle_core::bail!(
            "lora_linear: x {:?}, a {:?}, b {:?} for a [{}, {}] weight",
            x.dims(),
            a.dims(),
            b.dims(),
            w.out_features,
            w.in_features
        );
    }
    if mask.is_some_and(|m| m.dims() != [n, inf]) {
        candle_core::bail!("lora_linear: dropout mask does not match x {:?}", x.dims());
    }
    let z = super::at_offset_zero;
    let (x, a, b) = (z(x)?, z(a)?, z(b)?);
    let op = LoraLinear {
        w: w.clone(),
        bias: bias.map(|t| t.detach()),
        mask: mask.map(|t| t.detach()),
        scaling,
    };
    if super::records_graph(&[&x, &a, &b]) {
        x.apply_op3(&a, &b, op)
    } else {
        super::direct(op.forward(&x, &a, &b)?)
    }
}
