//! q, k and v of an attention's input, their adapters' factor products joined where
//! `ops::lora_joint` serves them (`MOEQ_JOINT_LORA`; docs/ARCHITECTURE.md decision 38), apart
//! otherwise — the one place the plain forward (`Attention::qkv`) and the taped forward
//! (`arch::backward`) decide it, so a layer's recompute computes what its forward did.

use super::attn::Attn;
use super::backward::{proj, AdapterGrads, ProjTape};
use super::layers::Attention;
use super::model::LoraCtx;
use super::side::Side;
use super::ArchSpec;
use crate::lora::LinearLora;
use crate::ops::lora_joint::{self, in_k_fits, JointTape, Member, JOINT_LORA};
use crate::ops::norm::rms_norm_wide;
use candle_core::{Result, Tensor, TensorId};

/// The adapters of q, k and v where their products go joined: the switch on, all three
/// adapted, no dropout (each projection draws its own mask), the factors read without a graph,
/// and an attention the taped layer writes out (one with an output gate runs under candle's
/// graph there, apart).
fn joined<'a>(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx<'a>,
) -> Option<[&'a LinearLora; 3]> {
    let dropout = lora.dropout.is_some() && lora.adapters.settings.dropout > 0.0;
    let graph = lora.live || crate::ops::records_graph(&[x]);
    if !JOINT_LORA.get() || dropout || graph || spec.attn_output_gate {
        return None;
    }
    let get = |name: &str| lora.adapters.linear.get(name);
    Some([get(&a.q.name)?, get(&a.k.name)?, get(&a.v.name)?])
}

/// The ranks of q, k and v's adapters together, where their updates go inside the base
/// products' K over wide rows of x (`lora_joint::forward_wide`).
fn in_k_ranks(a: &Attention, ls: &[&LinearLora; 3], x: &Tensor) -> Result<Option<usize>> {
    let ranks = ls
        .iter()
        .map(|l| l.a.as_tensor().dim(0))
        .sum::<Result<usize>>()?;
    let biased = [&a.q, &a.k, &a.v].iter().any(|p| p.bias.is_some());
    Ok(in_k_fits(x, ranks, a.q.w.in_features(), biased).then_some(ranks))
}

/// What the attention side hands the attention of a layer: the side's input, in rows wide
/// enough for q, k and v's hiddens where their updates go inside the base products' K (a
/// pre-norm side: `norm::rms_norm_wide` writes the norm in place). [`qkv`] and [`qkv_taped`]
/// tell the wide rows by their width.
pub(super) fn attention_input(
    side: &Side,
    attn: &Attn,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<Tensor> {
    if let (Attn::Heads(a), false) = (attn, side.post) {
        if let Some(ls) = joined(a, spec, x, lora) {
            if let Some(ranks) = in_k_ranks(a, &ls, x)? {
                return rms_norm_wide(x, side.norm, side.eps, ranks);
            }
        }
    }
    side.input(x)
}

/// The joined products' outputs and tape.
fn joint(
    a: &Attention,
    ls: [&LinearLora; 3],
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<([Tensor; 3], JointTape)> {
    let members = [&a.q, &a.k, &a.v]
        .into_iter()
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
    let (ys, tape) = match x.dim(1)? == a.q.w.in_features() {
        true => lora_joint::forward(x, &members, scaling)?,
        false => lora_joint::forward_wide(x, &members, scaling)?,
    };
    let [q, k, v]: [Tensor; 3] = ys
        .try_into()
        .map_err(|_| candle_core::Error::Msg("joint lora: not three outputs".into()))?;
    Ok(([q, k, v], tape))
}

/// q, k and v of x `[N, H]`, as `Proj::forward` gives each.
pub(super) fn qkv(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<[Tensor; 3]> {
    match joined(a, spec, x, lora) {
        Some(ls) => Ok(joint(a, ls, x, lora)?.0),
        None => Ok([
            a.q.forward(x, lora)?,
            a.k.forward(x, lora)?,
            a.v.forward(x, lora)?,
        ]),
    }
}

/// What the backward of q, k and v needs.
pub(super) enum QkvTape {
    Apart([ProjTape; 3]),
    Joint {
        x: Tensor,
        tape: JointTape,
        /// Each adapter's (A, B) `Var` ids.
        ids: [(TensorId, TensorId); 3],
    },
}

/// [`qkv`] keeping the tape.
pub(super) fn qkv_taped(
    a: &Attention,
    spec: &ArchSpec,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<([Tensor; 3], QkvTape)> {
    if let Some(ls) = joined(a, spec, x, lora) {
        let (ys, tape) = joint(a, ls, x, lora)?;
        let ids = ls.map(|l| (l.a.as_tensor().id(), l.b.as_tensor().id()));
        let x = x.clone();
        return Ok((ys, QkvTape::Joint { x, tape, ids }));
    }
    let (q, qt) = proj(&a.q, x, lora)?;
    let (k, kt) = proj(&a.k, x, lora)?;
    let (v, vt) = proj(&a.v, x, lora)?;
    Ok(([q, k, v], QkvTape::Apart([qt, kt, vt])))
}

impl QkvTape {
    /// d(input) for the gradients of q, k and v.
    pub(super) fn backward(
        self,
        a: &Attention,
        [dq, dk, dv]: [Tensor; 3],
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        match self {
            QkvTape::Apart([qt, kt, vt]) => {
                let dx = qt.backward(&a.q, &dq, None, grads)?;
                let dx = kt.backward(&a.k, &dk, Some(dx), grads)?;
                vt.backward(&a.v, &dv, Some(dx), grads)
            }
            QkvTape::Joint { x, tape, ids } => {
                let ws = [&a.q.w, &a.k.w, &a.v.w];
                let (dx, factors) = lora_joint::backward(&x, &ws, tape, &[dq, dk, dv])?;
                for ((ia, ib), (da, db)) in ids.into_iter().zip(factors) {
                    grads.push((ia, da));
                    grads.push((ib, db));
                }
                Ok(dx)
            }
        }
    }
}
