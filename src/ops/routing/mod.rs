//! Moving token rows into expert order and back as gathers, never scatter-adds.
//!
//! Top-k routing sends every token `t` to `k` experts; the routed rows are sorted by expert, row
//! `r` holding token `tokens[r]` for its slot `slots[r]` (= t·k + j, the position of the choice in
//! the flattened `[N, k]` routing weights), and `inv[t·k + j]` is the row of each slot. Both
//! directions (and both backwards) are then gathers with `k` terms per token: no atomics, and
//! full parallelism over the output (candle's `index_add` runs one thread per column and loops
//! over all rows: tens of milliseconds per layer at Qwen3-30B-A3B size). On CUDA the row gather
//! can also read token-major (`ROWS_BY_TOKEN`): each token row read once and written to its k
//! rows through `inv` — a permutation's writes, still no atomics.

use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{CustomOp1, CustomOp2, DType, Result, Tensor};

/// Whether the CUDA row gather and the combine backward's weighted rows read the source
/// token-major (`cuda::spread_rows`: each token row read once, written to its k rows) rather
/// than row by row. On unless `MOEQ_ROWS_BY_TOKEN=0` (+1.9% tokens/s, q/k/v/o LoRA, micro-batch
/// 8: launch/bench/NOTES.md items 55 and 59); gpu-check runs both.
pub static ROWS_BY_TOKEN: EnvSwitch = EnvSwitch::new("MOEQ_ROWS_BY_TOKEN", true, ON_OFF);

/// The routing permutation of one micro-batch through one MoE layer.
#[derive(Clone)]
pub struct RowOrder {
    /// Token of each routed row: `[M]` u32.
    pub tokens: Tensor,
    /// Slot (t·k + j) of each routed row: `[M]` u32.
    pub slots: Tensor,
    /// Routed row of each slot: `[N·k]` u32.
    pub inv: Tensor,
    pub k: usize,
}

impl RowOrder {
    /// From the host-side row order (`tokens[r]`, `slots[r]`); every slot must occur once.
    pub fn new(
        tokens: Vec<u32>,
        slots: Vec<u32>,
        k: usize,
        device: &candle_core::Device,
    ) -> Result<RowOrder> {
        let m = slots.len();
        let mut inv = vec![u32::MAX; m];
        for (r, &s) in slots.iter().enumerate() {
            match inv.get_mut(s as usize) {
                Some(v) if *v == u32::MAX => *v = r as u32,
                _ => candle_core::bail!("routing: slot {s} repeated or out of range for {m} rows"),
            }
        }
        if k == 0 || m % k != 0 {
            candle_core::bail!("routing: {m} rows are not whole tokens of {k} slots");
        }
        Ok(RowOrder {
            tokens: Tensor::from_vec(tokens, m, device)?,
            slots: Tensor::from_vec(slots, m, device)?,
            inv: Tensor::from_vec(inv, m, device)?,
            k,
        })
    }
}

/// One micro-batch's routing through one MoE layer: the row order, the rows of each held
/// expert, and the tokens of every expert.
pub struct Plan {
    pub order: RowOrder,
    /// Rows per held expert.
    pub counts: Vec<usize>,
    /// Rows (token choices) per global expert.
    pub per_expert: Vec<u64>,
}

/// The routing plan of top-k choices `top [N, k]` u32 over `experts` experts, rows for the
/// `held` ones sorted by expert, then slot (t·k + j). When every expert is held and `top` is on
/// CUDA it is built on the device and only the counts come to the host; otherwise from a host
/// copy of the choices.
pub fn plan(top: &Tensor, experts: usize, held: std::ops::Range<usize>) -> Result<Plan> {
    #[cfg(feature = "cuda")]
    if top.device().is_cuda() && held == (0..experts) && experts <= 1024 && top.elem_count() > 0 {
        let (order, counts) = cuda::plan(top, experts)?;
        let per_expert = counts.iter().map(|&c| c as u64).collect();
        return Ok(Plan {
            order,
            counts,
            per_expert,
        });
    }
    let indices = top.to_vec2::<u32>()?;
    let mut rows: Vec<Vec<(u32, u32)>> = vec![Vec::new(); experts];
    for (t, choice) in indices.iter().enumerate() {
        for (j, &e) in choice.iter().enumerate() {
            match rows.get_mut(e as usize) {
                Some(r) => r.push((t as u32, (t * choice.len() + j) as u32)),
                None => candle_core::bail!("routing: expert {e} chosen of {experts}"),
            }
        }
    }
    let per_expert = rows.iter().map(|r| r.len() as u64).collect();
    let mut tokens = Vec::new();
    let mut slots = Vec::new();
    let mut counts = Vec::with_capacity(held.len());
    for e in held {
        counts.push(rows[e].len());
        for &(t, s) in &rows[e] {
            tokens.push(t);
            slots.push(s);
        }
    }
    let k = indices.first().map_or(1, |c| c.len());
    Ok(Plan {
        order: RowOrder::new(tokens, slots, k, top.device())?,
        counts,
        per_expert,
    })
}

