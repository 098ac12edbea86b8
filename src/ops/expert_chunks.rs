//! The routed experts' recompute and backward together, a chunk of experts at a time
//! (`EXPERT_CHUNKS`, on unless `MOEQ_EXPERT_CHUNKS=0`). With the chunks' buffers reused and
//! each chunk's rows gathered when it runs (`CHUNK_BUFFERS`, `ChunkRows::ByToken`) it measured
//! +1.5% tokens/s and −0.07 GB of the driver's peak beside the attention rerun (q/k/v/o LoRA,
//! micro-batch 8, one H100: launch/bench/NOTES.md item 66); with the attention outputs kept
//! (`recompute_attention: false`) the chunks alone measured +2.1% and −0.45 GB (items 56, 60
//! and 62). gpu-check's "chunks = separate passes" and "rows by token" rows pass on the H100.
//!
//! With the layer recomputed and no expert adapters, the recompute forms gate_up's output only
//! for the backward, which dequantizes gate_up again for the input gradient. Here each chunk of
//! experts (the dequantization's chunk) is dequantized once for both: gu = xs·W_guᵀ, then
//! dact = dy·W_d, dgu through the SwiGLU, dxs = dgu·W_gu with the same dequantized chunk — one
//! gate_up dequantization a layer fewer, and gu, dact and dgu exist a chunk at a time. Each
//! expert's products are those of the separate passes (same rows, same weights, same order),
//! so the gradients are the same.

use super::expert_weights::ExpertWeights;
use super::grouped_gemm::{grouped_gemm, grouped_gemm_into, output_for_products, Gemm, Product};
use super::routing::{gather_forward_rows, rows_into, RowOrder};
use super::swiglu::{packed_backward, packed_backward_dot, packed_backward_in_place};
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{DType, Result, Tensor};
use std::ops::Range;

pub static EXPERT_CHUNKS: EnvSwitch = EnvSwitch::new("MOEQ_EXPERT_CHUNKS", true, ON_OFF);

/// The chunks' working buffers (gu, dact, and the chunk's gathered rows) allocated once a
/// layer at the largest chunk's size and reused by every chunk, dgu written over gu
/// (`swiglu::packed_backward_in_place`): on CUDA, on unless `MOEQ_CHUNK_BUFFERS=0`
/// (launch/bench/NOTES.md items 63 and 66). Buffers sized by each chunk's rows fragment the
/// pool (+0.43 GB of its reserve beside the attention rerun); one size each a layer took
/// +0.16–0.26 GB with the rows gathered whole, and −0.07 GB with each chunk gathering its own.
pub static CHUNK_BUFFERS: EnvSwitch = EnvSwitch::new("MOEQ_CHUNK_BUFFERS", true, ON_OFF);

/// The rows gate_up's product reads in [`backward_by_chunk`], grouped by expert: gathered
/// whole, or (a recompute on one rank, `arch::moe_tape`) not gathered at all — the layer's
/// input and the routing order, each chunk's rows gathered when the chunk runs (its rows are
/// one range of the expert-sorted order): a chunk's rows in memory instead of all of them
/// (at micro-batch 8 on Qwen3-30B-A3B ≈ 170 MB instead of 537).
pub(crate) enum ChunkRows {
    Gathered(Tensor),
    ByToken { x: Tensor, order: RowOrder },
}

