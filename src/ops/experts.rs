//! Expert projections over tokens grouped by expert (DESIGN decisions 2 and 8).
//!
//! The tokens routed to the local experts arrive sorted by expert: `x [M, in]`, where the
//! first `counts[0]` rows go to local expert 0, the next `counts[1]` to expert 1, and so on.
//! - `grouped_nf4`: `y[g] = x[g] · dequant(W_e)ᵀ` as one autograd node; its backward
//!   re-dequantizes (`dL/dx[g] = dL/dy[g] · dequant(W_e)`) and gives the frozen weight nothing.
//! - `grouped_lora`: split LoRA `s · (x[g] · A_eᵀ) · B_eᵀ` with PEFT's 3-D layout
//!   (`A [r·E, in]` expert-major, `B [out, r·E]` expert-minor); `B_e·A_e` is never formed.
//!
//! One host loop over experts issues the per-expert kernels; the data never leaves the
//! device. A single grouped GEMM launch is performance work on top of this reference.

use super::nf4_linear::Nf4Weight;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

/// The frozen 4-bit weights `[out, in]` of the experts this rank holds, in expert order.
#[derive(Clone)]
pub struct ExpertWeights {
    pub experts: Arc<Vec<Nf4Weight>>,
    pub out_features: usize,
    pub in_features: usize,
}

/// Applies `f` to each expert's rows of `x` and stacks the results in the same order.
fn per_group(
    x: &Tensor,
    counts: &[usize],
    weights: &[Nf4Weight],
    f: impl Fn(&Tensor, &Nf4Weight) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (w, &n) in weights.iter().zip(counts) {
        if n > 0 {
            parts.push(f(&x.narrow(0, start, n)?, w)?);
            start += n;
        }
    }
    Tensor::cat(&parts, 0)
}

struct GroupedNf4 {
    weights: ExpertWeights,
    counts: Vec<usize>,
}

impl GroupedNf4 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        per_group(x, &self.counts, &self.weights.experts, |xg, w| {
            xg.matmul(&w.dequantize(xg.dtype())?.t()?)
        })
    }
}

impl CustomOp1 for GroupedNf4 {
    fn name(&self) -> &'static str {
        "grouped_nf4"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::tensor_of(Storage::Cpu(s.clone()), l, "grouped_nf4")?;
        super::cpu_result(self.forward(&x)?, "grouped_nf4")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = super::tensor_of(Storage::Cuda(s.try_clone(l)?), l, "grouped_nf4")?;
        super::cuda_result(self.forward(&x)?, "grouped_nf4")
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = per_group(
            &grad.contiguous()?,
            &self.counts,
            &self.weights.experts,
            |gg, w| gg.matmul(&w.dequantize(gg.dtype())?),
        )?;
        Ok(Some(g.to_dtype(x.dtype())?))
    }
}

/// x: [M, in] sorted by local expert, `counts[e]` rows each → [M, out].
pub fn grouped_nf4(x: &Tensor, weights: &ExpertWeights, counts: &[usize]) -> Result<Tensor> {
    let (m, inp) = x.dims2()?;
    if inp != weights.in_features || counts.len() != weights.experts.len() {
        candle_core::bail!(
            "grouped_nf4: input [{m}, {inp}] with {} groups, weights [{} × {}, {}]",
            counts.len(),
            weights.experts.len(),
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
    x.contiguous()?.apply_op1(GroupedNf4 {
        weights: weights.clone(),
        counts: counts.to_vec(),
    })
}

/// The reference: dequantize each expert and multiply with candle's ops (gradients flow to
/// x through ordinary autograd).
pub fn grouped_nf4_reference(
    x: &Tensor,
    weights: &ExpertWeights,
    counts: &[usize],
) -> Result<Tensor> {
    per_group(x, counts, &weights.experts, |xg, w| {
        xg.matmul(&w.dequantize(xg.dtype())?.t()?)
    })
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
    if m == 0 {
        return Tensor::zeros((0, out), x.dtype(), x.device());
    }
    let a3 = a.to_dtype(x.dtype())?.reshape((num_experts, r, inp))?;
    // B's columns are expert-minor: column k·E + e belongs to expert e.
    let b3 = b
        .to_dtype(x.dtype())?
        .reshape((out, r, num_experts))?
        .permute((2, 0, 1))?
        .contiguous()?; // [E, out, r]
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let e = first + i;
        let xg = x.narrow(0, start, n)?;
        let h = xg.matmul(&a3.get(e)?.t()?)?; // [n, r]
        parts.push(h.matmul(&b3.get(e)?.t()?)?); // [n, out]
        start += n;
    }
    Tensor::cat(&parts, 0)? * scaling
}
