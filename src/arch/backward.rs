//! A decoder layer's backward written out (docs/ARCHITECTURE.md decision 22): the layer's
//! forward runs without a graph and keeps, in a [`LayerTape`], what each op's backward needs;
//! [`LayerTape::backward`] walks the layer in reverse with the ops' own backward functions
//! and hands out the adapter gradients by factor. Against candle's autograd over the same
//! forward (`Layer::forward` with live LoRA, the reference this is tested against) it saves,
//! per graph edge, a zero-filled gradient buffer and an add over it, and per custom op a copy
//! of each input and of the output; and the gradients of a tensor read by several projections
//! (the normed input of q, k and v) are summed inside their products (`add_product`: cuBLAS
//! with β = 1, one rounding each) instead of by separate adds.
//!
//! The taped forward computes the same values as a plain forward (`Layer::forward` without
//! a graph) — the same functions in the same order — so a step's losses do not depend on
//! whether the backward recomputes the layer or keeps its tape from the forward.

use super::attn::{graph_attention, graph_backward};
use super::joint::{qkv_taped, Tapes};
use super::latent::LatentTape;
use super::layers::{dropout_mask, part, whole_heads, Attention, Attn, Layer, Mlp, Proj};
use super::mlp_tape::{swiglu_mlp, MlpTape};
use super::model::{Inputs, LayerStats, LoraCtx};
use super::moe_tape::MoeTape;
use super::{ArchSpec, ExpertExchange, QkNorm};
use crate::ops::attention_block::{attention_block_taped, BlockTape};
use crate::ops::lora_linear::{backward_into, forward_taped, LinearTape};
use crate::ops::nf4_linear::nf4_linear;
use crate::ops::norm::{rms_norm, rms_norm_backward, rms_norm_backward_plus};
use crate::ops::rope_part::{rope_part, rope_part_backward};
use crate::util::phases::{mark_memory, timed};
use candle_core::{DType, Result, Tensor, TensorId};

/// Adapter gradients by the id of the factor's `Var` tensor (`Var::as_tensor().id()`).
pub type AdapterGrads = Vec<(TensorId, Tensor)>;

/// A projection's input and, with an adapter, what its backward needs and its factors' ids.
pub(super) struct ProjTape {
    x: Tensor,
    lora: Option<(LinearTape, TensorId, TensorId)>,
}

/// `Proj::forward`'s arithmetic, keeping its tape.
pub(super) fn proj(p: &Proj, x: &Tensor, lora: &LoraCtx) -> Result<(Tensor, ProjTape)> {
    let Some(l) = lora.adapters.linear.get(&p.name) else {
        let y = nf4_linear(x, &p.w)?;
        let y = match &p.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let tape = ProjTape {
            x: x.clone(),
            lora: None,
        };
        return Ok((y, tape));
    };
    let s = &lora.adapters.settings;
    let mask = match lora.dropout {
        Some(key) if s.dropout > 0.0 => Some(dropout_mask(x, s.dropout, key, &p.name)?),
        _ => None,
    };
    let a = l.a.as_tensor().detach().to_dtype(x.dtype())?;
    let b = l.b.as_tensor().detach().to_dtype(x.dtype())?;
    let (y, t) = forward_taped(
        x,
        &p.w,
        p.bias.as_ref(),
        (&a, &b),
        s.scaling(),
        mask.as_ref(),
    )?;
    let ids = (l.a.as_tensor().id(), l.b.as_tensor().id());
    let tape = ProjTape {
        x: x.clone(),
        lora: Some((t, ids.0, ids.1)),
    };
    Ok((y, tape))
}

impl ProjTape {
    /// dx for upstream `dy`, added into `dx_into` where given.
    pub(super) fn backward(
        self,
        p: &Proj,
        dy: &Tensor,
        dx_into: Option<Tensor>,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        let lora = self.lora.as_ref().map(|(t, _, _)| t);
        let (dx, factors) = backward_into(&self.x, &p.w, lora, dy, dx_into)?;
        if let (Some((_, a, b)), Some((da, db))) = (self.lora, factors) {
            grads.push((a, da));
            grads.push((b, db));
        }
        Ok(dx)
    }
}