thread_local! {
    static BY_TOKEN_RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many [`backward_by_chunk`] calls on this thread gathered their rows a chunk at a time
/// (`ChunkRows::ByToken`; the tests assert the layer recompute takes that path — per thread,
/// so tests running beside it cannot count for it).
pub fn by_token_runs() -> u64 {
    BY_TOKEN_RUNS.with(|c| c.get())
}

impl ChunkRows {
    /// (rows M, columns H, dtype, device).
    fn shape(&self) -> Result<(usize, usize, DType, candle_core::Device)> {
        Ok(match self {
            ChunkRows::Gathered(xs) => (xs.dim(0)?, xs.dim(1)?, xs.dtype(), xs.device().clone()),
            ChunkRows::ByToken { x, order } => (
                order.tokens.elem_count(),
                x.dim(1)?,
                x.dtype(),
                x.device().clone(),
            ),
        })
    }
}

/// Whether [`backward_by_chunk`] serves these weights: the switch on, and no gate_up bias (its
/// chunk would need the bias of its experts only).
pub(crate) fn serves(gate_up: &ExpertWeights) -> bool {
    EXPERT_CHUNKS.get() && gate_up.bias.is_none()
}

/// The products of experts `experts` over their rows (`counts`): A's rows from `a_row` (`k`
/// wide), C's from `c_row` (`n` wide), expert e's weights at (e − start)·k·n of the chunk.
pub(crate) fn products(
    counts: &[usize],
    experts: Range<usize>,
    (a_row, c_row): (usize, usize),
    k: usize,
    n: usize,
) -> Vec<Product> {
    let mut out = Vec::with_capacity(experts.len());
    let mut r = 0;
    for e in experts.clone() {
        let c = counts[e];
        if c > 0 {
            out.push(Product {
                a: (a_row + r) * k,
                b: (e - experts.start) * k * n,
                c: (c_row + r) * n,
                m: c,
                n,
                k,
            });
            r += c;
        }
    }
    out
}

/// The rows xs `[M, H]` (`rows_in`) and dy `[M, H]` grouped by expert → (dxs `[M, H]` in
/// `dtype`, with `dots` each row's ⟨dy, act·W_dᵀ⟩ `[M]` f32 — the expert output's dot without
/// its bias), as `Held::backward` gives them from a recompute's gu; gate_up dequantized
/// `chunk_bytes` at a time (`dequant_chunk_bytes()`), down for the same experts. dy is
/// consumed: on CUDA its buffer takes dxs where the dtypes agree (a chunk's rows of dxs are
/// written after its rows of dy were last read), so dy and dxs never take memory side by side.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_by_chunk(
    gate_up: &ExpertWeights,
    down: &ExpertWeights,
    counts: &[usize],
    rows_in: &ChunkRows,
    dy: Tensor,
    dtype: DType,
    dots: bool,
    chunk_bytes: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let (m, h, dt, device) = rows_in.shape()?;
    let (two_i, i) = (gate_up.out_features, down.in_features);
    if matches!(rows_in, ChunkRows::ByToken { .. }) {
        BY_TOKEN_RUNS.with(|c| c.set(c.get() + 1));
    }
    let dy = super::at_offset_zero(&dy)?;
    let chunk = gate_up.experts_per_chunk(chunk_bytes, dt, 0);
    // On CUDA the chunks' input gradients go straight into one output — dy's own buffer where
    // it can take them; the CPU assembles them.
    let into = match (device.is_cuda(), dy.dtype() == dt) {
        (true, true) => Some(dy.clone()),
        (true, false) => Some(output_for_products(m * h, dt, &device)?),
        (false, _) => None,
    };
    let (mut parts, mut dot_parts) = (Vec::new(), Vec::new());
    let spans: Vec<(Range<usize>, usize)> = (0..counts.len())
        .step_by(chunk)
        .map(|lo| lo..(lo + chunk).min(counts.len()))
        .map(|e| (e.clone(), counts[e].iter().sum()))
        .filter(|(_, rows)| *rows > 0)
        .collect();
    let most = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let buffers = match CHUNK_BUFFERS.get() && into.is_some() {
        true => Some((
            output_for_products(most * two_i, dt, &device)?,
            output_for_products(most * i, dy.dtype(), &device)?,
            // A chunk's gathered rows, where they are gathered by chunk into a buffer.
            match rows_in {
                ChunkRows::ByToken { x, order } if rows_into(x, order) => {
                    Some(output_for_products(most * h, dt, &device)?)
                }
                _ => None,
            },
        )),
        false => None,
    };
    // A product's output: the first `len` elements of a reused buffer, or its own.
    let product = |buf: Option<&Tensor>, a: &Tensor, w: &Tensor, len, ps: &[Product], g| match buf {
        Some(b) => {
            let out = b.narrow(0, 0, len)?;
            grouped_gemm_into(&out, a, w, ps, g)?;
            Ok(out)
        }
        None => grouped_gemm(a, w, len, ps, g),
    };
    let mut row = 0;
    for (experts, rows) in spans {
        // The chunk's rows: from `row` in the whole gather, or gathered now from row 0.
        let (xs, a_row) = match rows_in {
            ChunkRows::Gathered(xs) => (xs.contiguous()?, row),
            ChunkRows::ByToken { x, order } => {
                let buf = buffers.as_ref().and_then(|b| b.2.as_ref());
                (gather_forward_rows(x, order, row..row + rows, buf)?, 0)
            }
        };
        let w_gu = gate_up.dequantize(experts.clone(), dt)?;
        let gu = product(
            buffers.as_ref().map(|b| &b.0),
            &xs,
            &w_gu,
            rows * two_i,
            &products(counts, experts.clone(), (a_row, 0), h, two_i),
            Gemm::nt(1.0),
        )?
        .reshape((rows, two_i))?;
        drop(xs);
        let w_d = down.dequantize(experts.clone(), dy.dtype())?;
        let dact = product(
            buffers.as_ref().map(|b| &b.1),
            &dy,
            &w_d,
            rows * i,
            &products(counts, experts.clone(), (row, 0), h, i),
            Gemm::nn(1.0),
        )?
        .reshape((rows, i))?
        .to_dtype(dtype)?;
        drop(w_d);
        let in_place = match buffers.is_some() {
            true => packed_backward_in_place(&gu, &dact, gate_up.glu, dots)?,
            false => None,
        };
        let dgu = match (in_place, dots) {
            (Some(dot), _) => {
                dot_parts.extend(dot);
                gu
            }
            (None, true) => {
                let (dgu, dot) = packed_backward_dot(&gu, &dact, gate_up.glu)?;
                dot_parts.push(dot);
                drop(gu);
                dgu
            }
            (None, false) => {
                let dgu = packed_backward(&gu, &dact, gate_up.glu)?;
                drop(gu);
                dgu
            }
        };
        drop(dact);
        // The input gradient's rows: at the chunk's place in the shared output, or from 0 in
        // the chunk's own.
        let c_row = if into.is_some() { row } else { 0 };
        let back = products(counts, experts, (0, c_row), two_i, h);
        match &into {
            Some(out) => grouped_gemm_into(out, &dgu, &w_gu, &back, Gemm::nn(1.0))?,
            None => parts.push(grouped_gemm(&dgu, &w_gu, rows * h, &back, Gemm::nn(1.0))?),
        }
        row += rows;
    }
    let dxs = match into {
        Some(out) => out.reshape((m, h))?,
        None if parts.is_empty() => Tensor::zeros((m, h), dt, &device)?,
        None => Tensor::cat(&parts, 0)?.reshape((m, h))?,
    };
    let dots = match (dots, dot_parts.is_empty()) {
        (false, _) => None,
        (true, true) => Some(Tensor::zeros(m, DType::F32, &device)?),
        (true, false) => Some(Tensor::cat(&dot_parts, 0)?),
    };
    Ok((dxs.to_dtype(dtype)?, dots))
}

