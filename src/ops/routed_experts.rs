//! The routed experts of one MoE layer: gather the rows by expert, gate_up (grouped NF4, plus
//! its expert adapter), packed SwiGLU, down (grouped NF4, plus its adapter), weighted combine —
//! x `[N, H]` and the routing weights `[N, k]` (f32) → `[N, H]`.
//! Training runs the held experts' part taped ([`held_experts_taped`], called by the layer's
//! hand-written backward, `arch::backward`, with the gather and combine around it and, with
//! expert parallelism, the exchange in between). The same functions also form one graph node
//! ([`routed_experts`]) for candle's autograd, the reference the hand-written backward is
//! tested against; there the expert adapters enter as one flat tensor (their A and B factors
//! concatenated), since a node has at most three inputs. Either way the backward reuses the
//! forward's intermediates (gate_up's output and the adapters' inputs). The graph node's
//! backward takes the routing weights' gradient from the expert outputs it kept; the taped
//! one from the experts' own backward (row dots of the activations' gradient, `Held::backward`),
//! so the layer recompute skips the down projection and the combine
//! (docs/ARCHITECTURE.md, decision 35).

use super::expert_chunks::ChunkRows;
use super::experts::{ExpertWeights, GroupedLora};
pub(crate) use super::held_experts::FactorPairs;
use super::held_experts::{Held, Kept};
use super::routing::RowOrder;
use candle_core::{CustomOp2, CustomOp3, DType, Result, Shape, Tensor};
use std::sync::Mutex;

/// LoRA on the expert projections: for each, A `[r·E, in]` and B `[out, r·E]` (PEFT's 3-D
/// parameter layout), rank `r`, update scaled by `scaling`.
pub struct ExpertLora {
    pub gate_up: Option<(Tensor, Tensor)>,
    pub down: Option<(Tensor, Tensor)>,
    pub r: usize,
    pub scaling: f64,
}

impl ExpertLora {
    /// The factors present, in packing order (gate_up A, B, down A, B).
    fn factors(&self) -> Vec<&Tensor> {
        [&self.gate_up, &self.down]
            .into_iter()
            .flatten()
            .flat_map(|(a, b)| [a, b])
            .collect()
    }
}

/// Where each factor sits in the flat adapter tensor.
struct Packing {
    gate_up: bool,
    down: bool,
    shapes: Vec<Shape>,
}

impl Packing {
    /// (gate_up (A, B), down (A, B)) cut out of `flat`.
    #[allow(clippy::type_complexity)]
    fn unpack(
        &self,
        flat: &Tensor,
    ) -> Result<(Option<(Tensor, Tensor)>, Option<(Tensor, Tensor)>)> {
        let mut at = 0;
        let mut parts = Vec::with_capacity(self.shapes.len());
        for shape in &self.shapes {
            let n = shape.elem_count();
            parts.push(flat.narrow(0, at, n)?.reshape(shape)?);
            at += n;
        }
        let mut parts = parts.into_iter();
        let mut pair = |on: bool| -> Option<(Tensor, Tensor)> {
            if on {
                Some((parts.next()?, parts.next()?))
            } else {
                None
            }
        };
        let gate_up = pair(self.gate_up);
        Ok((gate_up, pair(self.down)))
    }
}

/// What the forward leaves for the backward: the expert outputs [M, H] (the combine's weight
/// gradient reads them) and what the held experts keep.
struct Saved {
    y: Tensor,
    kept: Kept,
}

