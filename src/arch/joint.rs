//! Projections that read one input — an attention's q, k and v, an MLP's gate and up — with
//! their adapters' factor products joined where `ops::lora_joint` serves them
//! (`MOEQ_JOINT_LORA`; docs/ARCHITECTURE.md decision 38), apart otherwise: the one place the
//! plain forward (`layers`) and the taped forward (`arch::backward`, `mlp_tape`) decide it, so
//! a layer's recompute computes what its forward did.

use super::attn::Attn;
use super::backward::{proj, AdapterGrads, ProjTape};
use super::layers::{Attention, Proj};
use super::model::LoraCtx;
use super::side::Side;
use super::ArchSpec;
use crate::lora::LinearLora;
use crate::ops::lora_joint::{self, in_k_fits, JointTape, Member, JOINT_LORA};
use crate::ops::norm::rms_norm_wide;
use candle_core::{Result, Tensor, TensorId};

/// The adapters of projections `ps` of x where their products go joined: the switch on, at
/// least two projections, all adapted, no dropout (each projection draws its own mask), the
/// factors read without a graph.
fn joined<'a>(ps: &[&Proj], x: &Tensor, lora: &LoraCtx<'a>) -> Option<Vec<&'a LinearLora>> {
    let dropout = lora.dropout.is_some() && lora.adapters.settings.dropout > 0.0;
    let graph = lora.live || crate::ops::records_graph(&[x]);
    if !JOINT_LORA.get() || dropout || graph || ps.len() < 2 {
        return None;
    }
    ps.iter()
        .map(|p| lora.adapters.linear.get(&p.name))
        .collect()
}

/// q, k and v's adapters where theirs go joined: [`joined`], and an attention the taped layer
/// writes out (one with an output gate runs under candle's graph there, apart).
fn joined_qkv<'a>(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx<'a>,
) -> Option<Vec<&'a LinearLora>> {
    match spec.attn_output_gate {
        true => None,
        false => joined(&[&a.q, &a.k, &a.v], x, lora),
    }
}