/// RMSNorm's backward with a frozen weight: dx from the norm's input x and dy.
pub(super) fn norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let z = crate::ops::at_offset_zero;
    let w = z(&w.to_dtype(x.dtype())?)?;
    rms_norm_backward(&z(x)?, &w, &z(&dy.to_dtype(x.dtype())?)?, eps)
}

/// `plus + norm_backward(x, w, dy)` in x's dtype: one pass on CUDA where the norm's row
/// kernels serve it (`ops::norm::rms_norm_backward_plus`; the same values).
pub(super) fn norm_backward_plus(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    plus: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let z = crate::ops::at_offset_zero;
    let to = |t: &Tensor| z(&t.to_dtype(x.dtype())?);
    rms_norm_backward_plus(&z(x)?, &to(w)?, &to(dy)?, &to(plus)?, eps)
}

struct AttnTape {
    qkv_in: Tapes,
    /// q and k before the norm over the whole projection (`QkNorm::FullProjection`).
    pre_norm: Option<(Tensor, Tensor)>,
    /// q, k and v before `clip_qkv`.
    pre_clip: Option<[Tensor; 3]>,
    /// q and k before `Attention::prepare`, with what it read.
    pre_rotary: Option<PreRotary>,
    /// The decoder layer (whether it turns q and k: `ArchSpec::rope_layers`).
    layer: usize,
    /// The attention block's inputs.
    qkv: [Tensor; 3],
    block: BlockTape,
    o: ProjTape,
}

/// q and k before the layer's norms and rotation of part of each head (`Attention::prepare`),
/// the rotary tables and NoPE q's factor.
struct PreRotary {
    qk: [Tensor; 2],
    rope: (Tensor, Tensor),
    q_scale: Option<Tensor>,
}

/// `Attention::forward`'s arithmetic, keeping its tape.
fn attention(
    a: &Attention,
    spec: &ArchSpec,
    layer: usize,
    x: &Tensor,
    inputs: &Inputs,
    lora: &LoraCtx,
) -> Result<(Tensor, AttnTape)> {
    let eps = spec.rms_norm_eps;
    let ([mut q, mut k, mut v], qkv_in) = qkv_taped(a, spec, x, lora)?;
    let mut pre_norm = None;
    if spec.qk_norm == QkNorm::FullProjection {
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            let (nq, nk) = (rms_norm(&q, qn, eps)?, rms_norm(&k, kn, eps)?);
            pre_norm = Some((std::mem::replace(&mut q, nq), std::mem::replace(&mut k, nk)));
        }
    }
    let mut pre_clip = None;
    if let Some(c) = spec.clip_qkv {
        let clipped = [q.clamp(-c, c)?, k.clamp(-c, c)?, v.clamp(-c, c)?];
        let [cq, ck, cv] = clipped;
        pre_clip = Some([
            std::mem::replace(&mut q, cq),
            std::mem::replace(&mut k, ck),
            std::mem::replace(&mut v, cv),
        ]);
    }
    let mut pre_rotary = None;
    if !whole_heads(spec) {
        let (pq, pk) = a.prepare(spec, layer, &q, &k, inputs)?;
        let pre = [std::mem::replace(&mut q, pq), std::mem::replace(&mut k, pk)];
        pre_rotary = Some(PreRotary {
            qk: pre,
            rope: inputs.rope.clone(),
            q_scale: inputs.nope_q_scale.clone(),
        });
    }
    let args = a.block_args(spec, layer, inputs, q.dtype());
    let (ctx, block) = attention_block_taped(&q, &k, &v, &args)?;
    let (out, o) = proj(&a.o, &ctx, lora)?;
    let tape = AttnTape {
        qkv_in,
        pre_norm,
        pre_clip,
        pre_rotary,
        layer,
        qkv: [q, k, v],
        block,
        o,
    };
    Ok((out, tape))
}