/// `Σ_j src[idx[t·k + j]]` over the k rows of each token: src `[M, H]` → `[M / k, H]`, summed
/// in f32 and returned in `dtype`, each term optionally weighted by `w [N, k]`. One kernel on
/// CUDA (f32 weights); candle ops otherwise (the reference).
fn gather_sum(
    src: &Tensor,
    idx: &Tensor,
    k: usize,
    w: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() && src.dtype() == dtype && w.is_none_or(|w| w.dtype() == DType::F32) {
        return cuda::gather_sum(src, idx, k, w);
    }
    gather_sum_reference(src, idx, k, w, dtype)
}

fn gather_sum_reference(
    src: &Tensor,
    idx: &Tensor,
    k: usize,
    w: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    let (m, h) = src.dims2()?;
    let rows = src
        .index_select(idx, 0)?
        .to_dtype(DType::F32)?
        .reshape((m / k, k, h))?;
    let rows = match w {
        Some(w) => rows.broadcast_mul(&w.to_dtype(DType::F32)?.unsqueeze(2)?)?,
        None => rows,
    };
    rows.sum(1)?.to_dtype(dtype)
}

/// The row gather's forward on tensors, no graph: x `[N, H]` → `[N·k, H]` in `order`.
pub(crate) fn gather_forward(x: &Tensor, order: &RowOrder) -> Result<Tensor> {
    super::direct(GatherRows(order.clone()).fwd(x)?)
}

/// `gather_forward` into rows `extra` columns wider, `[N·k, H + extra]`, for a caller that
/// writes the last columns itself (`ops::lora_in_k`; zeros on the CPU, unwritten on CUDA).
pub(crate) fn gather_forward_wide(x: &Tensor, order: &RowOrder, extra: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::gather_rows_wide(&super::at_offset_zero(x)?, &order.tokens, extra);
    }
    let xs = gather_forward(x, order)?;
    let pad = Tensor::zeros((xs.dim(0)?, extra), xs.dtype(), xs.device())?;
    Tensor::cat(&[&xs, &pad], 1)
}

/// The row gather's backward: dxs `[N·k, H]` → dx `[N, H]` in `dtype`.
pub(crate) fn gather_backward(dxs: &Tensor, order: &RowOrder, dtype: DType) -> Result<Tensor> {
    gather_sum(&dxs.contiguous()?, &order.inv, order.k, None, dtype)
}

/// The weighted combine's forward on tensors, no graph: y `[N·k, H]`, w `[N, k]` → `[N, H]`.
pub(crate) fn combine_forward(y: &Tensor, w: &Tensor, order: &RowOrder) -> Result<Tensor> {
    super::direct(CombineRows(order.clone()).fwd(y, w)?)
}

/// `xs[r] = x[tokens[r]]`; backward: `dx[t] = Σ_j dxs[inv[t·k + j]]`.
struct GatherRows(RowOrder);

impl GatherRows {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        // On CUDA the routing kernel with one unweighted term per row (16-byte copies; candle's
        // index_select moved ~0.27 TB/s here).
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            if ROWS_BY_TOKEN.get() && cuda::spreads(x, &self.0) {
                return cuda::spread_rows(x, &self.0, None);
            }
            return cuda::gather_sum(x, &self.0.tokens, 1, None);
        }
        x.index_select(&self.0.tokens, 0)
    }
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather_rows"
    }

    super::tensor_forward!(1, "gather_rows", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: routing gather", x.device());
        Ok(Some(gather_backward(grad, &self.0, x.dtype())?))
    }
}