/// The ranks of q, k and v's adapters together, where their updates go inside the base
/// products' K over wide rows of x (`lora_joint::forward_wide`).
fn in_k_ranks(a: &Attention, ls: &[&LinearLora], x: &Tensor) -> Result<Option<usize>> {
    let members = [&a.q, &a.k, &a.v]
        .into_iter()
        .zip(ls)
        .map(|(p, l)| Ok((&p.w, p.bias.is_some(), l.a.as_tensor().dim(0)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(in_k_fits(x, &members))
}

/// What the attention side hands the attention of a layer: the side's input, in rows wide
/// enough for q, k and v's hiddens where their updates go inside the base products' K (a
/// pre-norm side: `norm::rms_norm_wide` writes the norm in place). The joined products tell
/// the wide rows by their width.
pub(super) fn attention_input(
    side: &Side,
    attn: &Attn,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<Tensor> {
    if let (Attn::Heads(a), false) = (attn, side.post) {
        if let Some(ls) = joined_qkv(a, spec, x, lora) {
            if let Some(ranks) = in_k_ranks(a, &ls, x)? {
                return rms_norm_wide(x, side.norm, side.eps, ranks);
            }
        }
    }
    side.input(x)
}

/// The joined products' outputs and tape; x `[N, in]`, or wide rows `[N, in + Σr]`.
fn joint(
    ps: &[&Proj],
    ls: &[&LinearLora],
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<(Vec<Tensor>, JointTape)> {
    let members = ps
        .iter()
        .zip(ls)
        .map(|(p, l)| {
            Ok(Member {
                w: &p.w,
                bias: p.bias.as_ref(),
                a: l.a.as_tensor().detach().to_dtype(x.dtype())?,
                b: l.b.as_tensor().detach().to_dtype(x.dtype())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let scaling = lora.adapters.settings.scaling();
    match x.dim(1)? == ps[0].w.in_features() {
        true => lora_joint::forward(x, &members, scaling),
        false => lora_joint::forward_wide(x, &members, scaling),
    }
}

/// Each of `ps` of x, as `Proj::forward` gives it.
fn products(
    ps: &[&Proj],
    ls: Option<Vec<&LinearLora>>,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<Vec<Tensor>> {
    match ls {
        Some(ls) => Ok(joint(ps, &ls, x, lora)?.0),
        None => ps.iter().map(|p| p.forward(x, lora)).collect(),
    }
}

/// What the backward of projections of one input needs.
pub(super) enum Tapes {
    Apart(Vec<ProjTape>),
    Joint {
        x: Tensor,
        tape: JointTape,
        /// Each adapter's (A, B) `Var` ids.
        ids: Vec<(TensorId, TensorId)>,
    },
}

/// [`products`] keeping the tapes.
fn products_taped(
    ps: &[&Proj],
    ls: Option<Vec<&LinearLora>>,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<(Vec<Tensor>, Tapes)> {
    if let Some(ls) = ls {
        let (ys, tape) = joint(ps, &ls, x, lora)?;
        let ids = ls
            .iter()
            .map(|l| (l.a.as_tensor().id(), l.b.as_tensor().id()))
            .collect();
        let x = x.clone();
        return Ok((ys, Tapes::Joint { x, tape, ids }));
    }
    let (mut ys, mut tapes) = (Vec::new(), Vec::new());
    for p in ps {
        let (y, t) = proj(p, x, lora)?;
        ys.push(y);
        tapes.push(t);
    }
    Ok((ys, Tapes::Apart(tapes)))
}

impl Tapes {
    /// d(input) for the gradients `dys` of the outputs of `ps` (in order), added into
    /// `dx_into` where given.
    pub(super) fn backward(
        self,
        ps: &[&Proj],
        dys: &[Tensor],
        dx_into: Option<Tensor>,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        match self {
            Tapes::Apart(tapes) => {
                let mut dx = dx_into;
                for ((t, p), dy) in tapes.into_iter().zip(ps).zip(dys) {
                    dx = Some(t.backward(p, dy, dx, grads)?);
                }
                dx.ok_or_else(|| candle_core::Error::Msg("no projections".into()))
            }
            Tapes::Joint { x, tape, ids } => {
                let ws: Vec<_> = ps.iter().map(|p| &p.w).collect();
                let (dx, factors) = lora_joint::backward(&x, &ws, tape, dys, dx_into)?;
                for ((ia, ib), (da, db)) in ids.into_iter().zip(factors) {
                    grads.push((ia, da));
                    grads.push((ib, db));
                }
                Ok(dx)
            }
        }
    }
}

/// q, k and v of x `[N, H]` (or of the wide rows of [`attention_input`]).
pub(super) fn qkv(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<[Tensor; 3]> {
    let ls = joined_qkv(a, spec, x, lora);
    three(products(&[&a.q, &a.k, &a.v], ls, x, lora)?)
}

/// [`qkv`] keeping the tapes.
pub(super) fn qkv_taped(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<([Tensor; 3], Tapes)> {
    let ls = joined_qkv(a, spec, x, lora);
    let (ys, tapes) = products_taped(&[&a.q, &a.k, &a.v], ls, x, lora)?;
    Ok((three(ys)?, tapes))
}

/// An MLP's gate and up of x.
pub(super) fn gate_up(p: &[Proj; 3], x: &Tensor, lora: &LoraCtx) -> Result<[Tensor; 2]> {
    let ps = [&p[0], &p[1]];
    let [g, u]: [Tensor; 2] = products(&ps, joined(&ps, x, lora), x, lora)?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("gate/up: not two outputs".into()))?;
    Ok([g, u])
}

/// [`gate_up`] keeping the tapes.
pub(super) fn gate_up_taped(
    p: &[Proj; 3],
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<([Tensor; 2], Tapes)> {
    let ps = [&p[0], &p[1]];
    let (ys, tapes) = products_taped(&ps, joined(&ps, x, lora), x, lora)?;
    let [g, u]: [Tensor; 2] = ys
        .try_into()
        .map_err(|_| candle_core::Error::Msg("gate/up: not two outputs".into()))?;
    Ok(([g, u], tapes))
}

fn three(ys: Vec<Tensor>) -> Result<[Tensor; 3]> {
    ys.try_into()
        .map_err(|_| candle_core::Error::Msg("q/k/v: not three outputs".into()))
}
