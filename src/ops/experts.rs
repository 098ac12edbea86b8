//! Expert projections over tokens grouped by expert (docs/ARCHITECTURE.md, decisions 2 and 8).
//!
//! The tokens routed to the local experts arrive sorted by expert: `x [M, in]`, where the
//! first `counts[0]` rows go to local expert 0, the next `counts[1]` to expert 1, and so on.
//! - `grouped_nf4`: `y[g] = x[g] · dequant(W_e)ᵀ` as one autograd node; its backward
//!   re-dequantizes (`dL/dx[g] = dL/dy[g] · dequant(W_e)`) and gives the frozen weight nothing.
//!   Experts are dequantized a chunk at a time (`dequant_chunk_bytes` of weights), and
//!   each chunk's products are one grouped GEMM (`grouped_gemm`): one launch per chunk instead
//!   of one dequantize and one GEMM per expert.
//! - `grouped_lora`: split LoRA `s · (x[g] · A_eᵀ) · B_eᵀ` with PEFT's 3-D layout
//!   (`A [r·E, in]` expert-major, `B [out, r·E]` expert-minor); `B_e·A_e` is never formed. One
//!   autograd node whose backward is four grouped GEMMs (dX, dA, dB and the rank-r hidden).
//!
//! `*_reference` are the per-expert loops with candle's autograd that the ops are tested
//! against.

pub use super::expert_weights::{ExpertStore, ExpertWeights};
use super::grouped_gemm::{grouped_gemm, grouped_outer, Gemm, Product};
use super::thin_gemm::{self, ThinPlan};
use candle_core::{CustomOp1, CustomOp3, DType, Result, Tensor};

/// Dequantized weights of one grouped GEMM call stay under this size (bf16: 256 MiB = 40
/// experts of Qwen3-30B-A3B's gate_up, so a layer's 128 take 4 calls). Never a bf16 copy of
/// all experts at once (docs/ARCHITECTURE.md, decision 2). Whatever the input: at micro-batch
/// 1 a chunk sized by the input (64 MiB) gave each grouped GEMM ≈ 60 tiles for 132 SMs and
/// three times the launches, for 0.07 GB less peak memory (launch/bench/NOTES.md item 46).
pub const DEQUANT_CHUNK_BYTES: usize = 256 << 20;

/// The dequantization chunk: `DEQUANT_CHUNK_BYTES`, or `MOEQ_DEQUANT_CHUNK_MB` (A/B).
pub fn dequant_chunk_bytes() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("MOEQ_DEQUANT_CHUNK_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(DEQUANT_CHUNK_BYTES, |mb| mb << 20)
    })
}

/// `y[g] = x[g] · W_eᵀ` (`transpose`, x `[M, in]` → `[M, out]`) or `x[g] · W_e` (x `[M, out]`
/// → `[M, in]`), experts dequantized `chunk_bytes` at a time.
pub(crate) fn expert_matmul(
    x: &Tensor,
    w: &ExpertWeights,
    counts: &[usize],
    transpose: bool,
    chunk_bytes: usize,
) -> Result<Tensor> {
    chunked_matmul(x, w, counts, transpose, chunk_bytes, None)
}

/// `y[g] = x[g] · [W_e | T_e]ᵀ` for rows x `[M, in + c]` and `tail` `[E, out, c]` (T_e beside
/// each expert's weight: an adapter inside the product's K, `ops::lora_in_k`) → `[M, out]`,
/// experts dequantized `chunk_bytes` at a time.
pub(crate) fn expert_matmul_beside(
    x: &Tensor,
    w: &ExpertWeights,
    counts: &[usize],
    chunk_bytes: usize,
    tail: &Tensor,
) -> Result<Tensor> {
    chunked_matmul(x, w, counts, true, chunk_bytes, Some(tail))
}

