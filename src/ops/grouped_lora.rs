//! Split LoRA of a 3-D expert parameter over rows grouped by expert (`GroupedLora`):
//! `s · (x[g] · A_eᵀ) · B_eᵀ` with PEFT's 3-D layout (`A [r·E, in]` expert-major, `B [out,
//! r·E]` expert-minor); `B_e·A_e` is never formed. One autograd node ([`grouped_lora`]) whose
//! backward is four grouped products (dX, dA, dB and the rank-r hidden), on the thin
//! tensor-core kernels where they apply (`ops::thin_gemm`, docs/ARCHITECTURE.md decision 21),
//! else `grouped_gemm`; and its pieces for the routed experts (`ops::held_experts`,
//! `ops::lora_in_k`). `grouped_lora_reference` is the per-expert loop with candle's autograd
//! that the op is tested against.

use super::experts::per_group;
use super::grouped_gemm::{grouped_gemm, grouped_outer, Gemm, Product};
use super::thin_gemm::{self, ThinPlan};
use candle_core::{CustomOp3, DType, Result, Tensor};

/// PEFT's 3-D LoRA factors in x's dtype: A as `[E, r, in]`, B as `[E, out, r]` (B's columns
/// are expert-minor: column k·E + e belongs to expert e).
pub(super) fn lora_factors(
    a: &Tensor,
    b: &Tensor,
    r: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let (num_experts, inp, out) = (a.dim(0)? / r, a.dim(1)?, b.dim(0)?);
    let a3 = a.to_dtype(dtype)?.reshape((num_experts, r, inp))?;
    let b3 = b
        .to_dtype(dtype)?
        .reshape((out, r, num_experts))?
        .permute((2, 0, 1))?
        .contiguous()?;
    Ok((a3, b3))
}

pub(crate) struct GroupedLora {
    pub(super) counts: Vec<usize>,
    pub(super) first: usize,
    pub(super) r: usize,
    pub(super) scaling: f64,
    /// The grouping for the tensor-core kernels (`ops::thin_gemm`), where they apply.
    pub(super) plan: ThinPlan,
}

impl GroupedLora {
    /// The adapters of the local experts `first..first+counts.len()`, `counts[e]` rows each.
    pub(crate) fn new(counts: &[usize], first: usize, r: usize, scaling: f64) -> GroupedLora {
        let mut l = GroupedLora {
            counts: counts.to_vec(),
            first,
            r,
            scaling,
            plan: ThinPlan::new(Vec::new()),
        };
        l.plan = ThinPlan::new(l.groups());
        l
    }

    /// (global expert, first row, rows) of each local expert that has rows.
    fn groups(&self) -> Vec<(usize, usize, usize)> {
        let mut start = 0;
        let mut v = Vec::with_capacity(self.counts.len());
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 {
                v.push((self.first + i, start, n));
                start += n;
            }
        }
        v
    }

    /// Products of one kind over the groups: `f(expert, first row, rows)`.
    fn products(&self, f: impl Fn(usize, usize, usize) -> Product) -> Vec<Product> {
        self.groups()
            .into_iter()
            .map(|(e, s, n)| f(e, s, n))
            .collect()
    }

    /// The rank-r hidden `h = x · A_eᵀ` ([M·r] flat) of x [M, in].
    pub(super) fn hidden(&self, x: &Tensor, a3: &Tensor) -> Result<Tensor> {
        let (m, inp) = x.dims2()?;
        let r = self.r;
        let ps = self.products(|e, s, n| Product {
            a: s * inp,
            b: e * r * inp,
            c: s * r,
            m: n,
            n: r,
            k: inp,
        });
        grouped_gemm(x, a3, m * r, &ps, Gemm::nt(1.0))
    }

    /// x [M, in], A [r·E, in], B [out, r·E] → the update [M, out] (× scaling).
    pub(crate) fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(self.apply(x, a, b, None)?.0)
    }

    /// `y` plus the update (in y's buffer where the kernels apply: y must be a tensor nothing
    /// else reads), and the rank-r hidden `x · A_eᵀ` [M, r] for the backward.
    pub(crate) fn forward_into(
        &self,
        y: Tensor,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.apply(x, a, b, Some(y))
    }

    /// The rank-r hidden `x · A_eᵀ` [M, r] alone, by the products `forward_into` computes it
    /// with (the same values).
    pub(crate) fn hidden_of(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (m, inp) = x.dims2()?;
        // `lora_factors`'s A.
        let a3 = a
            .to_dtype(x.dtype())?
            .reshape((a.dim(0)? / self.r, self.r, inp))?;
        if self.plan.applies(x, self.r, &[inp, b.dim(0)?]) {
            return thin_gemm::project(x, &a3, &self.plan, 1.0);
        }
        self.hidden(x, &a3)?.reshape((m, self.r))
    }

    /// (the update, added into `into` when given; the hidden [M, r]).
    fn apply(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        into: Option<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (a3, b3) = lora_factors(a, b, self.r, x.dtype())?;
        let (m, inp) = x.dims2()?;
        let (out, r) = (b.dim(0)?, self.r);
        if self.plan.applies(x, r, &[inp, out]) {
            let h = thin_gemm::project(x, &a3, &self.plan, 1.0)?;
            let y = thin_gemm::expand(&h, &b3, &self.plan, self.scaling, into)?;
            return Ok((y, h));
        }
        let h = self.hidden(x, &a3)?;
        let ps = self.products(|e, s, n| Product {
            a: s * r,
            b: e * out * r,
            c: s * out,
            m: n,
            n: out,
            k: r,
        });
        let u = grouped_gemm(&h, &b3, m * out, &ps, Gemm::nt(self.scaling))?.reshape((m, out))?;
        let y = match into {
            Some(y) => (y + u)?,
            None => u,
        };
        Ok((y, h.reshape((m, r))?))
    }
}

