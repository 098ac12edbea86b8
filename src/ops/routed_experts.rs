//! The routed experts of one MoE layer as one op: gather the rows by expert, gate_up (grouped
//! NF4), packed SwiGLU, down (grouped NF4), weighted combine — x `[N, H]` and the routing
//! weights `[N, k]` (f32) → `[N, H]`. The arithmetic is that of the five ops in sequence (their
//! own forward and backward functions run here, in the same order), in one graph node: candle's
//! backward gives each node's input gradient a zero-filled buffer plus an add, and its custom-op
//! path copies each op's input and output — for the four `[N·k, ·]` tensors between the five
//! ops both go. Expert adapters and expert parallelism keep the separate ops.
//! The backward reuses gate_up's output and the expert outputs of the forward that recorded the
//! node (in training, the recompute right before it).

use super::experts::{dequant_chunk_bytes, expert_matmul, ExpertWeights};
use super::routing::RowOrder;
use candle_core::{CustomOp2, Result, Tensor};
use std::sync::Mutex;

struct RoutedExperts {
    order: RowOrder,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    counts: Vec<usize>,
    /// Whether the forward keeps (gate_up output, expert outputs) for the backward.
    keep: bool,
    saved: Mutex<Option<(Tensor, Tensor)>>,
}

/// `x · Wᵀ` (`forward`) or `x · W` over grouped rows, dequantizing chunks sized by the input.
fn grouped(x: &Tensor, w: &ExpertWeights, counts: &[usize], forward: bool) -> Result<Tensor> {
    let chunk = dequant_chunk_bytes(x.elem_count() * x.dtype().size_in_bytes());
    expert_matmul(&x.contiguous()?, w, counts, forward, chunk)
}

impl RoutedExperts {
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let xs = super::routing::gather_forward(x, &self.order)?; // [M, H]
        let gu = grouped(&xs, &self.gate_up, &self.counts, true)?; // [M, 2I]
        drop(xs);
        let act = super::swiglu::packed_forward(&gu)?; // [M, I]
        let y = grouped(&act, &self.down, &self.counts, true)?; // [M, H]
        drop(act);
        let out = super::routing::combine_forward(&y, w, &self.order)?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((gu, y));
        }
        Ok(out)
    }
}

impl CustomOp2 for RoutedExperts {
    fn name(&self) -> &'static str {
        "routed_experts"
    }

    super::tensor_forward!(2, "routed_experts", forward);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: routed experts", x.device());
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (gu, y) = match saved {
            Some(s) => s,
            None => candle_core::bail!("routed_experts: backward without its forward's outputs"),
        };
        let (dy, dw) = super::routing::combine_backward(&y, w, &self.order, grad)?;
        drop(y);
        let dact = grouped(&dy, &self.down, &self.counts, false)?.to_dtype(x.dtype())?;
        drop(dy);
        let dgu = super::swiglu::packed_backward(&gu, &dact)?;
        drop((gu, dact));
        let dxs = grouped(&dgu, &self.gate_up, &self.counts, false)?.to_dtype(x.dtype())?;
        drop(dgu);
        let dx = super::routing::gather_backward(&dxs, &self.order, x.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The held experts on the routed rows of x `[N, H]` (`order`, `counts[e]` rows per held
/// expert), weighted by `w [N, k]` (f32) and summed per token → `[N, H]`; gradients for x and w.
pub fn routed_experts(
    x: &Tensor,
    w: &Tensor,
    order: &RowOrder,
    gate_up: &ExpertWeights,
    down: &ExpertWeights,
    counts: &[usize],
) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    let m: usize = counts.iter().sum();
    if w.dims2()? != (n, order.k)
        || m != n * order.k
        || counts.len() != gate_up.num_experts
        || counts.len() != down.num_experts
        || gate_up.in_features != h
        || down.out_features != h
        || gate_up.out_features != 2 * down.in_features
    {
        candle_core::bail!(
            "routed_experts: x {:?}, weights {:?}, {m} rows over {} experts for k {}",
            x.dims(),
            w.dims(),
            counts.len(),
            order.k
        );
    }
    let z = super::at_offset_zero;
    let (x, w) = (z(x)?, z(w)?);
    let keep = super::records_graph(&[&x, &w]);
    let op = RoutedExperts {
        order: order.clone(),
        gate_up: gate_up.clone(),
        down: down.clone(),
        counts: counts.to_vec(),
        keep,
        saved: Mutex::new(None),
    };
    if keep {
        x.apply_op2(&w, op)
    } else {
        super::direct(op.forward(&x, &w)?)
    }
}