fn chunked_matmul(
    x: &Tensor,
    w: &ExpertWeights,
    counts: &[usize],
    transpose: bool,
    chunk_bytes: usize,
    tail: Option<&Tensor>,
) -> Result<Tensor> {
    let m = x.dim(0)?;
    let c = match tail {
        Some(t) => t.dim(2)?,
        None => 0,
    };
    let (k, n) = if transpose {
        (w.in_features + c, w.out_features)
    } else {
        (w.out_features, w.in_features)
    };
    let per = w.out_features * (w.in_features + c);
    let chunk = w.experts_per_chunk(chunk_bytes, x.dtype());
    let gemm = if transpose {
        Gemm::nt(1.0)
    } else {
        Gemm::nn(1.0)
    };
    // On CUDA the chunks write straight into one output (no concatenation copy: the output is
    // the largest tensor of the call); the CPU reference assembles the chunks' outputs.
    let into = if x.device().is_cuda() {
        Some(super::grouped_gemm::output_for_products(
            m * n,
            x.dtype(),
            x.device(),
        )?)
    } else {
        None
    };
    let mut parts = Vec::new();
    let mut row = 0;
    for lo in (0..counts.len()).step_by(chunk) {
        let hi = (lo + chunk).min(counts.len());
        let rows: usize = counts[lo..hi].iter().sum();
        if rows == 0 {
            continue;
        }
        let wd = match tail {
            Some(t) => w.dequantize_beside(lo..hi, x.dtype(), &t.narrow(0, lo, hi - lo)?)?,
            None => w.dequantize(lo..hi, x.dtype())?,
        };
        // Output rows from `row` in the shared output, from 0 in a chunk's own.
        let first = if into.is_some() { row } else { 0 };
        let mut products = Vec::with_capacity(hi - lo);
        let mut r = 0;
        for (e, &c) in counts.iter().enumerate().take(hi).skip(lo) {
            if c > 0 {
                products.push(Product {
                    a: (row + r) * k,
                    b: (e - lo) * per,
                    c: (first + r) * n,
                    m: c,
                    n,
                    k,
                });
                r += c;
            }
        }
        match &into {
            Some(out) => super::grouped_gemm::grouped_gemm_into(out, x, &wd, &products, gemm)?,
            None => parts.push(grouped_gemm(x, &wd, rows * n, &products, gemm)?),
        }
        row += rows;
    }
    let y = match into {
        Some(out) => out.reshape((m, n))?,
        None => Tensor::cat(&parts, 0)?.reshape((m, n))?,
    };
    match transpose {
        true => w.add_bias(y, counts),
        false => Ok(y),
    }
}

struct GroupedNf4 {
    weights: ExpertWeights,
    counts: Vec<usize>,
    chunk_bytes: usize,
}

impl GroupedNf4 {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        expert_matmul(x, &self.weights, &self.counts, true, self.chunk_bytes)
    }
}

impl CustomOp1 for GroupedNf4 {
    fn name(&self) -> &'static str {
        "grouped_nf4"
    }

    super::tensor_forward!(1, "grouped_nf4", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: grouped_nf4", x.device());
        let g = expert_matmul(
            &grad.contiguous()?,
            &self.weights,
            &self.counts,
            false,
            self.chunk_bytes,
        )?;
        Ok(Some(g.to_dtype(x.dtype())?))
    }
}

/// x: [M, in] sorted by local expert, `counts[e]` rows each → [M, out].
pub fn grouped_nf4(x: &Tensor, weights: &ExpertWeights, counts: &[usize]) -> Result<Tensor> {
    let chunk = dequant_chunk_bytes();
    grouped_nf4_chunked(x, weights, counts, chunk)
}

/// `grouped_nf4` dequantizing at most `chunk_bytes` of weights per grouped GEMM (tests use a
/// small value to exercise several chunks).
pub fn grouped_nf4_chunked(
    x: &Tensor,
    weights: &ExpertWeights,
    counts: &[usize],
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (m, inp) = x.dims2()?;
    if inp != weights.in_features || counts.len() != weights.num_experts {
        candle_core::bail!(
            "grouped_nf4: input [{m}, {inp}] with {} groups, weights [{} × {}, {}]",
            counts.len(),
            weights.num_experts,
            weights.out_features,
            weights.in_features
        );
    }
    if counts.iter().sum::<usize>() != m {
        candle_core::bail!(
            "grouped_nf4: counts sum to {} for {m} rows",
            counts.iter().sum::<usize>()
        );
    }
    if m == 0 {
        return Tensor::zeros((0, weights.out_features), x.dtype(), x.device());
    }
    let x = super::at_offset_zero(x)?;
    let op = GroupedNf4 {
        weights: weights.clone(),
        counts: counts.to_vec(),
        chunk_bytes,
    };
    if super::records_graph(&[&x]) {
        x.apply_op1(op)
    } else {
        super::direct(op.fwd(&x)?)
    }
}