impl CustomOp3 for GroupedLora {
    fn name(&self) -> &'static str {
        "grouped_lora"
    }

    super::tensor_forward!(3, "grouped_lora", forward);

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = self.backward(x, a, b, dy)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

impl GroupedLora {
    /// Gradients (dx [M, in] in x's dtype, dA, dB in theirs) of the update for upstream `dy`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.backward_into(x, a, b, dy, None, None)
    }

    /// `backward` with the forward's hidden `h` [M, r] where kept (else recomputed) and dx
    /// added into `dx_into` where given (in its buffer where the kernels apply).
    pub(crate) fn backward_into(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        h: Option<&Tensor>,
        dx_into: Option<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let _t = crate::util::phases::Span::start("bwd: grouped_lora", x.device());
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let h = match h {
            Some(h) => h.clone(),
            None => self.hidden_of(x, a, b)?,
        };
        let dh = self.back_project(&dy, (b, x.dim(1)?), None)?;
        let (da, db) = self.factor_grads(x, &dy, (&h, &dh), (a, b))?;
        let (m, inp, r) = (x.dim(0)?, x.dim(1)?, self.r);
        let num_experts = a.dim(0)? / r;
        if self.plan.applies(x, r, &[inp, b.dim(0)?]) {
            // Aᵀ [E, in, r].
            let at = a
                .to_dtype(x.dtype())?
                .reshape((num_experts, r, inp))?
                .transpose(1, 2)?
                .contiguous()?;
            let dx = thin_gemm::expand(&dh, &at, &self.plan, 1.0, dx_into)?;
            return Ok((dx, da, db));
        }
        let (a3, _) = lora_factors(a, b, r, x.dtype())?;
        let ps = self.products(|e, st, n| Product {
            a: st * r,
            b: e * r * inp,
            c: st * inp,
            m: n,
            n: inp,
            k: r,
        });
        let dx = grouped_gemm(&dh, &a3, m * inp, &ps, Gemm::nn(1.0))?.reshape((m, inp))?;
        let dx = match dx_into {
            Some(base) => (base + dx)?,
            None => dx,
        };
        Ok((dx, da, db))
    }

    /// dh = s · dy · B_e [M, r] for dy [M, out] (rows in place where `row_layout` allows) of
    /// a projection with `inp` inputs, written into columns `col..col + r` of `into` (a
    /// contiguous `[M, ≥ col + r]` buffer; the view is returned) where given. The thin kernel
    /// where it takes the whole adapter (`applies` over inp and out, as the other products).
    pub(super) fn back_project(
        &self,
        dy: &Tensor,
        (b, inp): (&Tensor, usize),
        into: Option<(&Tensor, usize)>,
    ) -> Result<Tensor> {
        let (m, out) = dy.dims2()?;
        let (r, dt) = (self.r, dy.dtype());
        let num_experts = b.dim(1)? / r;
        if self.plan.applies(dy, r, &[inp, out]) {
            // Bᵀ per expert [E, r, out] (B's column k·E + e is expert e's k).
            let bt = b
                .to_dtype(dt)?
                .reshape((out, r, num_experts))?
                .permute((2, 1, 0))?
                .contiguous()?;
            return match into {
                Some((buf, col)) => {
                    let t = buf.narrow(1, col, r)?;
                    thin_gemm::project_into(dy, &bt, &self.plan, self.scaling, &t)
                }
                None => thin_gemm::project(dy, &bt, &self.plan, self.scaling),
            };
        }
        let b3 = b
            .to_dtype(dt)?
            .reshape((out, r, num_experts))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let ps = self.products(|e, st, n| Product {
            a: st * out,
            b: e * out * r,
            c: st * r,
            m: n,
            n: r,
            k: out,
        });
        let dy = dy.contiguous()?;
        let dh = grouped_gemm(&dy, &b3, m * r, &ps, Gemm::nn(self.scaling))?.reshape((m, r))?;
        match into {
            Some((buf, col)) => {
                buf.slice_set(&dh, 1, col)?;
                buf.narrow(1, col, r)
            }
            None => Ok(dh),
        }
    }

    /// The factors' gradients from the forward's x [M, in] and hidden h, dy [M, out] and
    /// dh = s·dy·B: dA_e = dh_eᵀ·x_e, dBᵀ_e = s·h_eᵀ·dy_e, reduced over each expert's rows, in
    /// A's and B's layouts and dtypes.
    pub(super) fn factor_grads(
        &self,
        x: &Tensor,
        dy: &Tensor,
        (h, dh): (&Tensor, &Tensor),
        (a, b): (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (inp, out, r) = (x.dim(1)?, dy.dim(1)?, self.r);
        let num_experts = a.dim(0)? / r;
        let (dbt3, da3) = if self.plan.applies(x, r, &[inp, out]) {
            let e = num_experts;
            (
                thin_gemm::outer(h, dy, &self.plan, e, self.scaling)?,
                thin_gemm::outer(dh, x, &self.plan, e, 1.0)?,
            )
        } else {
            let groups = self.groups();
            let (h, dh) = (h.contiguous()?, dh.contiguous()?);
            (
                grouped_outer(&h, &dy.contiguous()?, &groups, num_experts, self.scaling)?,
                grouped_outer(&dh, &x.contiguous()?, &groups, num_experts, 1.0)?,
            )
        };
        let db = dbt3
            .reshape((num_experts, r, out))?
            .permute((2, 1, 0))?
            .reshape((out, r * num_experts))?;
        Ok((
            da3.reshape((r * num_experts, inp))?.to_dtype(a.dtype())?,
            db.to_dtype(b.dtype())?,
        ))
    }
}