#[cfg(test)]
mod tests {
    use super::{backward_by_chunk, ChunkRows};
    use crate::ops::expert_weights::ExpertWeights;
    use crate::ops::experts::expert_matmul;
    use crate::ops::nf4_linear::Nf4Weight;
    use crate::ops::routing::RowOrder;
    use crate::ops::swiglu::packed_backward_dot;
    use crate::quant::{QuantSettings, QuantizedParam};
    use candle_core::{DType, Device, Result, Tensor};

    fn experts(n: usize, out: usize, inp: usize) -> Result<ExpertWeights> {
        let cpu = &Device::Cpu;
        let ws = (0..n)
            .map(|_| {
                let w: Vec<f32> = Tensor::randn(0f32, 0.1, out * inp, cpu)?.to_vec1()?;
                let q = QuantizedParam::quantize(&w, &[out, inp], QuantSettings::default())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Nf4Weight::from_param(&q, cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        ExpertWeights::stack(&ws)
    }

    /// By chunks of 3 experts (one chunk without rows, experts without rows inside chunks)
    /// against the separate passes over all experts: the same products, so the same bits —
    /// from the rows gathered whole and from the layer's input gathered a chunk at a time
    /// (7 tokens, 4 rows each, in a shuffled order).
    #[test]
    fn chunks_give_the_separate_passes_bits() -> Result<()> {
        let (h, i, k) = (64usize, 32usize, 4usize);
        let counts = [5usize, 0, 7, 0, 0, 0, 3, 9, 0, 4];
        let m: usize = counts.iter().sum();
        let (gate_up, down) = (experts(10, 2 * i, h)?, experts(10, h, i)?);
        // Slots in a shuffled order (a fixed odd stride modulo the 28 rows: a permutation).
        let slots: Vec<u32> = (0..m).map(|r| ((r * 11 + 5) % m) as u32).collect();
        let tokens: Vec<u32> = slots.iter().map(|s| s / k as u32).collect();
        let cpu = &Device::Cpu;
        let order = RowOrder::new(tokens, slots, k, cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (m / k, h), cpu)?.to_dtype(dtype)?;
            let xs = x.index_select(&order.tokens, 0)?;
            let dy = Tensor::randn(0f32, 1.0, (m, h), cpu)?.to_dtype(dtype)?;
            let chunk = 3 * 2 * i * h * dtype.size_in_bytes();
            let all = usize::MAX / 2;
            let gu = expert_matmul(&xs, &gate_up, &counts, true, all)?;
            let dact = expert_matmul(&dy, &down, &counts, false, all)?.to_dtype(dtype)?;
            let (dgu, want_dots) = packed_backward_dot(&gu, &dact, gate_up.glu)?;
            let want = expert_matmul(&dgu, &gate_up, &counts, false, all)?;
            let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let by_token = ChunkRows::ByToken {
                x: x.clone(),
                order: order.clone(),
            };
            for (rows, name) in [
                (ChunkRows::Gathered(xs), "gathered"),
                (by_token, "by token"),
            ] {
                let (dxs, dots) = backward_by_chunk(
                    &gate_up,
                    &down,
                    &counts,
                    &rows,
                    dy.clone(),
                    dtype,
                    true,
                    chunk,
                )?;
                assert_eq!(f32s(&dxs)?, f32s(&want)?, "{dtype:?} {name} dxs");
                let dots = dots.expect("dots asked for");
                assert_eq!(f32s(&dots)?, f32s(&want_dots)?, "{dtype:?} {name} dots");
                assert!(f32s(&dxs)?.iter().any(|v| *v != 0.0), "a real gradient");
            }
        }
        Ok(())
    }
}
