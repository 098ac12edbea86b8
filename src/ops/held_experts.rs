//! The held experts' own forward and backward on rows grouped by expert (`Held`), shared by
//! the graph node and the taped form of `ops::routed_experts`: gate_up (grouped NF4, plus its
//! adapter), packed SwiGLU, down (plus its adapter), and what the forward keeps for the
//! backward (gate_up's output and the adapters' inputs with their hiddens).

use super::expert_chunks::ChunkRows;
use super::experts::{dequant_chunk_bytes, expert_matmul, ExpertWeights, GroupedLora};
use candle_core::{DType, Result, Tensor};

/// What the held experts' forward leaves for their backward: gate_up's output [M, 2I] and
/// the adapters' inputs with their rank-r hiddens — the gathered rows [M, H] (gate_up) and
/// the activations [M, I] (down), with `x · A_eᵀ` [M, r] of each, where that projection has
/// an adapter.
pub(super) struct Kept {
    gu: Gu,
    xs: Option<(Tensor, Tensor)>,
    act: Option<(Tensor, Tensor)>,
}

/// gate_up's output, or (a recompute without adapters, `expert_chunks::serves`) the rows it
/// is formed from in the backward, a chunk of experts at a time.
enum Gu {
    Formed(Tensor),
    Deferred(ChunkRows),
}

/// The held experts' weights, rows and adapters, for their forward and backward.
pub(super) struct Held<'a> {
    pub(super) gate_up: &'a ExpertWeights,
    pub(super) down: &'a ExpertWeights,
    pub(super) counts: &'a [usize],
    /// The adapters' products over `counts` (one plan for the forward and the backward).
    pub(super) adapter: Option<&'a GroupedLora>,
    pub(super) gate_up_lora: Option<&'a (Tensor, Tensor)>,
    pub(super) down_lora: Option<&'a (Tensor, Tensor)>,
}

/// (gate_up's adapter factors or their gradients (A, B), down's), where present.
pub(crate) type FactorPairs = (Option<(Tensor, Tensor)>, Option<(Tensor, Tensor)>);

impl Kept {
    /// A recompute's tape whose gate_up output the backward forms by chunks from `rows`.
    pub(super) fn deferred(rows: ChunkRows) -> Kept {
        Kept {
            gu: Gu::Deferred(rows),
            xs: None,
            act: None,
        }
    }
}