/// Split LoRA of a 3-D expert parameter for the local experts `first..first+counts.len()`.
/// x: [M, in] sorted as for `grouped_nf4`; a: [r·E, in]; b: [out, r·E] → [M, out] (× scaling).
pub fn grouped_lora(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    counts: &[usize],
    first: usize,
    r: usize,
    scaling: f64,
) -> Result<Tensor> {
    let (m, inp) = x.dims2()?;
    let out = b.dim(0)?;
    let num_experts = a.dim(0)? / r;
    if a.dims2()? != (r * num_experts, inp) || b.dims2()? != (out, r * num_experts) {
        candle_core::bail!(
            "grouped_lora: x {:?}, A {:?}, B {:?} with r {r}",
            x.dims(),
            a.dims(),
            b.dims()
        );
    }
    if first + counts.len() > num_experts || counts.iter().sum::<usize>() != m {
        candle_core::bail!(
            "grouped_lora: experts {first}..{} of {num_experts}, counts sum to {} for {m} rows",
            first + counts.len(),
            counts.iter().sum::<usize>()
        );
    }
    if m == 0 {
        return Tensor::zeros((0, out), x.dtype(), x.device());
    }
    let z = super::at_offset_zero;
    let (x, a, b) = (z(x)?, z(a)?, z(b)?);
    let op = GroupedLora::new(counts, first, r, scaling);
    if super::records_graph(&[&x, &a, &b]) {
        x.apply_op3(&a, &b, op)
    } else {
        super::direct(op.forward(&x, &a, &b)?)
    }
}

/// The reference: a loop over experts with candle's autograd.
pub fn grouped_lora_reference(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    counts: &[usize],
    first: usize,
    r: usize,
    scaling: f64,
) -> Result<Tensor> {
    let (a3, b3) = lora_factors(a, b, r, x.dtype())?;
    per_group(x, counts, |xg, i| {
        let e = first + i;
        xg.matmul(&a3.get(e)?.t()?)?.matmul(&b3.get(e)?.t()?)
    })? * scaling
}