impl AttnTape {
    /// d(normed input) for upstream `dy` [N, H].
    fn backward(
        self,
        a: &Attention,
        spec: &ArchSpec,
        dy: &Tensor,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        let dctx = self.o.backward(&a.o, dy, None, grads)?;
        let [q, k, v] = &self.qkv;
        let [mut dq, mut dk, mut dv] = self.block.backward(q, k, v, &dctx)?;
        drop((dctx, self.block));
        if let Some(PreRotary {
            qk: [q0, k0],
            rope: (cos, sin),
            q_scale,
        }) = &self.pre_rotary
        {
            if spec.rope_layers[self.layer] {
                dq = prepare_backward(spec, q0, a.q_norm.as_ref(), (cos, sin), &dq)?;
                dk = prepare_backward(spec, k0, a.k_norm.as_ref(), (cos, sin), &dk)?;
            } else if let Some(s) = q_scale {
                // NoPE: q was scaled per position (in f32).
                dq = dq
                    .to_dtype(DType::F32)?
                    .broadcast_mul(s)?
                    .to_dtype(dq.dtype())?;
            }
        }
        if let (Some(pre), Some(c)) = (&self.pre_clip, spec.clip_qkv) {
            // The clamp passes the gradient where its input lies within [−c, c].
            let pass = |x: &Tensor, d: &Tensor| -> Result<Tensor> {
                let inside = x.ge(-c)?.mul(&x.le(c)?)?.to_dtype(d.dtype())?;
                d * inside
            };
            dq = pass(&pre[0], &dq)?;
            dk = pass(&pre[1], &dk)?;
            dv = pass(&pre[2], &dv)?;
        }
        if let (Some((q0, k0)), Some(qn), Some(kn)) = (&self.pre_norm, &a.q_norm, &a.k_norm) {
            dq = norm_backward(q0, qn, &dq, spec.rms_norm_eps)?;
            dk = norm_backward(k0, kn, &dk, spec.rms_norm_eps)?;
        }
        self.qkv_in
            .backward(&[&a.q, &a.k, &a.v], &[dq, dk, dv], None, grads)
    }
}

/// The transpose of `Attention::prepare` for one of q and k: x `[N, heads·hd]` its input, `d`
/// the gradient of its output.
fn prepare_backward(
    spec: &ArchSpec,
    x: &Tensor,
    norm: Option<&Tensor>,
    (cos, sin): (&Tensor, &Tensor),
    d: &Tensor,
) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let heads = (n, width / spec.head_dim, spec.head_dim);
    let z = crate::ops::at_offset_zero;
    let mut d = d.reshape(heads)?;
    if let (Some(w), true) = (norm, spec.qk_norm.after_rotary()) {
        let turned = rope_part(&x.reshape(heads)?, cos, sin, part(spec, 0))?;
        d = norm_backward(&z(&turned)?, w, &z(&d)?, spec.rms_norm_eps)?;
    }
    let mut d = rope_part_backward(&d, cos, sin, part(spec, 0))?;
    if let (Some(w), QkNorm::PerHead) = (norm, spec.qk_norm) {
        d = norm_backward(&z(&x.reshape(heads)?)?, w, &z(&d)?, spec.rms_norm_eps)?;
    }
    d.reshape((n, width))
}

enum MlpPart {
    Dense(MlpTape),
    Moe(Box<MoeTape>),
}

/// What a layer's taped forward leaves for its backward.
pub struct LayerTape {
    /// What the attention side's and the MLP side's norms read (`side::Side::normed`): the
    /// layer's input and the residual after attention, or (post-norms) the blocks' outputs.
    attn_normed: Tensor,
    mlp_normed: Tensor,
    attn: AttnPart,
    mlp: MlpPart,
}

enum AttnPart {
    Heads(Box<AttnTape>),
    Latent(Box<LatentTape>, (Tensor, Tensor)),
    /// An attention without a written-out backward (Gated DeltaNet; gated full attention): its
    /// input as a `Var` and its output with candle's graph over it and the live adapters.
    Graph(candle_core::Var, Tensor),
}

