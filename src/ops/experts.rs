//! Expert projections over tokens grouped by expert (docs/ARCHITECTURE.md, decisions 2 and 8).
//!
//! The tokens routed to the local experts arrive sorted by expert: `x [M, in]`, where the
//! first `counts[0]` rows go to local expert 0, the next `counts[1]` to expert 1, and so on.
//! - `grouped_nf4`: `y[g] = x[g] · dequant(W_e)ᵀ` as one autograd node; its backward
//!   re-dequantizes (`dL/dx[g] = dL/dy[g] · dequant(W_e)`) and gives the frozen weight nothing.
//!   Experts are dequantized a chunk at a time (`dequant_chunk_bytes` of weights), and
//!   each chunk's products are one grouped GEMM (`grouped_gemm`): one launch per chunk instead
//!   of one dequantize and one GEMM per expert.
//! - `grouped_lora` (in `ops::grouped_lora`, re-exported here): split LoRA of the experts.
//!
//! `*_reference` are the per-expert loops with candle's autograd that the ops are tested
//! against.

pub use super::expert_weights::{ExpertStore, ExpertWeights};
use super::grouped_gemm::{grouped_gemm, Gemm, Product};
pub(crate) use super::grouped_lora::GroupedLora;
pub use super::grouped_lora::{grouped_lora, grouped_lora_reference};
use candle_core::{CustomOp1, Result, Tensor};

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

/// An expert projection with a factor inside its K (`ops::lora_in_k`): `transpose`, rows x
/// `[M, in + c]` times `[W_e | T_e]ᵀ` for `tail` `[E, out, c]` → `[M, out]`; else rows x
/// `[M, out + c]` times `[W_e; T_e]` for `tail` `[E, c, in]` → `[M, in]`. Experts dequantized
/// `chunk_bytes` at a time.
pub(crate) fn expert_matmul_with(
    x: &Tensor,
    w: &ExpertWeights,
    counts: &[usize],
    (transpose, chunk_bytes): (bool, usize),
    tail: &Tensor,
) -> Result<Tensor> {
    chunked_matmul(x, w, counts, transpose, chunk_bytes, Some(tail))
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
        Some(t) => t.dim(if transpose { 2 } else { 1 })?,
        None => 0,
    };
    let (k, n) = if transpose {
        (w.in_features + c, w.out_features)
    } else {
        (w.out_features + c, w.in_features)
    };
    let per = k * n;
    let chunk = w.experts_per_chunk(chunk_bytes, x.dtype(), c * n);
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
            Some(t) => {
                w.dequantize_with(lo..hi, x.dtype(), &t.narrow(0, lo, hi - lo)?, transpose)?
            }
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
pub(super) fn per_group(
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
