//! The MoE block's part of the written-out layer backward (`arch::backward`, docs/ARCHITECTURE.md
//! decisions 27 and 35): the taped forward of router, routed experts (with expert parallelism's
//! exchange in the middle) and shared expert, and their backward — the routing weights'
//! gradient from the experts' row dots, the router's backward through its scaling,
//! renormalisation, top-k and softmax or sigmoid.

use super::backward::AdapterGrads;
use super::layers::{Moe, Routing};
use super::mlp_tape::{shared_mlp, SharedMlpTape};
use super::model::LoraCtx;
use super::{ArchSpec, ExpertExchange, Scoring};
use crate::ops::grouped_gemm::{add_product, Gemm};
use crate::ops::input_weights::{scale_rows, scale_rows_backward};
use crate::ops::lora_in_k;
use crate::ops::routed_experts::{
    held_experts_by_token, held_experts_taped, ExpertLora, ExpertsTape,
};
use crate::ops::router::logits_grad;
use crate::ops::routing::{
    combine_backward_rows_wide, combine_forward, gather_backward, weights_grad,
};
use candle_core::{DType, Result, Tensor, D};
use std::rc::Rc;

/// The shared expert's MLP and, where it is gated, its output and gate `sigmoid(x·gᵀ)` [N, 1].
struct SharedTape {
    mlp: SharedMlpTape,
    gated: Option<(Tensor, Tensor)>,
}

pub(super) struct MoeTape {
    pub(super) routing: Rc<Routing>,
    /// f32 router probabilities [N, E] and routing weights [N, k].
    probs: Tensor,
    weights: Tensor,
    /// The combine's weights: the routing weights, or ones where they scaled the rows.
    combine: Tensor,
    /// The gathered rows before the weights scaled them (`RouterSpec::weights_input`).
    unscaled: Option<Tensor>,
    experts: ExpertsTape,
    shared: Option<SharedTape>,
}

impl Moe {
    /// The held experts on their grouped rows, keeping their tape; their outputs with `output`.
    pub(super) fn held_taped(
        &self,
        xs: &Tensor,
        counts: &[usize],
        lora: &LoraCtx,
        output: bool,
    ) -> Result<(Option<Tensor>, ExpertsTape)> {
        let adapters = self.taped_adapters(lora)?;
        held_experts_taped(
            xs,
            &self.gate_up,
            &self.down,
            counts,
            Some(&adapters),
            output,
        )
    }

    /// The expert adapters as the taped path reads them (not live: no graph).
    fn taped_adapters(&self, lora: &LoraCtx) -> Result<ExpertLora> {
        self.expert_lora(&LoraCtx {
            adapters: lora.adapters,
            live: false,
            dropout: lora.dropout,
        })
    }

    /// The held experts' recompute tape over x's rows gathered a chunk at a time in the
    /// backward (`ops::routed_experts::held_experts_by_token`); None where it does not apply.
    fn held_by_token(
        &self,
        x: &Tensor,
        routing: &Routing,
        lora: &LoraCtx,
    ) -> Result<Option<ExpertsTape>> {
        let adapters = self.taped_adapters(lora)?;
        held_experts_by_token(
            x,
            &routing.order,
            &self.gate_up,
            &self.down,
            &routing.counts,
            Some(&adapters),
        )
    }