impl Layer {
    /// `Layer::forward`'s arithmetic without a graph, keeping the tape for [`Layer::backward`];
    /// without `output` (a recompute: the backward follows) the layer's output is not formed,
    /// and of the routed experts only what their backward reads (no down projection, no
    /// combine).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_taped(
        &self,
        index: usize,
        spec: &ArchSpec,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
        exchange: Option<&dyn ExpertExchange>,
        output: bool,
    ) -> Result<(Option<Tensor>, LayerStats, LayerTape)> {
        let [attn_side, mlp_side] = self.sides(spec);
        let x = x.detach();
        let h = super::joint::attention_input(&attn_side, &self.attn, spec, &x, lora)?;
        let (a, attn) = match &self.attn {
            attn if graph_attention(attn, spec) => {
                let input = candle_core::Var::from_tensor(&h)?;
                let live = LoraCtx {
                    live: true,
                    ..*lora
                };
                let a = attn.forward(spec, index, input.as_tensor(), inputs, &live)?;
                (a.detach(), AttnPart::Graph(input, a))
            }
            Attn::Heads(heads) => {
                let (a, t) = attention(heads, spec, index, &h, inputs, lora)?;
                (a, AttnPart::Heads(Box::new(t)))
            }
            Attn::Latent(latent) => {
                let (a, t) = latent.taped(spec, index, &h, inputs, lora)?;
                (a, AttnPart::Latent(Box::new(t), inputs.rope.clone()))
            }
            Attn::Linear(_) => candle_core::bail!("linear attention runs under a graph"),
        };
        drop(h);
        let x1 = attn_side.join(&x, &a)?;
        let attn_normed = attn_side.normed(&x, &a).clone();
        drop((x, a));
        let h = mlp_side.input(&x1)?;
        let (m, stats, mlp) = match &self.mlp {
            Mlp::Dense(p) => {
                let (m, t) = swiglu_mlp(p, &h, lora)?;
                (Some(m), LayerStats::default(), MlpPart::Dense(t))
            }
            Mlp::Moe(moe) => {
                let mut routes = inputs.routes.borrow_mut();
                // A post-norm side's backward reads the block's output.
                let output = output || mlp_side.post;
                let (m, t) = moe.taped(spec, &h, lora, exchange, &mut routes[index], output)?;
                let stats = LayerStats {
                    expert_tokens: t.routing.per_expert.clone(),
                };
                (m, stats, MlpPart::Moe(Box::new(t)))
            }
        };
        let out = match (&m, output) {
            (Some(m), true) => Some(mlp_side.join(&x1, m)?),
            _ => None,
        };
        let mlp_normed = match (&m, mlp_side.post) {
            (Some(m), true) => m.clone(),
            _ => x1,
        };
        let tape = LayerTape {
            attn_normed,
            mlp_normed,
            attn,
            mlp,
        };
        Ok((out, stats, tape))
    }

    /// dL/dx of the layer's input for upstream `g` = dL/d(output), and the adapter gradients.
    pub fn backward(
        &self,
        spec: &ArchSpec,
        tape: LayerTape,
        g: &Tensor,
        lora: &LoraCtx,
    ) -> Result<(Tensor, AdapterGrads)> {
        let dev = g.device().clone();
        let mut grads = AdapterGrads::new();
        let [attn_side, mlp_side] = self.sides(spec);
        let LayerTape {
            attn_normed,
            mlp_normed,
            attn,
            mlp,
        } = tape;
        let dm = mlp_side.output_grad(&mlp_normed, g)?;
        let dh = timed("bwd: mlp", &dev, || match (mlp, &self.mlp) {
            (MlpPart::Dense(t), Mlp::Dense(p)) => t.backward(p, &dm, None, &mut grads),
            (MlpPart::Moe(t), Mlp::Moe(moe)) => t.backward(moe, spec, &dm, lora, &mut grads),
            _ => candle_core::bail!("layer backward: the tape is of another layer"),
        })?;
        drop(dm);
        // Where in the layer backward the step's peak is (MOEQ_PHASE_TIMES=1 only): the MLP's
        // backward, then the rest (the MLP side's norm, the attention's backward and its norm).
        mark_memory("5b layer backward: mlp", &dev);
        let dx1 = mlp_side.input_grad(&mlp_normed, g, &dh)?;
        drop((dh, mlp_normed));
        let da = attn_side.output_grad(&attn_normed, &dx1)?;
        let dh = timed("bwd: attention", &dev, || match (attn, &self.attn) {
            (AttnPart::Heads(t), Attn::Heads(a)) => t.backward(a, spec, &da, &mut grads),
            (AttnPart::Latent(t, (cos, sin)), Attn::Latent(a)) => {
                t.backward(a, spec, (&cos, &sin), &da, &mut grads)
            }
            (AttnPart::Graph(input, out), attn) => {
                graph_backward(attn, (&input, &out), &da, lora, &mut grads)
            }
            _ => candle_core::bail!("layer backward: the attention tape is of another layer"),
        })?;
        drop(da);
        let dx = attn_side.input_grad(&attn_normed, &dx1, &dh)?;
        mark_memory("5c layer backward: attention", &dev);
        Ok((dx, grads))
    }
}
