//! A decoder layer's attention in any of its forms — q/k/v/o heads (`layers::Attention`),
//! latent attention (`latent::LatentAttention`) or Gated DeltaNet (`linear_attn`) —, which dims
//! of a head the rotation turns, the output gate, and the taped layer's graph for the forms
//! without a written-out backward (docs/ARCHITECTURE.md decision 34).

use super::backward::AdapterGrads;
use super::latent::LatentAttention;
use super::layers::{Attention, Proj};
use super::linear_attn::LinearAttention;
use super::model::{Inputs, LoraCtx};
use super::{ArchSpec, QkNorm};
use crate::ops::linear_attn_parts::sigmoid_rounded;
use crate::ops::norm::rms_norm;
use crate::ops::rope::apply_rope;
use crate::ops::rope_part::Part;
use candle_core::{Result, Tensor};

/// A layer's attention: q/k/v/o heads, latent attention, or Gated DeltaNet.
// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Attn {
    Heads(Attention),
    Latent(LatentAttention),
    /// Gated DeltaNet (Qwen3-Next's and Qwen3.5's `linear_attention` layers).
    Linear(LinearAttention),
}

impl Attn {
    /// x [N, H] → [N, H] in decoder layer `layer`.
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        layer: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        match self {
            Attn::Heads(a) => a.forward(spec, layer, x, inputs, lora),
            Attn::Latent(a) => a.forward(spec, layer, x, inputs, lora),
            Attn::Linear(a) => a.forward(spec, x, inputs, lora),
        }
    }

    /// q `[n, heads, hd]`, k `[n, kv_heads, hd]` (normed and rotated) and v `[n, kv_heads,
    /// v_head_dim]` of x `[n, H]` in decoder layer `layer`, given the rotary tables of its
    /// positions and q's factor on NoPE layers; and the output gate `[n, heads·hd]` where
    /// there is one.
    pub(super) fn heads(
        &self,
        spec: &ArchSpec,
        layer: usize,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        nope_q_scale: Option<&Tensor>,
        lora: &LoraCtx,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let (n, nh, kvh, hd) = (x.dim(0)?, spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let mut gate = None;
        let (q, k, v) = match self {
            Attn::Linear(_) => candle_core::bail!("a linear-attention layer has no heads"),
            Attn::Latent(a) => a.qkv(spec, x, (cos, sin), lora)?,
            Attn::Heads(a) => {
                let (q, k, v, g) = a.qkv(spec, x, lora)?;
                gate = g;
                if whole_heads(spec) {
                    let (mut q, mut k) = (q.reshape((n, nh, hd))?, k.reshape((n, kvh, hd))?);
                    if let (QkNorm::PerHead, Some(qn), Some(kn)) =
                        (spec.qk_norm, &a.q_norm, &a.k_norm)
                    {
                        q = rms_norm(&q, qn, spec.rms_norm_eps)?;
                        k = rms_norm(&k, kn, spec.rms_norm_eps)?;
                    }
                    (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?, v)
                } else {
                    let (q, k) = a.prepare_with(spec, layer, &q, &k, (cos, sin), nope_q_scale)?;
                    (q, k, v)
                }
            }
        };
        Ok((
            q.reshape((n, nh, hd))?,
            k.reshape((n, kvh, hd))?,
            v.reshape((n, kvh, spec.v_head_dim()))?,
            gate,
        ))
    }

    /// gpt-oss's sink logits `[heads]` (f32).
    pub(super) fn sinks(&self) -> Option<&Tensor> {
        match self {
            Attn::Heads(a) => a.sinks.as_ref(),
            Attn::Latent(_) | Attn::Linear(_) => None,
        }
    }

    /// The output projection.
    pub(super) fn o(&self) -> &Proj {
        match self {
            Attn::Heads(a) => &a.o,
            Attn::Latent(a) => &a.o,
            Attn::Linear(a) => &a.out,
        }
    }
}

/// Whether the attention block turns whole heads (the rotation's pairs `(i, i + hd/2)`, and
/// any per-head norm before it) on every layer.
pub(super) fn whole_heads(spec: &ArchSpec) -> bool {
    spec.rotary.dim == spec.head_dim
        && !spec.rotary.interleaved
        && !spec.qk_norm.after_rotary()
        && spec.rope_layers.iter().all(|&r| r)
}

/// The rotated part of a head whose rotated dims start at `at`.
pub(super) fn part(spec: &ArchSpec, at: usize) -> Part {
    Part {
        at,
        dim: spec.rotary.dim,
        interleaved: spec.rotary.interleaved,
    }
}

/// Attention's output `[N, heads·hd]` times `sigmoid(gate)` where there is a gate (each
/// rounded to the compute dtype, as transformers multiplies them).
pub(super) fn output_gate(ctx: Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    match gate {
        None => Ok(ctx),
        Some(g) => {
            let g = sigmoid_rounded(&g.reshape(ctx.shape())?)?;
            ctx.mul(&g.to_dtype(ctx.dtype())?)
        }
    }
}

/// Whether a layer's attention runs under candle's graph in the taped layer: Gated DeltaNet,
/// and full attention with an output gate (no written-out backward yet).
pub(super) fn graph_attention(attn: &Attn, spec: &ArchSpec) -> bool {
    match attn {
        Attn::Linear(_) => true,
        Attn::Heads(_) => spec.attn_output_gate,
        Attn::Latent(_) => false,
    }
}

/// dL/d(input) of an attention kept under a graph (`AttnPart::Graph`) for upstream `da`, and
/// the gradients of the adapters it read.
pub(super) fn graph_backward(
    attn: &Attn,
    (input, out): (&candle_core::Var, &Tensor),
    da: &Tensor,
    lora: &LoraCtx,
    grads: &mut AdapterGrads,
) -> Result<Tensor> {
    let store = out
        .mul(&da.to_dtype(out.dtype())?.detach())?
        .sum_all()?
        .backward()?;
    let projections = match attn {
        Attn::Heads(a) => vec![&a.q, &a.k, &a.v, &a.o],
        Attn::Linear(a) => a.projections(),
        Attn::Latent(_) => vec![],
    };
    for p in projections {
        let Some(l) = lora.adapters.linear.get(&p.name) else {
            continue;
        };
        for var in [&l.a, &l.b] {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.push((var.as_tensor().id(), g.clone()));
            }
        }
    }
    match store.get(input.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => candle_core::bail!("layer backward: no gradient reached the attention's input"),
    }
}