/// `out[t] = Σ_j w[t, j] · y[inv[t·k + j]]`; backward: `dy[r] = w[slot r] · dout[tokens[r]]`,
/// `dw[t, j] = ⟨dout[t], y[inv[t·k + j]]⟩` (f32 sums).
struct CombineRows(RowOrder);

impl CombineRows {
    fn fwd(&self, y: &Tensor, w: &Tensor) -> Result<Tensor> {
        gather_sum(y, &self.0.inv, self.0.k, Some(w), y.dtype())
    }
}

impl CustomOp2 for CombineRows {
    fn name(&self) -> &'static str {
        "combine_rows"
    }

    super::tensor_forward!(2, "combine_rows", fwd);

    fn bwd(
        &self,
        y: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: routing combine", y.device());
        let (dy, dw) = combine_backward(y, w, &self.0, grad)?;
        Ok((Some(dy), Some(dw)))
    }
}

/// The weighted combine's backward: (y, w, dout `[N, H]`) → (dy `[N·k, H]` in y's dtype, dw
/// `[N, k]` in w's dtype).
pub(crate) fn combine_backward(
    y: &Tensor,
    w: &Tensor,
    o: &RowOrder,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && w.dtype() == DType::F32 {
        let grad = super::at_offset_zero(&grad.to_dtype(y.dtype())?)?;
        return cuda::combine_bwd(&grad, y, w, o);
    }
    let (m, h) = y.dims2()?;
    let grad = grad.to_dtype(DType::F32)?.contiguous()?; // [N, H]
    let w_rows = w
        .to_dtype(DType::F32)?
        .flatten_all()?
        .index_select(&o.slots, 0)?; // [M]
    let dy = grad
        .index_select(&o.tokens, 0)?
        .broadcast_mul(&w_rows.unsqueeze(1)?)?
        .to_dtype(y.dtype())?;
    let y_tok = y
        .index_select(&o.inv, 0)?
        .to_dtype(DType::F32)?
        .reshape((m / o.k, o.k, h))?; // [N, k, H]
    let dw = y_tok
        .broadcast_mul(&grad.unsqueeze(1)?)?
        .sum(2)?
        .to_dtype(w.dtype())?; // [N, k]
    Ok((dy, dw))
}

/// The weighted combine's backward for the rows alone: dout `[N, H]` → dy `[N·k, H]` in
/// `dtype`, `dy[r] = w[slot r] · dout[tokens[r]]` (one rounding, as [`combine_backward`]). The
/// weights' gradient then comes from the experts' backward ([`weights_grad`]), which spares
/// reading the expert outputs (and keeping them for the backward).
pub(crate) fn combine_backward_rows(
    w: &Tensor,
    o: &RowOrder,
    grad: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    combine_backward_rows_wide(w, o, grad, dtype, 0)
}

/// `combine_backward_rows` into rows `extra` columns wider, `[N·k, H + extra]`, the last
/// columns left to the caller (`ops::lora_in_k`; zeros on the CPU, unwritten on CUDA).
pub(crate) fn combine_backward_rows_wide(
    w: &Tensor,
    o: &RowOrder,
    grad: &Tensor,
    dtype: DType,
    extra: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if grad.device().is_cuda() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        let grad = super::at_offset_zero(&grad.to_dtype(dtype)?)?;
        if extra == 0 && ROWS_BY_TOKEN.get() && cuda::spreads(&grad, o) {
            return cuda::spread_rows(&grad, o, Some(&w.flatten_all()?));
        }
        let w_rows = w
            .to_dtype(DType::F32)?
            .flatten_all()?
            .index_select(&o.slots, 0)?;
        return cuda::gather_sum_wide(&grad, &o.tokens, 1, Some(&w_rows), extra);
    }
    let w_rows = w
        .to_dtype(DType::F32)?
        .flatten_all()?
        .index_select(&o.slots, 0)?; // [M]
    let rows = grad
        .to_dtype(DType::F32)?
        .index_select(&o.tokens, 0)?
        .broadcast_mul(&w_rows.unsqueeze(1)?)?
        .to_dtype(dtype)?;
    match extra {
        0 => Ok(rows),
        _ => {
            let pad = Tensor::zeros((rows.dim(0)?, extra), dtype, rows.device())?;
            Tensor::cat(&[&rows, &pad], 1)
        }
    }
}