    /// `Moe::forward`'s arithmetic, keeping its tape; without `output` (a recompute) only
    /// what the backward reads — no expert outputs, no combine.
    pub(super) fn taped(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        lora: &LoraCtx,
        exchange: Option<&dyn ExpertExchange>,
        recorded: &mut Option<Rc<Routing>>,
        output: bool,
    ) -> Result<(Option<Tensor>, MoeTape)> {
        let (routing, probs, weights) = self.route(spec, x, exchange, recorded)?;
        let z = crate::ops::at_offset_zero;
        let (x, weights) = (z(x)?, z(&weights)?);
        // The routed rows [N·k, H] by expert — r columns wider where gate_up's adapter goes
        // inside its product's K (`ops::lora_in_k`: one rank, no exchange, unscaled rows).
        // Llama 4: the weights scale the rows (kept for the weights' gradient), the outputs
        // are summed unweighted.
        let in_k = routing.exchange.is_none()
            && !spec.router.weights_input
            && self.gate_up.takes_in_k()
            && lora.adapters.experts.contains_key(&self.gate_up_name);
        let r = in_k.then_some(lora.adapters.settings.r);
        // A recompute on one rank over plain rows, no expert adapters: where the experts'
        // backward goes by chunks of experts, it gathers each chunk's rows itself — none here.
        let adapted = [&self.gate_up_name, &self.down_name]
            .iter()
            .any(|n| lora.adapters.experts.contains_key(*n));
        let by_token =
            match !output && routing.exchange.is_none() && !spec.router.weights_input && !adapted {
                true => self.held_by_token(&x, &routing, lora)?,
                false => None,
            };
        let (y, experts, unscaled, combine) = match by_token {
            Some(tape) => (None, tape, None, weights.clone()),
            None => {
                let xs = lora_in_k::gather_rows(&x, &routing.order, r)?;
                let (rows, unscaled, combine) = match spec.router.weights_input {
                    true => (
                        scale_rows(&xs, &weights, &routing.order)?,
                        Some(xs),
                        weights.ones_like()?,
                    ),
                    false => (xs, None, weights.clone()),
                };
                let (y, experts) = match &routing.exchange {
                    None => self.held_taped(&rows, &routing.counts, lora, output)?,
                    Some(plan) => {
                        let rows = plan.dispatch(&rows)?;
                        let (yr, tape) =
                            self.held_taped(&rows, plan.held_counts(), lora, output)?;
                        (yr.map(|yr| plan.combine(&yr)).transpose()?, tape)
                    }
                };
                (y, experts, unscaled, combine)
            }
        };
        let mut out = y
            .map(|y| combine_forward(&y, &combine, &routing.order))
            .transpose()?;
        let shared = match &self.shared {
            None => None,
            Some((mlp, gate)) => {
                let (mut sh, tape) = shared_mlp(mlp, &x, lora)?;
                let mut gated = None;
                if let Some(g) = gate {
                    let s = sigmoid(&x.matmul(&g.t()?)?)?;
                    let out = sh.broadcast_mul(&s)?;
                    gated = Some((std::mem::replace(&mut sh, out), s));
                }
                out = out.map(|out| out + sh).transpose()?;
                Some(SharedTape { mlp: tape, gated })
            }
        };
        let tape = MoeTape {
            routing,
            probs,
            weights,
            combine,
            unscaled,
            experts,
            shared,
        };
        Ok((out, tape))
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl MoeTape {
    /// d(normed input) [N, H] for upstream `dy` [N, H].
    pub(super) fn backward(
        self,
        moe: &Moe,
        spec: &ArchSpec,
        dy: &Tensor,
        lora: &LoraCtx,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        let dtype = dy.dtype();
        let order = &self.routing.order;
        // r columns wider where down's adapter takes its input gradient inside the product's
        // K (`ops::lora_in_k`; one rank: the exchange's rows arrive plain).
        let r = lora.adapters.settings.r;
        let in_k = self.routing.exchange.is_none()
            && lora.adapters.experts.contains_key(&moe.down_name)
            && lora_in_k::takes(&moe.down, dy, r, dy.dim(1)?);
        let dys = combine_backward_rows_wide(&self.combine, order, dy, dtype, r * in_k as usize)?;
        // The weights' gradient from the experts' row dots, where the weights scaled the
        // outputs (`Held::backward`); Llama 4's comes from the scaled rows below.
        let dots = self.unscaled.is_none();
        let (mut dxs, (gate_up, down), dots) = match &self.routing.exchange {
            None => self.experts.backward(dys, dtype, dots)?,
            Some(plan) => {
                let dyr = plan.dispatch(&dys)?;
                drop(dys);
                let (dxr, factors, dots) = self.experts.backward(dyr, dtype, dots)?;
                let back = |d: Tensor| plan.combine(&d.unsqueeze(1)?)?.flatten_all();
                (plan.combine(&dxr)?, factors, dots.map(back).transpose()?)
            }
        };
        for (name, factors) in [(&moe.gate_up_name, gate_up), (&moe.down_name, down)] {
            if let (Some(l), Some((da, db))) = (lora.adapters.experts.get(name), factors) {
                let (da, db) = l.unoriented(da, db)?;
                grads.push((l.a.as_tensor().id(), da));
                grads.push((l.b.as_tensor().id(), db));
            }
        }
        let dw = match (&self.unscaled, dots) {
            (Some(xs), _) => {
                let dw;
                (dxs, dw) = scale_rows_backward(&dxs, xs, &self.weights, order)?;
                dw
            }
            (None, Some(dots)) => weights_grad(&dots, &self.combine, order)?,
            (None, None) => candle_core::bail!("moe backward: no row dots for the weights"),
        };
        let dx = gather_backward(&dxs, order, dtype)?;
        drop(dxs);
        let dx = router_backward(moe, spec, &self.routing, &self.probs, &dw, dx)?;
        match (self.shared, &moe.shared) {
            (Some(t), Some((mlp, gate))) => {
                let (dsh, dx) = match (t.gated, gate) {
                    (Some((sh, s)), Some(g)) => {
                        // out = sh·s, s = sigmoid(x·gᵀ): ds = Σ dy·sh, dz = ds·s·(1 − s).
                        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                        let ds = (f32(dy)? * f32(&sh)?)?.sum_keepdim(D::Minus1)?;
                        let sf = f32(&s)?;
                        let dz = (ds * (&sf * sf.affine(-1.0, 1.0)?)?)?.to_dtype(dtype)?;
                        let dx = add_product(dx, &dz, g, Gemm::nn(1.0))?;
                        (dy.broadcast_mul(&s)?, dx)
                    }
                    _ => (dy.clone(), dx),
                };
                t.mlp.backward(mlp, &dsh, Some(dx), grads)
            }
            _ => Ok(dx),
        }
    }
}

/// The router's backward: dx += dlogits · W_router, from the routing weights' gradient `dw`
/// [N, k] through the scaling, the (optional) renormalisation, the top-k selection and the f32
/// softmax or sigmoid.
fn router_backward(
    moe: &Moe,
    spec: &ArchSpec,
    routing: &Routing,
    probs: &Tensor,
    dw: &Tensor,
    dx: Tensor,
) -> Result<Tensor> {
    let router = &spec.router;
    let dlogits = logits_grad(
        probs,
        &routing.top,
        dw,
        (
            router.scaling,
            router.renormalize,
            router.scoring == Scoring::Sigmoid,
        ),
        moe.router.dtype(),
    )?;
    add_product(dx, &dlogits, &moe.router, Gemm::nn(1.0))
}
