//! The frozen weights of the experts a rank holds, 4-bit or unquantized, and their
//! dequantization a range of experts at a time (for `experts::expert_matmul`).

use super::nf4_linear::{Nf4Weight, Scales};
use super::swiglu::Glu;
use crate::quant::QuantKind;
use candle_core::{DType, Result, Tensor};
use std::ops::Range;

/// The frozen weights `[out, in]` of the experts this rank holds, in expert order.
#[derive(Clone)]
pub struct ExpertWeights {
    pub store: ExpertStore,
    pub num_experts: usize,
    pub out_features: usize,
    pub in_features: usize,
    /// `[E, out]`: each expert's bias, added to its rows of `x · Wᵀ` (gpt-oss).
    pub bias: Option<Tensor>,
    /// The activation of this (gate_up) projection's output (SwiGLU but for gpt-oss).
    pub glu: Glu,
}

#[derive(Clone)]
pub enum ExpertStore {
    /// 4-bit: one buffer of codes and one of block scales (nested statistics expanded per
    /// chunk). `packed` is expert-major `[E · out·in / 2]` u8, the scales `E · out·in /
    /// blocksize` blocks.
    Nf4 {
        packed: Tensor,
        absmax: Scales,
        kind: QuantKind,
        blocksize: usize,
    },
    /// Unquantized `[E, out, in]` in the compute dtype (a 16-bit base).
    Dense(Tensor),
}

impl ExpertWeights {
    /// Stacks per-expert 4-bit weights of one shape (each a whole number of blocks).
    pub fn stack(experts: &[Nf4Weight]) -> Result<ExpertWeights> {
        let Some(first) = experts.first() else {
            candle_core::bail!("ExpertWeights: no experts")
        };
        let per = first.out_features * first.in_features;
        for w in experts {
            if (w.out_features, w.in_features, w.kind, w.blocksize)
                != (
                    first.out_features,
                    first.in_features,
                    first.kind,
                    first.blocksize,
                )
                || per % w.blocksize != 0
            {
                candle_core::bail!("ExpertWeights: experts differ in shape or quantization");
            }
        }
        let packed: Vec<Tensor> = experts.iter().map(|w| w.packed.clone()).collect();
        // Each expert's statistics stand alone (own nested offset): stacked expanded.
        let absmax = experts
            .iter()
            .map(|w| w.absmax.values())
            .collect::<Result<Vec<_>>>()?;
        Ok(ExpertWeights {
            store: ExpertStore::Nf4 {
                packed: Tensor::cat(&packed, 0)?,
                absmax: Scales::Plain(Tensor::cat(&absmax, 0)?),
                kind: first.kind,
                blocksize: first.blocksize,
            },
            num_experts: experts.len(),
            out_features: first.out_features,
            in_features: first.in_features,
            bias: None,
            glu: Glu::Silu,
        })
    }

    /// Unquantized experts `[E, out, in]`.
    pub fn dense(weights: Tensor) -> Result<ExpertWeights> {
        let (num_experts, out_features, in_features) = weights.dims3()?;
        Ok(ExpertWeights {
            store: ExpertStore::Dense(weights),
            num_experts,
            out_features,
            in_features,
            bias: None,
            glu: Glu::Silu,
        })
    }

    /// The same experts with biases `[E, out]` and the activation `glu` of their output.
    pub fn with(self, bias: Option<Tensor>, glu: Glu) -> Result<ExpertWeights> {
        if let Some(b) = &bias {
            if b.dims() != [self.num_experts, self.out_features] {
                candle_core::bail!(
                    "ExpertWeights: bias {:?} for {} experts of {} outputs",
                    b.dims(),
                    self.num_experts,
                    self.out_features
                );
            }
        }
        Ok(ExpertWeights { bias, glu, ..self })
    }

    /// `y + b_e` on each expert's rows of `y [M, out]` (`counts[e]` rows each), where the
    /// experts have biases.
    pub(crate) fn add_bias(&self, y: Tensor, counts: &[usize]) -> Result<Tensor> {
        let Some(bias) = &self.bias else {
            return Ok(y);
        };
        let ids = expert_of_rows(counts, y.device())?;
        let rows = super::routing::select_rows(&bias.to_dtype(y.dtype())?, &ids)?;
        super::add::add(&y, &rows)
    }

    /// Each row's dot product with its expert's bias, ⟨dy[m], bias[e(m)]⟩ `[M]` (f32), for rows
    /// grouped by expert (`counts`); None without a bias.
    pub(crate) fn bias_dots(&self, dy: &Tensor, counts: &[usize]) -> Result<Option<Tensor>> {
        let Some(bias) = &self.bias else {
            return Ok(None);
        };
        // dy · biasᵀ [M, E] in f32 (one product; E is small), then each row's own expert's column.
        let ids = expert_of_rows(counts, dy.device())?.unsqueeze(1)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let all = f32(dy)?.matmul(&f32(bias)?.t()?)?;
        all.gather(&ids, 1)?.squeeze(1).map(Some)
    }

