//! A frozen projection (4-bit or 16-bit) with its LoRA adapter as one op:
//! `y = (x·Wᵀ + bias) + s·((m⊙x)·Aᵀ)·Bᵀ` — PEFT's `base(x) + lora_B(lora_A(dropout(x)))·scaling`
//! (the sum rounded once, as Unsloth's `addmm_`, where PEFT rounds three times: [`add_update`])
//! — and gradients for x, A and B (W, the bias and the dropout mask m are fixed). One graph
//! node instead of about seven (base product, bias, two LoRA products, two transposes, scale,
//! add): candle's backward gives every node's gradient a zero-filled buffer plus an add, a full
//! pass over `[N, out]` per node.

use super::grouped_gemm::{add_product, Gemm};
use super::nf4_linear::{forward as nf4_forward, FrozenWeight};
use candle_core::{CustomOp3, Result, Tensor};

struct LoraLinear {
    w: FrozenWeight,
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
        Ok(self.forward_keeping(x, a, b)?.0)
    }

    /// The output and the rank-r hidden `(m⊙x)·Aᵀ` `[N, r]`.
    fn forward_keeping(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut y = nf4_forward(x, &self.w)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let xa = self.lora_input(x)?.matmul(&a.t()?)?;
        let y = add_update(y, &xa, b, self.scaling)?;
        Ok((y, xa))
    }
}

/// What a LoRA projection's forward leaves for [`backward_into`] (a hand-written backward,
/// `arch::backward`): the factors in x's dtype, the rank-r hidden, the dropout mask.
pub(crate) struct LinearTape {
    a: Tensor,
    b: Tensor,
    xa: Tensor,
    mask: Option<Tensor>,
    scaling: f64,
}

/// `lora_linear`'s forward without a graph (the same arithmetic, so the same values) and what
/// its backward needs. x, a, b carry no gradient.
pub(crate) fn forward_taped(
    x: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scaling: f64,
    mask: Option<&Tensor>,
) -> Result<(Tensor, LinearTape)> {
    check(x, w, a, b, mask)?;
    let z = super::at_offset_zero;
    let (x, a, b) = (z(x)?, z(a)?, z(b)?);
    let op = LoraLinear {
        w: w.clone(),
        bias: bias.cloned(),
        mask: mask.cloned(),
        scaling,
    };
    let (y, xa) = op.forward_keeping(&x, &a, &b)?;
    let tape = LinearTape {
        a,
        b,
        xa,
        mask: op.mask,
        scaling,
    };
    Ok((super::direct(y)?, tape))
}

/// The backward of a frozen projection `x·Wᵀ` (+ its LoRA update when `lora` is given) for
/// upstream `dy`: dx, added into `dx_into` where given (which must own its buffer; on CUDA the
/// products accumulate in it, each rounded once), and (dA, dB) in the factors' dtype.
pub(crate) fn backward_into(
    x: &Tensor,
    w: &FrozenWeight,
    lora: Option<&LinearTape>,
    dy: &Tensor,
    dx_into: Option<Tensor>,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dy = dy.to_dtype(x.dtype())?;
    let wd = w.values(dy.dtype())?;
    let dx = match dx_into {
        None => dy.matmul(&wd)?,
        Some(acc) => add_product(acc, &dy, &wd, Gemm::nn(1.0))?,
    };
    let Some(t) = lora else {
        return Ok((dx, None));
    };
    let xin = match &t.mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let db = (dy.t()?.matmul(&t.xa)? * t.scaling)?; // [out, r]
    let dxa = (dy.matmul(&t.b)? * t.scaling)?; // [N, r]
    let da = dxa.t()?.matmul(&xin)?; // [r, in]
    let dx = match &t.mask {
        None => add_product(dx, &dxa, &t.a, Gemm::nn(1.0))?,
        Some(m) => (dx + (dxa.matmul(&t.a)? * m)?)?,
    };
    Ok((dx, Some((da, db))))
}

/// `y + s·xa·bᵀ` with one rounding of the sum to y's dtype, as Unsloth's `addmm_` (PEFT rounds
/// the product, the scaled product and the sum: `result + lora_B(lora_A(x)) * scaling`): on
/// CUDA inside the update's product (cuBLAS with β = 1 on y's buffer, the caller's fresh
/// projection output: no `[N, out]` update written and read back), on the CPU the same
/// arithmetic in f32 ([`add_product`]), so both devices round alike (ARCHITECTURE decision 8).
fn add_update(y: Tensor, xa: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    add_product(y, xa, b, Gemm::nt(s))
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
        // The scale goes on the rank-r products, not on a [N, out] copy of dy.
        let xa = xin.matmul(&a.t()?)?; // [N, r]
        let db = (dy.t()?.matmul(&xa)? * self.scaling)?; // [out, r]
        let dxa = (dy.matmul(&b)? * self.scaling)?; // [N, r]
        let da = dxa.t()?.matmul(&xin)?; // [r, in]
        let dx = dy.matmul(&self.w.values(dy.dtype())?)?; // [N, in]
        let dx = match &self.mask {
            None => add_product(dx, &dxa, &a, Gemm::nn(1.0))?,
            Some(m) => (dx + (dxa.matmul(&a)? * m)?)?,
        };
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x [N, in] → [N, out]`: the frozen projection `w` (plus `bias`) and the LoRA update
/// `scaling·((mask⊙x)·aᵀ)·bᵀ`, `a [r, in]` and `b [out, r]` in x's dtype.
pub fn lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check(x, w, a, b, mask)?;
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

fn check(
    x: &Tensor,
    w: &FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    mask: Option<&Tensor>,
) -> Result<()> {
    let (n, inf) = x.dims2()?;
    let (r, ain) = a.dims2()?;
    if inf != w.in_features() || ain != inf || b.dims2()? != (w.out_features(), r) {
        candle_core::bail!(
            "lora_linear: x {:?}, a {:?}, b {:?} for a [{}, {}] weight",
            x.dims(),
            a.dims(),
            b.dims(),
            w.out_features(),
            w.in_features()
        );
    }
    if mask.is_some_and(|m| m.dims() != [n, inf]) {
        candle_core::bail!("lora_linear: dropout mask does not match x {:?}", x.dims());
    }
    Ok(())
}