/// How the routing weights `[N, k]` (f32) enter: on the expert outputs (their weighted sum),
/// or on the expert inputs, the outputs then summed unweighted (Llama 4).
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Output(&'a Tensor),
    Input(&'a Tensor),
}

struct RoutedExperts {
    order: RowOrder,
    /// The weights scale the gathered rows (`Weights::Input`).
    weights_input: bool,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    counts: Vec<usize>,
    lora: Option<Packing>,
    adapter: Option<GroupedLora>,
    /// Whether the forward keeps its intermediates for the backward.
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

impl RoutedExperts {
    /// The combine's weights: the routing weights, or ones where they scaled the inputs.
    fn combine_weights(&self, w: &Tensor) -> Result<Tensor> {
        match self.weights_input {
            true => w.ones_like(),
            false => Ok(w.clone()),
        }
    }

    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        self.forward_with(x, w, None, None)
    }

    fn forward_lora(&self, x: &Tensor, w: &Tensor, flat: &Tensor) -> Result<Tensor> {
        let packing = self.lora.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("routed_experts: adapters without their packing".into())
        })?;
        let (gate_up, down) = packing.unpack(flat)?;
        self.forward_with(x, w, gate_up.as_ref(), down.as_ref())
    }

    fn held<'a>(
        &'a self,
        gate_up_lora: Option<&'a (Tensor, Tensor)>,
        down_lora: Option<&'a (Tensor, Tensor)>,
    ) -> Held<'a> {
        Held {
            gate_up: &self.gate_up,
            down: &self.down,
            counts: &self.counts,
            adapter: self.adapter.as_ref(),
            gate_up_lora,
            down_lora,
        }
    }

    fn forward_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        gate_up_lora: Option<&(Tensor, Tensor)>,
        down_lora: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        // [M, H], or wider for gate_up's adapter inside its product's K (as `arch::moe_tape`).
        let in_k = match (self.weights_input, gate_up_lora, &self.adapter) {
            (false, Some(_), Some(l)) if self.gate_up.takes_in_k() => Some(l.r),
            _ => None,
        };
        let mut xs = super::lora_in_k::gather_rows(x, &self.order, in_k)?;
        if self.weights_input {
            xs = super::input_weights::scale_rows(&xs, w, &self.order)?;
        }
        let (y, kept) = self.held(gate_up_lora, down_lora).forward(&xs, true)?;
        drop(xs);
        let Some(y) = y else {
            candle_core::bail!("routed_experts: the forward gave no output")
        };
        let out = super::routing::combine_forward(&y, &self.combine_weights(w)?, &self.order)?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { y, kept });
        }
        Ok(out)
    }

    /// (dx, dw, gradient of the flat adapters) for upstream `grad` [N, H].
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        flat: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: routed experts", x.device());
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(Saved { y, kept }) = saved else {
            candle_core::bail!("routed_experts: backward without its forward's outputs")
        };
        let (gate_up_lora, down_lora) = match (&self.lora, flat) {
            (Some(p), Some(flat)) => p.unpack(flat)?,
            _ => (None, None),
        };
        let weights = self.combine_weights(w)?;
        let (dy, mut dw) = super::routing::combine_backward(&y, &weights, &self.order, grad)?;
        drop(y);
        let held = self.held(gate_up_lora.as_ref(), down_lora.as_ref());
        let (mut dxs, (gate_up, down), _) = held.backward(kept, dy, x.dtype(), false)?;
        if self.weights_input {
            let xs = super::routing::gather_forward(x, &self.order)?;
            (dxs, dw) = super::input_weights::scale_rows_backward(&dxs, &xs, w, &self.order)?;
        }
        let dx = super::routing::gather_backward(&dxs, &self.order, x.dtype())?;
        let dflat = match flat {
            Some(f) => {
                // Packing order: gate_up's factors first.
                let parts = [gate_up, down]
                    .into_iter()
                    .flatten()
                    .flat_map(|(da, db)| [da, db])
                    .map(|t| t.to_dtype(f.dtype())?.flatten_all())
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&parts, 0)?)
            }
            None => None,
        };
        Ok((dx, dw, dflat))
    }
}

/// The held experts of one MoE layer on their grouped rows, for a hand-written backward
/// (`arch::backward`; with expert parallelism the rows arrive from the exchange): what the
/// forward keeps and the backward.
pub(crate) struct ExpertsTape {
    gate_up: ExpertWeights,
    down: ExpertWeights,
    counts: Vec<usize>,
    adapter: Option<GroupedLora>,
    /// gate_up's and down's adapter factors (A, B), where present.
    factors: FactorPairs,
    /// None when no rows came (nothing to differentiate).
    kept: Option<Kept>,
}