/// Applies `f` to each expert's rows of `x` and stacks the results in the same order.
fn per_group(
    x: &Tensor,
    counts: &[usize],
    f: impl Fn(&Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (e, &n) in counts.iter().enumerate() {
        if n > 0 {
            parts.push(f(&x.narrow(0, start, n)?, e)?);
            start += n;
        }
    }
    Tensor::cat(&parts, 0)
}

/// The reference: dequantize each expert and multiply with candle's ops (gradients flow to
/// x through ordinary autograd).
pub fn grouped_nf4_reference(
    x: &Tensor,
    weights: &ExpertWeights,
    counts: &[usize],
) -> Result<Tensor> {
    per_group(x, counts, |xg, e| {
        let w = weights.dequantize(e..e + 1, xg.dtype())?.squeeze(0)?;
        let y = xg.matmul(&w.t()?)?;
        match &weights.bias {
            Some(b) => y.broadcast_add(&b.get(e)?.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    })
}

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
        let (m, inp) = x.dims2()?;
        let (out, r, num_experts) = (b.dim(0)?, self.r, a.dim(0)? / self.r);
        let s = self.scaling;
        if self.plan.applies(x, r, &[inp, out]) {
            let dt = x.dtype();
            let h = match h {
                Some(h) => h.clone(),
                None => {
                    let a3 = a.to_dtype(dt)?.reshape((num_experts, r, inp))?;
                    thin_gemm::project(x, &a3, &self.plan, 1.0)?
                }
            };
            // Bᵀ per expert [E, r, out] (B's column k·E + e is expert e's k) and Aᵀ [E, in, r].
            let bt = b
                .to_dtype(dt)?
                .reshape((out, r, num_experts))?
                .permute((2, 1, 0))?
                .contiguous()?;
            let dh = thin_gemm::project(&dy, &bt, &self.plan, s)?;
            let dbt3 = thin_gemm::outer(&h, &dy, &self.plan, num_experts, s)?;
            let da3 = thin_gemm::outer(&dh, x, &self.plan, num_experts, 1.0)?;
            let at = a
                .to_dtype(dt)?
                .reshape((num_experts, r, inp))?
                .transpose(1, 2)?
                .contiguous()?;
            let dx = thin_gemm::expand(&dh, &at, &self.plan, 1.0, dx_into)?;
            let db = dbt3.permute((2, 1, 0))?.reshape((out, r * num_experts))?;
            return Ok((
                dx,
                da3.reshape((r * num_experts, inp))?.to_dtype(a.dtype())?,
                db.to_dtype(b.dtype())?,
            ));
        }
        let (a3, b3) = lora_factors(a, b, self.r, x.dtype())?;
        let h = self.hidden(x, &a3)?;
        let dh = grouped_gemm(
            &dy,
            &b3,
            m * r,
            &self.products(|e, st, n| Product {
                a: st * out,
                b: e * out * r,
                c: st * r,
                m: n,
                n: r,
                k: out,
            }),
            Gemm::nn(s),
        )?;
        // Weight gradients, reduced over each expert's rows: dBᵀ_e = s · h_eᵀ·dy_e [r, out],
        // dA_e = dh_eᵀ·x_e [r, in].
        let groups = self.groups();
        let h2 = h.reshape((m, r))?;
        let dbt3 = grouped_outer(&h2, &dy.reshape((m, out))?, &groups, num_experts, s)?;
        let da3 = grouped_outer(&dh.reshape((m, r))?, x, &groups, num_experts, 1.0)?;
        let dx = grouped_gemm(
            &dh,
            &a3,
            m * inp,
            &self.products(|e, st, n| Product {
                a: st * r,
                b: e * r * inp,
                c: st * inp,
                m: n,
                n: inp,
                k: r,
            }),
            Gemm::nn(1.0),
        )?
        .reshape((m, inp))?;
        let dx = match dx_into {
            Some(base) => (base + dx)?,
            None => dx,
        };
        let db = dbt3
            .reshape((num_experts, r, out))?
            .permute((2, 1, 0))?
            .reshape((out, r * num_experts))?;
        Ok((
            dx,
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