impl Held<'_> {
    /// Whether a recompute leaves gate_up's output to the backward's chunks of experts
    /// (`expert_chunks::serves`; no expert adapters: theirs need the output whole).
    pub(super) fn defers(&self) -> bool {
        let adapters =
            self.adapter.is_some() && (self.gate_up_lora.is_some() || self.down_lora.is_some());
        !adapters && super::expert_chunks::serves(self.gate_up)
    }

    /// xs [M, H] grouped by held expert → the expert outputs [M, H], or only what the backward
    /// needs (`output` false: a recompute; the down projection is then skipped, see `backward`).
    pub(super) fn forward(&self, xs: &Tensor, output: bool) -> Result<(Option<Tensor>, Kept)> {
        if !output && self.defers() {
            return Ok((None, Kept::deferred(ChunkRows::Gathered(xs.clone()))));
        }
        let inp = self.gate_up.in_features;
        let (gu, xs_h) = match (self.gate_up_lora, self.adapter) {
            // Rows gathered wide: the adapter inside the product's K (`ops::lora_in_k`).
            (Some((a, b)), Some(l)) if xs.dim(1)? == inp + l.r && l.r > 0 => {
                let chunk = dequant_chunk_bytes();
                let (gu, h) = super::lora_in_k::forward(l, xs, self.gate_up, (a, b), chunk)?;
                (gu, Some((xs.narrow(1, 0, inp)?, h)))
            }
            (Some((a, b)), Some(l)) => {
                let gu = grouped(xs, self.gate_up, self.counts, true)?; // [M, 2I]
                let (sum, h) = l.forward_into(gu, xs, a, b)?;
                (sum, Some((xs.clone(), h)))
            }
            _ => (grouped(xs, self.gate_up, self.counts, true)?, None),
        };
        let glu = self.gate_up.glu;
        let down_lora = self.down_lora.zip(self.adapter);
        if !output {
            // Of the down projection only its adapter's input and hidden, for the backward.
            let mut act_h = None;
            if let Some(((a, b), l)) = down_lora {
                let act = super::swiglu::packed_forward(&gu, glu)?; // [M, I]
                let h = l.hidden_of(&act, a, b)?;
                act_h = Some((act, h));
            }
            let kept = Kept {
                gu: Gu::Formed(gu),
                xs: xs_h,
                act: act_h,
            };
            return Ok((None, kept));
        }
        let i = self.down.in_features;
        let (y, act_h) = match down_lora {
            // The activations written wide: the adapter inside down's K (`ops::lora_in_k`).
            Some(((a, b), l)) if super::lora_in_k::takes(self.down, &gu, l.r, i) => {
                let aw = super::swiglu::packed_forward_wide(&gu, glu, l.r)?; // [M, I + r]
                let chunk = dequant_chunk_bytes();
                let (y, h) = super::lora_in_k::forward(l, &aw, self.down, (a, b), chunk)?;
                (y, Some((aw.narrow(1, 0, i)?, h)))
            }
            Some(((a, b), l)) => {
                let act = super::swiglu::packed_forward(&gu, glu)?; // [M, I]
                let y = grouped(&act, self.down, self.counts, true)?; // [M, H]
                let (sum, h) = l.forward_into(y, &act, a, b)?;
                (sum, Some((act, h)))
            }
            None => {
                let act = super::swiglu::packed_forward(&gu, glu)?;
                (grouped(&act, self.down, self.counts, true)?, None)
            }
        };
        let kept = Kept {
            gu: Gu::Formed(gu),
            xs: xs_h,
            act: act_h,
        };
        Ok((Some(y), kept))
    }

    /// dy [M, H] → (dxs [M, H] in `dtype`, the adapters' gradients, and with `dots` each
    /// row's ⟨dy, y⟩ [M] (f32) without y: y = act·W_dᵀ + s·(act·Aᵀ)·Bᵀ + bias is affine in act,
    /// so ⟨dy, y⟩ = ⟨dL/d(act), act⟩ + ⟨dy, bias⟩. For rows whose output a routing weight w
    /// scaled (dy = w·dL/d(output)) that is w times the weight's gradient.
    pub(super) fn backward(
        &self,
        kept: Kept,
        dy: Tensor,
        dtype: DType,
        dots: bool,
    ) -> Result<(Tensor, FactorPairs, Option<Tensor>)> {
        let Kept { gu, xs, act } = kept;
        // y = act·W_dᵀ (+ the adapter's update) + the expert's bias: the bias's part of ⟨dy, y⟩.
        let bias_dots = match dots {
            true => {
                let plain = dy.narrow(1, 0, self.down.out_features)?;
                self.down.bias_dots(&plain, self.counts)?
            }
            false => None,
        };
        let gu = match gu {
            Gu::Formed(gu) => gu,
            Gu::Deferred(rows) => {
                let (dxs, dot) = super::expert_chunks::backward_by_chunk(
                    self.gate_up,
                    self.down,
                    self.counts,
                    &rows,
                    dy,
                    dtype,
                    dots,
                    dequant_chunk_bytes(),
                )?;
                let dot = match (dot, bias_dots) {
                    (Some(d), Some(b)) => Some((d + b)?),
                    (dot, _) => dot,
                };
                return Ok((dxs, (None, None), dot));
            }
        };
        let chunk = dequant_chunk_bytes();
        let (h_out, two_i) = (self.down.out_features, self.gate_up.out_features);
        let mut down = None;
        let dact = match (self.down_lora, &act, self.adapter) {
            // dy's rows r wider (as the layer's combine backward writes them): the adapter's
            // input gradient inside down's K (`ops::lora_in_k`).
            (Some((a, b)), Some((act, h)), Some(l))
                if super::lora_in_k::takes(self.down, &dy, l.r, h_out) =>
            {
                let dyw = super::lora_in_k::widen(dy, h_out, l.r)?;
                let (dact, da, db) =
                    super::lora_in_k::backward(l, &dyw, self.down, (a, b), (act, h), chunk)?;
                down = Some((da, db));
                dact.to_dtype(dtype)?
            }
            (Some((a, b)), Some((act, h)), Some(l)) => {
                let base = grouped(&dy, self.down, self.counts, false)?.to_dtype(dtype)?;
                let (sum, da, db) = l.backward_into(act, a, b, &dy, Some(h), Some(base))?;
                drop(dy);
                down = Some((da, db));
                sum
            }
            _ => {
                let dact = grouped(&dy, self.down, self.counts, false)?.to_dtype(dtype)?;
                drop(dy);
                dact
            }
        };
        drop(act);
        let glu = self.gate_up.glu;
        // dgu's rows r wider where gate_up's adapter goes inside its input gradient's K.
        let gate_up_lora = self.gate_up_lora.zip(xs.as_ref()).zip(self.adapter);
        let extra = match gate_up_lora {
            Some((_, l)) if super::lora_in_k::takes(self.gate_up, &gu, l.r, two_i) => l.r,
            _ => 0,
        };
        let (dgu, dot) = super::swiglu::packed_backward_wide(&gu, &dact, glu, extra, dots)?;
        let dot = match (dot, bias_dots) {
            (Some(d), Some(b)) => Some((d + b)?),
            (dot, _) => dot,
        };
        drop((gu, dact));
        let (dxs, gate_up) = match gate_up_lora {
            Some((((a, b), (xs, h)), l)) if extra > 0 => {
                let (dxs, da, db) =
                    super::lora_in_k::backward(l, &dgu, self.gate_up, (a, b), (xs, h), chunk)?;
                (dxs.to_dtype(dtype)?, Some((da, db)))
            }
            Some((((a, b), (xs, h)), l)) => {
                let base = grouped(&dgu, self.gate_up, self.counts, false)?.to_dtype(dtype)?;
                let (sum, da, db) = l.backward_into(xs, a, b, &dgu, Some(h), Some(base))?;
                (sum, Some((da, db)))
            }
            None => {
                let dxs = grouped(&dgu, self.gate_up, self.counts, false)?.to_dtype(dtype)?;
                (dxs, None)
            }
        };
        Ok((dxs, (gate_up, down), dot))
    }
}

/// `x · Wᵀ` (`forward`) or `x · W` over grouped rows, dequantizing a chunk of experts at a time.
fn grouped(x: &Tensor, w: &ExpertWeights, counts: &[usize], forward: bool) -> Result<Tensor> {
    expert_matmul(&x.contiguous()?, w, counts, forward, dequant_chunk_bytes())
}