/// xs `[M, H]` grouped by held expert (`counts[e]` rows each) → the expert outputs `[M, H]`
/// (None without `output`: a recompute, which skips the down projection), no graph, and what
/// [`ExpertsTape::backward`] needs.
pub(crate) fn held_experts_taped(
    xs: &Tensor,
    gate_up: &ExpertWeights,
    down: &ExpertWeights,
    counts: &[usize],
    lora: Option<&ExpertLora>,
    output: bool,
) -> Result<(Option<Tensor>, ExpertsTape)> {
    let m: usize = counts.iter().sum();
    if xs.dim(0)? != m || counts.len() != gate_up.num_experts {
        candle_core::bail!(
            "held experts: {:?} rows for counts summing to {m} over {} experts",
            xs.dims(),
            counts.len()
        );
    }
    let mut tape = ExpertsTape::new(gate_up, down, counts, lora);
    if m == 0 {
        let y = output
            .then(|| xs.narrow(1, 0, gate_up.in_features))
            .transpose()?;
        return Ok((y, tape));
    }
    let (y, kept) = tape.held().forward(&super::at_offset_zero(xs)?, output)?;
    tape.kept = Some(kept);
    Ok((y, tape))
}

/// [`held_experts_taped`]'s recompute (no output) without the gathered rows, where the held
/// experts' backward forms gate_up's output a chunk of experts at a time (`Held::defers`):
/// the tape keeps the layer's input x `[N, H]` and the routing order, and each chunk gathers
/// its rows when it runs (`expert_chunks::ChunkRows::ByToken`). None where the backward needs
/// the rows whole — the caller gathers them and calls `held_experts_taped`.
pub(crate) fn held_experts_by_token(
    x: &Tensor,
    order: &RowOrder,
    gate_up: &ExpertWeights,
    down: &ExpertWeights,
    counts: &[usize],
    lora: Option<&ExpertLora>,
) -> Result<Option<ExpertsTape>> {
    let mut tape = ExpertsTape::new(gate_up, down, counts, lora);
    let m: usize = counts.iter().sum();
    if !tape.held().defers() {
        return Ok(None);
    }
    let routed = order.tokens.elem_count();
    if routed != m || x.dim(0)? * order.k != m || counts.len() != gate_up.num_experts {
        candle_core::bail!(
            "held experts: {routed} routed rows of {} tokens × {} for counts summing to {m} over {} experts",
            x.dim(0)?,
            order.k,
            counts.len()
        );
    }
    if m > 0 {
        let rows = ChunkRows::ByToken {
            x: super::at_offset_zero(x)?,
            order: order.clone(),
        };
        tape.kept = Some(Kept::deferred(rows));
    }
    Ok(Some(tape))
}

impl ExpertsTape {
    /// Nothing kept yet; the adapters where `lora` has any on these experts.
    fn new(
        gate_up: &ExpertWeights,
        down: &ExpertWeights,
        counts: &[usize],
        lora: Option<&ExpertLora>,
    ) -> ExpertsTape {
        let lora = lora.filter(|l| l.gate_up.is_some() || l.down.is_some());
        ExpertsTape {
            gate_up: gate_up.clone(),
            down: down.clone(),
            counts: counts.to_vec(),
            adapter: lora.map(|l| GroupedLora::new(counts, 0, l.r, l.scaling)),
            factors: match lora {
                Some(l) => (l.gate_up.clone(), l.down.clone()),
                None => (None, None),
            },
            kept: None,
        }
    }