    /// Experts `range` (local indices) as `[n, out, in]` in `dtype`: dequantized, or a view
    /// of the unquantized weights (cast if the dtype differs).
    pub fn dequantize(&self, range: Range<usize>, dtype: DType) -> Result<Tensor> {
        let per = self.out_features * self.in_features;
        let n = range.len();
        match &self.store {
            ExpertStore::Nf4 {
                packed,
                absmax,
                kind,
                blocksize,
            } => {
                let packed = packed.narrow(0, range.start * per / 2, n * per / 2)?;
                let shape = [n, self.out_features, self.in_features];
                absmax
                    .narrow(range.start * per / blocksize, n * per / blocksize)?
                    .dequantize(&packed, &shape, *kind, *blocksize, dtype)
            }
            ExpertStore::Dense(t) => t.narrow(0, range.start, n)?.to_dtype(dtype),
        }
    }

    /// Experts `range` in `dtype` with an adapter's factor `tail` beside each weight row
    /// (`transpose`: `[n, out, in + c]` from tail `[n, out, c]`, for `x · Wᵀ`) or below each
    /// expert's rows (`[n, out + c, in]` from tail `[n, c, in]`, for `x · W`) — the factor
    /// inside the product's K (`ops::lora_in_k`). On CUDA the dequantization writes its rows
    /// in place (the same values as `dequantize`) and the tail is copied in; elsewhere a
    /// concatenation.
    pub(crate) fn dequantize_with(
        &self,
        range: Range<usize>,
        dtype: DType,
        tail: &Tensor,
        transpose: bool,
    ) -> Result<Tensor> {
        let tail = tail.to_dtype(dtype)?.contiguous()?;
        let dim = if transpose { 2 } else { 1 };
        #[cfg(feature = "cuda")]
        if let (
            ExpertStore::Nf4 {
                packed,
                absmax,
                kind,
                blocksize,
            },
            candle_core::Device::Cuda(_),
        ) = (&self.store, tail.device())
        {
            let (n, out, inp) = (range.len(), self.out_features, self.in_features);
            let (c, per) = (tail.dim(dim)?, out * inp);
            // Rows of `inp` laid `inp + c` apart, or each expert's block laid `(out + c)·inp`.
            let (row_len, ld, shape) = match transpose {
                true => (inp, inp + c, (n, out, inp + c)),
                false => (per, (out + c) * inp, (n, out + c, inp)),
            };
            let packed = packed.narrow(0, range.start * per / 2, n * per / 2)?;
            if crate::quant::cuda::rows_into_applies(&packed, n * per, row_len) && ld % 8 == 0 {
                let scales = absmax
                    .narrow(range.start * per / blocksize, n * per / blocksize)?
                    .for_rows()?;
                let len = n * ld * (per / row_len);
                let wide = super::grouped_gemm::output_for_products(len, dtype, tail.device())?
                    .reshape(shape)?;
                crate::quant::cuda::dequantize_rows_into(
                    &packed,
                    scales.row_scales(),
                    &wide,
                    n * per,
                    (row_len, ld),
                    *kind,
                    *blocksize,
                )?;
                let at = if transpose { inp } else { out };
                wide.slice_set(&tail, dim, at)?;
                return Ok(wide);
            }
        }
        Tensor::cat(&[self.dequantize(range, dtype)?, tail], dim)
    }

    /// Whether an adapter may go inside these weights' products' K (`ops::lora_in_k`): 4-bit
    /// weights, whose chunks are dequantized into a buffer anyway; a 16-bit base's products
    /// read the weights in place, which a chunk r columns wider would copy.
    pub(crate) fn takes_in_k(&self) -> bool {
        matches!(self.store, ExpertStore::Nf4 { .. })
    }

    /// Experts per `dequantize` call for chunks of `chunk_bytes` of weights in `dtype`, each
    /// expert's matrix with `extra` columns of its own beside it (`dequantize_with`'s tail):
    /// all at once when nothing is dequantized.
    pub(crate) fn experts_per_chunk(
        &self,
        chunk_bytes: usize,
        dtype: DType,
        extra: usize,
    ) -> usize {
        match &self.store {
            ExpertStore::Dense(t) if t.dtype() == dtype => self.num_experts.max(1),
            _ => {
                let per = self.out_features * self.in_features + extra;
                (chunk_bytes / (per * dtype.size_in_bytes())).max(1)
            }
        }
    }
}

/// The local expert of each row of rows grouped by expert (`counts[e]` rows each), u32 `[M]`.
fn expert_of_rows(counts: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let ids: Vec<u32> = counts
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| std::iter::repeat_n(e as u32, c))
        .collect();
    let n = ids.len();
    Tensor::from_vec(ids, n, device)
}