/// The weighted combine's weight gradient `[N, k]` (w's dtype) from the routed rows' dots
/// `[N·k]` (f32, row order) of [`combine_backward_rows`]'s rows with what they scaled — each
/// w times ⟨dout[t], y[r]⟩ (`ops::routed_experts`): `dw[s] = dots[inv[s]] / w[s]`, 0 where
/// w[s] = 0 (its row's gradient is 0 there, and a zero weight passes no gradient to the
/// router's logits: softmax and sigmoid scale theirs by the probability).
pub(crate) fn weights_grad(dots: &Tensor, w: &Tensor, o: &RowOrder) -> Result<Tensor> {
    let w32 = w.to_dtype(DType::F32)?;
    let nonzero = w32
        .eq(&w32.zeros_like()?)?
        .where_cond(&w32.ones_like()?, &w32)?;
    let dots = dots.flatten_all()?.index_select(&o.inv, 0)?;
    (dots.reshape(w.shape())? / nonzero)?.to_dtype(w.dtype())
}

/// Rows `idx` (`[M]` u32) of src `[R, H]` → `[M, H]`, no graph: on CUDA the 16-byte row
/// gather (candle's `index_select` moved ~0.27 TB/s there), elsewhere `index_select`.
pub(crate) fn select_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() && matches!(src.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return cuda::gather_sum(&super::at_offset_zero(src)?, idx, 1, None);
    }
    src.index_select(idx, 0)
}

/// Rows `rows` of `gather_forward(x, order)` → `[rows.len(), H]`, the same values: a chunk of
/// experts' rows, one range of the expert-sorted order (`ops::expert_chunks`). On CUDA read
/// token-major where `ROWS_BY_TOKEN` and the order spreads (`cuda::spread_rows_range`, into
/// `into`'s first elements where given — a contiguous buffer at offset zero), else the row
/// gather over those rows' tokens into a fresh tensor; `index_select` on the CPU.
pub(crate) fn gather_forward_rows(
    x: &Tensor,
    order: &RowOrder,
    rows: std::ops::Range<usize>,
    into: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if rows_into(x, order) {
        return cuda::spread_rows_range(x, order, rows, into);
    }
    let _ = into;
    select_rows(x, &order.tokens.narrow(0, rows.start, rows.len())?)
}

/// Whether [`gather_forward_rows`] writes into a buffer it is given (CUDA, token-major).
pub(crate) fn rows_into(x: &Tensor, order: &RowOrder) -> bool {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return ROWS_BY_TOKEN.get() && cuda::spreads(x, order);
    }
    let _ = (x, order);
    false
}

/// x `[N, H]` → the routed rows `[N·k, H]` in `order`.
pub fn gather_rows(x: &Tensor, order: &RowOrder) -> Result<Tensor> {
    let x = super::at_offset_zero(x)?;
    let op = GatherRows(order.clone());
    if super::records_graph(&[&x]) {
        x.apply_op1(op)
    } else {
        super::direct(op.fwd(&x)?)
    }
}

/// Routed rows y `[N·k, H]` weighted by `w [N, k]` and summed per token → `[N, H]` in y's dtype.
pub fn combine_rows(y: &Tensor, w: &Tensor, order: &RowOrder) -> Result<Tensor> {
    let (m, _) = y.dims2()?;
    if w.dims2()? != (m / order.k, order.k) || m != order.inv.dim(0)? {
        candle_core::bail!(
            "combine_rows: {m} rows with weights {:?} for k {}",
            w.dims(),
            order.k
        );
    }
    let (y, w) = (super::at_offset_zero(y)?, super::at_offset_zero(w)?);
    let op = CombineRows(order.clone());
    if super::records_graph(&[&y, &w]) {
        y.apply_op2(&w, op)
    } else {
        super::direct(op.fwd(&y, &w)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda;