    fn held(&self) -> Held<'_> {
        Held {
            gate_up: &self.gate_up,
            down: &self.down,
            counts: &self.counts,
            adapter: self.adapter.as_ref(),
            gate_up_lora: self.factors.0.as_ref(),
            down_lora: self.factors.1.as_ref(),
        }
    }

    /// dy `[M, H]` → (dxs `[M, H]` in `dtype`, the adapters' gradients in their dtype and,
    /// with `dots`, each row's ⟨dy, y⟩ `[M]` (f32) without y: see `Held::backward`).
    pub(crate) fn backward(
        mut self,
        dy: Tensor,
        dtype: DType,
        dots: bool,
    ) -> Result<(Tensor, FactorPairs, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: routed experts", dy.device());
        match self.kept.take() {
            None => {
                let none = match dots {
                    true => Some(Tensor::zeros(0, DType::F32, dy.device())?),
                    false => None,
                };
                // Rows r wider for an adapter inside K come back as dxs's H columns.
                let h = self.gate_up.in_features;
                Ok((dy.narrow(1, 0, h)?.to_dtype(dtype)?, (None, None), none))
            }
            Some(kept) => self.held().backward(kept, dy.contiguous()?, dtype, dots),
        }
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
        let (dx, dw, _) = self.backward(x, w, None, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RoutedExperts {
    fn name(&self) -> &'static str {
        "routed_experts_lora"
    }

    super::tensor_forward!(3, "routed_experts_lora", forward_lora);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, dflat) = self.backward(x, w, Some(flat), grad)?;
        Ok((Some(dx), Some(dw), dflat))
    }
}

/// The held experts on the routed rows of x `[N, H]` (`order`, `counts[e]` rows per held
/// expert), weighted by the routing weights `[N, k]` (f32; on the outputs or the inputs) and
/// summed per token → `[N, H]`, with the expert adapters `lora` if any; gradients for x, the
/// weights and the adapters.
pub fn routed_experts(
    x: &Tensor,
    weights: Weights,
    order: &RowOrder,
    gate_up: &ExpertWeights,
    down: &ExpertWeights,
    counts: &[usize],
    lora: Option<&ExpertLora>,
) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    let (w, weights_input) = match weights {
        Weights::Output(w) => (w, false),
        Weights::Input(w) => (w, true),
    };
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
    let lora = lora.filter(|l| l.gate_up.is_some() || l.down.is_some());
    if let Some(l) = lora {
        let e = counts.len();
        for ((a, b), (inp, out)) in [
            (&l.gate_up, (h, gate_up.out_features)),
            (&l.down, (down.in_features, h)),
        ]
        .into_iter()
        .filter_map(|(p, dims)| p.as_ref().map(|p| (p, dims)))
        {
            if a.dims2()? != (l.r * e, inp) || b.dims2()? != (out, l.r * e) {
                candle_core::bail!(
                    "routed_experts: adapter A {:?}, B {:?} for {e} experts of {inp} → {out}, r {}",
                    a.dims(),
                    b.dims(),
                    l.r
                );
            }
        }
    }
    let z = super::at_offset_zero;
    let (x, w) = (z(x)?, z(w)?);
    let factors: Vec<Tensor> = match lora {
        Some(l) => l.factors().into_iter().map(z).collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let mut inputs: Vec<&Tensor> = vec![&x, &w];
    inputs.extend(factors.iter());
    let keep = super::records_graph(&inputs);
    let op = RoutedExperts {
        order: order.clone(),
        weights_input,
        gate_up: gate_up.clone(),
        down: down.clone(),
        counts: counts.to_vec(),
        adapter: lora.map(|l| GroupedLora::new(counts, 0, l.r, l.scaling)),
        lora: lora.map(|l| Packing {
            gate_up: l.gate_up.is_some(),
            down: l.down.is_some(),
            shapes: factors.iter().map(|t| t.shape().clone()).collect(),
        }),
        keep,
        saved: Mutex::new(None),
    };
    match (lora, keep) {
        (None, true) => x.apply_op2(&w, op),
        (None, false) => super::direct(op.forward(&x, &w)?),
        (Some(_), true) => {
            // One graph input for all factors (a node takes three).
            let flat = factors
                .iter()
                .map(|t| t.flatten_all())
                .collect::<Result<Vec<_>>>()?;
            x.apply_op3(&w, &Tensor::cat(&flat, 0)?, op)
        }
        (Some(l), false) => {
            super::direct(op.forward_with(&x, &w, l.gate_up.as_ref(), l.down.as_ref())?)
        }
    }
}
