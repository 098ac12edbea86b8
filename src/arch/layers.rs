//! A decoder layer: pre-norm attention and pre-norm MLP (dense SwiGLU or MoE), each added to
//! the residual stream. Shapes are token-major, `N = B·S`.

pub(super) use super::attn::{output_gate, part, whole_heads, Attn};
use super::model::{Inputs, LayerStats, LoraCtx};
use super::{ArchSpec, ExchangePlan, ExpertExchange, QkNorm, Scoring};
use crate::ops::attention::query_block;
use crate::ops::attention_block::{attention_block, BlockArgs};
use crate::ops::experts::{grouped_lora, grouped_nf4, ExpertWeights};
use crate::ops::input_weights::scale_rows;
use crate::ops::lora_linear::lora_linear;
use crate::ops::nf4_linear::{nf4_linear, FrozenWeight};
use crate::ops::norm::rms_norm;
use crate::ops::rope_part::rope_part;
use crate::ops::routed_experts::{routed_experts, ExpertLora, Weights};
use crate::ops::router::{router_choose, router_probs, Choice};
use crate::ops::routing::{combine_rows, gather_rows, RowOrder};
use crate::ops::swiglu;
use crate::ops::swiglu::{glu_packed, swiglu_packed};
use crate::util::phases::timed;
use candle_core::{DType, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use std::rc::Rc;

/// A frozen projection with its module path (the LoRA key) and optional bias.
pub struct Proj {
    pub name: String,
    pub w: FrozenWeight,
    pub bias: Option<Tensor>,
}

pub struct Attention {
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// `[heads]` f32: gpt-oss's sink logits.
    pub sinks: Option<Tensor>,
}

pub struct Moe {
    /// [E, H]
    pub router: Tensor,
    /// `[E]`: added to the router's logits (gpt-oss).
    pub router_bias: Option<Tensor>,
    /// `e_score_correction_bias [E]` f32: added to the router's scores for the choice only.
    pub correction_bias: Option<Tensor>,
    pub gate_up_name: String,
    pub down_name: String,
    pub gate_up: ExpertWeights,
    pub down: ExpertWeights,
    /// Global index of the first held expert.
    pub first_expert: usize,
    /// The shared expert's projections, and its sigmoid gate [1, H].
    pub shared: Option<(MlpProjs, Option<Tensor>)>,
}

/// A SwiGLU MLP's projections: gate, up, down; or gate and up as one linear layer (Granite's
/// `input_linear`, gate rows first) and down.
pub enum MlpProjs {
    Split([Proj; 3]),
    Fused([Proj; 2]),
}

impl MlpProjs {
    /// x [N, H] → [N, H].
    pub(super) fn forward(&self, x: &Tensor, lora: &LoraCtx) -> Result<Tensor> {
        match self {
            MlpProjs::Split(p) => swiglu_mlp(p, x, lora),
            MlpProjs::Fused([gate_up, down]) => {
                down.forward(&swiglu_packed(&gate_up.forward(x, lora)?)?, lora)
            }
        }
    }
}

// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Mlp {
    /// gate, up, down
    Dense([Proj; 3]),
    Moe(Moe),
}

pub struct Layer {
    /// The norm on the attention side and the one on the MLP side (before each block, or after
    /// it where the architecture has `post_norms`: `side::Side`).
    pub attn_norm: Tensor,
    pub mlp_norm: Tensor,
    pub attn: Attn,
    pub mlp: Mlp,
}

/// Inverted-dropout mask [N, in] (values 0 or 1/(1−p)), drawn from a stream keyed by the
/// run seed, the pass and the module, so forward and recompute see the same mask.
pub(super) fn dropout_mask(x: &Tensor, p: f64, key: (u64, u64), module: &str) -> Result<Tensor> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key.0.to_le_bytes());
    h.update(key.1.to_le_bytes());
    h.update(b"lora_dropout/");
    h.update(module.as_bytes());
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(h.finalize().into());
    let keep = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())
}

impl Proj {
    /// x: [N, in] → [N, out] = x·Wᵀ (+ b) (+ s·B(A(dropout(x)))).
    pub fn forward(&self, x: &Tensor, lora: &LoraCtx) -> Result<Tensor> {
        let Some(l) = lora.adapters.linear.get(&self.name) else {
            let y = nf4_linear(x, &self.w)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        };
        let s = &lora.adapters.settings;
        let mask = match lora.dropout {
            Some(key) if s.dropout > 0.0 => Some(dropout_mask(x, s.dropout, key, &self.name)?),
            _ => None,
        };
        let a = lora.weight(&l.a).to_dtype(x.dtype())?;
        let b = lora.weight(&l.b).to_dtype(x.dtype())?;
        lora_linear(
            x,
            &self.w,
            self.bias.as_ref(),
            &a,
            &b,
            s.scaling(),
            mask.as_ref(),
        )
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// gate, up, down: x [N, H] → down(silu(gate(x)) · up(x)) [N, H].
pub(super) fn swiglu_mlp(p: &[Proj; 3], x: &Tensor, lora: &LoraCtx) -> Result<Tensor> {
    let [g, u] = super::joint::gate_up(p, x, lora)?;
    p[2].forward(&swiglu(&g, &u)?, lora)
}

impl Attention {
    /// The attention block's arguments in decoder layer `layer` for q of `dtype`. The block
    /// norms and turns whole heads; an architecture that turns part of each head has q and k
    /// prepared by [`Attention::prepare`] and the block only attends.
    pub(super) fn block_args<'a>(
        &'a self,
        spec: &ArchSpec,
        layer: usize,
        inputs: &'a Inputs,
        dtype: DType,
    ) -> BlockArgs<'a> {
        let (b, s) = (inputs.batch, inputs.seq);
        let (nh, kvh, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let per_head = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) if spec.qk_norm == QkNorm::PerHead => {
                Some((qn, kn, spec.rms_norm_eps))
            }
            _ => None,
        };
        let (cos, sin) = &inputs.rope;
        let whole = whole_heads(spec);
        let (segments, samples) = match (spec.attention_chunks[layer], &inputs.chunked) {
            (Some(_), Some((segments, samples))) => (segments, samples),
            _ => (&inputs.segments, &inputs.samples),
        };
        BlockArgs {
            batch: b,
            seq: s,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            v_head_dim: hd,
            norms: per_head.filter(|_| whole),
            rotary: whole.then_some((cos, sin)),
            segments,
            samples,
            scale: spec.attention_scale,
            block: query_block(b, nh, s, dtype),
            memo: inputs.keep_attention.then(|| &inputs.attention[layer]),
            window: spec.attention_windows[layer],
            sinks: self.sinks.as_ref(),
        }
    }

    /// q and k `[N, heads·hd]` of an architecture whose attention block does not turn whole
    /// heads itself (GLM-4.5's part of each head, interleaved pairs, norms after the rotation,
    /// NoPE layers): prepared here, and the block only attends.
    pub(super) fn prepare(
        &self,
        spec: &ArchSpec,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        inputs: &Inputs,
    ) -> Result<(Tensor, Tensor)> {
        if whole_heads(spec) {
            return Ok((q.clone(), k.clone()));
        }
        let (cos, sin) = &inputs.rope;
        self.prepare_with(spec, layer, q, k, (cos, sin), inputs.nope_q_scale.as_ref())
    }

    /// [`Attention::prepare`] with the rotary tables of q's and k's positions and, for NoPE
    /// layers, q's factor per position `[N, 1]` (f32).
    pub(super) fn prepare_with(
        &self,
        spec: &ArchSpec,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        nope_q_scale: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        if !spec.rope_layers[layer] {
            // Llama 4's NoPE layers: no rotation and no norm; q times its temperature, in f32.
            let q = match nope_q_scale {
                None => q.clone(),
                Some(s) => q
                    .to_dtype(DType::F32)?
                    .broadcast_mul(s)?
                    .to_dtype(q.dtype())?,
            };
            return Ok((q, k.clone()));
        }
        let one = |x: &Tensor, norm: &Option<Tensor>| -> Result<Tensor> {
            let (n, width) = x.dims2()?;
            let mut h = x.reshape((n, width / spec.head_dim, spec.head_dim))?;
            if let (Some(w), QkNorm::PerHead) = (norm, spec.qk_norm) {
                h = rms_norm(&h, w, spec.rms_norm_eps)?;
            }
            h = rope_part(&h, cos, sin, part(spec, 0))?;
            if let (Some(w), true) = (norm, spec.qk_norm.after_rotary()) {
                h = rms_norm(&h, w, spec.rms_norm_eps)?;
            }
            h.reshape((n, width))
        };
        Ok((one(q, &self.q_norm)?, one(k, &self.k_norm)?))
    }

    /// q, k, v `[N, heads·hd]` of x `[N, H]`: the projections (with their adapters), the norm
    /// over the whole projection where the architecture has it (OLMoE), `clip_qkv`; and the
    /// output gate `[N, heads·hd]` where q_proj yields one (`ArchSpec::attn_output_gate`).
    pub(super) fn qkv(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        lora: &LoraCtx,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let eps = spec.rms_norm_eps;
        // q [N, nh·hd], k and v [N, kvh·hd].
        let [mut q, mut k, mut v] = timed("attn: q/k/v projections", x.device(), || {
            super::joint::qkv(self, spec, x, lora)
        })?;
        let gate = match spec.attn_output_gate {
            false => None,
            true => {
                // Each head's q then its gate (transformers' `chunk(2)` of `[.., heads, 2·hd]`).
                let (n, hd) = (x.dim(0)?, spec.head_dim);
                let both = q.reshape((n, spec.num_heads, 2 * hd))?;
                let half = |at: usize| both.narrow(2, at, hd)?.reshape((n, spec.num_heads * hd));
                let gate = half(hd)?;
                q = half(0)?;
                Some(gate)
            }
        };
        if spec.qk_norm == QkNorm::FullProjection {
            if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                q = rms_norm(&q, qn, eps)?;
                k = rms_norm(&k, kn, eps)?;
            }
        }
        if let Some(c) = spec.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        Ok((q, k, v, gate))
    }

    /// x [N, H] → [N, H] in decoder layer `layer`.
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        layer: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let dev = x.device();
        let (q, k, v, gate) = self.qkv(spec, x, lora)?;
        let (q, k) = self.prepare(spec, layer, &q, &k, inputs)?;
        let args = self.block_args(spec, layer, inputs, q.dtype());
        // Per-head norms, rotary embedding and attention as one op.
        let ctx = timed("attn: attention", dev, || {
            attention_block(&q, &k, &v, &args)
        })?;
        let ctx = output_gate(ctx, gate.as_ref())?;
        timed("attn: o projection", dev, || self.o.forward(&ctx, lora))
    }
}

/// Routing of one micro-batch through one MoE layer: the top-k choices and, for each held
/// expert, which (token, slot) pairs it serves. Built once per micro-batch (`ops::routing::plan`:
/// on CUDA on the device, one copy of the counts to the host) and shared by the forward and the
/// recompute.
pub struct Routing {
    /// Top-k expert choices [N, k] u32.
    pub(super) top: Tensor,
    /// The routed rows (sorted by expert then token) and their inverse.
    pub(super) order: RowOrder,
    /// Rows per held expert.
    pub(super) counts: Vec<usize>,
    /// Tokens per global expert.
    pub(super) per_expert: Vec<u64>,
    /// With an expert exchange: the rows' trip to their experts' holders and back.
    pub(super) exchange: Option<Box<dyn ExchangePlan>>,
}

fn route(top: Tensor, num_experts: usize, held: std::ops::Range<usize>) -> Result<Routing> {
    let plan = crate::ops::routing::plan(&top, num_experts, held)?;
    Ok(Routing {
        top,
        order: plan.order,
        counts: plan.counts,
        per_expert: plan.per_expert,
        exchange: None,
    })
}

impl Moe {
    /// The router on x [N, H]: (the routing, recorded by the first pass over these inputs and
    /// replayed by later ones; the f32 probabilities [N, E]; the routing weights [N, k], a
    /// function of x through the probabilities).
    pub(super) fn route(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        exchange: Option<&dyn ExpertExchange>,
        recorded: &mut Option<Rc<Routing>>,
    ) -> Result<(Rc<Routing>, Tensor, Tensor)> {
        let k = spec.router.top_k;
        // Router in f32: scores (softmax over all experts, or sigmoid), top-k, then (optionally)
        // renormalise and scale.
        let dev = x.device();
        timed("moe: router + routing", dev, || -> Result<_> {
            let mut logits = x.matmul(&self.router.t()?)?; // [N, E]
            if let Some(b) = &self.router_bias {
                logits = logits.broadcast_add(b)?;
            }
            let choose = recorded.is_none().then_some(k);
            let (probs, top) = match spec.router.is_plain_softmax() {
                true => router_probs(&logits, choose)?,
                false => router_choose(&logits, &self.choice(spec), choose)?,
            };
            let routing = match (recorded.as_ref(), top) {
                (Some(r), _) => r.clone(),
                (None, Some(top)) => {
                    let num_experts = self.router.dim(0)?;
                    let r = match exchange {
                        None => {
                            let held =
                                self.first_expert..self.first_expert + self.gate_up.num_experts;
                            route(top, num_experts, held)?
                        }
                        Some(ex) => {
                            let mut r = route(top, num_experts, 0..num_experts)?;
                            r.exchange = Some(ex.plan(&r.counts, x.device())?);
                            r
                        }
                    };
                    let r = Rc::new(r);
                    *recorded = Some(r.clone());
                    r
                }
                (None, None) => candle_core::bail!("router: no routing recorded or chosen"),
            };
            let mut weights = probs.gather(&routing.top, 1)?; // [N, k], differentiable w.r.t. x
            if spec.router.renormalize {
                weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
            }
            if spec.router.scaling != 1.0 {
                weights = (weights * spec.router.scaling)?;
            }
            Ok((routing, probs, weights))
        })
    }

    /// The router's scoring and choice beyond softmax-then-top-k.
    fn choice<'a>(&'a self, spec: &ArchSpec) -> Choice<'a> {
        Choice {
            sigmoid: spec.router.scoring == Scoring::Sigmoid,
            bias: self.correction_bias.as_ref(),
            groups: spec.router.group_limit.map(|g| (g.groups, g.keep, g.score)),
        }
    }

    /// x [N, H] → [N, H]: routed experts (weighted by the router) plus the shared expert.
    /// With an `exchange`, the routed rows go to their experts' holders and come back.
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        lora: &LoraCtx,
        exchange: Option<&dyn ExpertExchange>,
        recorded: &mut Option<Rc<Routing>>,
    ) -> Result<(Tensor, Vec<u64>)> {
        let dev = x.device();
        let (routing, _, weights) = self.route(spec, x, exchange, recorded)?;

        let mut out = if routing.exchange.is_none() {
            // Gather, both projections with their adapters, SwiGLU and combine as one op (one
            // graph node).
            let adapters = self.expert_lora(lora)?;
            timed("moe: routed experts", dev, || {
                let weights = match spec.router.weights_input {
                    true => Weights::Input(&weights),
                    false => Weights::Output(&weights),
                };
                routed_experts(
                    x,
                    weights,
                    &routing.order,
                    &self.gate_up,
                    &self.down,
                    &routing.counts,
                    Some(&adapters),
                )
            })?
        } else {
            self.routed_ops(spec, x, &weights, &routing, lora)?
        }; // [N, H]
        if let Some((mlp, gate)) = &self.shared {
            let mut shared = mlp.forward(x, lora)?;
            if let Some(g) = gate {
                shared = shared.broadcast_mul(&sigmoid(&x.matmul(&g.t()?)?)?)?;
            }
            out = (out + shared)?;
        }
        Ok((out, routing.per_expert.clone()))
    }

    /// The routed experts as separate ops (gather, experts, combine): with an expert exchange
    /// (the rows travel to their experts' holders and back).
    fn routed_ops(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        weights: &Tensor,
        routing: &Routing,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let dev = x.device();
        let mut xs = timed("moe: gather rows", dev, || gather_rows(x, &routing.order))?; // [M, H] by expert
        let mut weights = weights.clone();
        if spec.router.weights_input {
            // Llama 4: the weights scale the rows; the outputs are summed unweighted.
            xs = scale_rows(&xs, &weights, &routing.order)?;
            weights = weights.ones_like()?;
        }
        let y = match &routing.exchange {
            Some(plan) => {
                // A process that receives nothing still takes part in the backward's exchange,
                // so its (empty) output stays connected to its input.
                let xr = plan.dispatch(&xs)?; // [R, H] grouped by held expert
                let yr = if xr.dim(0)? == 0 {
                    xr.clone() // [0, H]: no rows, but the same node
                } else if !lora.live {
                    // The hand-written backward's forward (`arch::backward`), so a pass
                    // without a graph computes what a taped pass does.
                    let (yr, _) = self.held_taped(&xr, plan.held_counts(), lora, true)?;
                    yr.ok_or_else(|| candle_core::Error::Msg("moe: no expert outputs".into()))?
                } else {
                    self.experts(&xr, plan.held_counts(), lora)?
                };
                plan.combine(&yr)? // [M, H] in xs order
            }
            None => timed("moe: experts", dev, || {
                self.experts(&xs, &routing.counts, lora)
            })?,
        };
        // Each token's k rows weighted by its (f32) routing weights and summed in f32.
        timed("moe: combine rows", dev, || {
            combine_rows(&y, &weights, &routing.order)
        }) // [N, H]
    }

    /// The expert adapters' factors in moeq's orientation (live or detached as `lora` says).
    pub(super) fn expert_lora(&self, lora: &LoraCtx) -> Result<ExpertLora> {
        let ad = lora.adapters;
        let factors = |name: &str| -> Result<Option<(Tensor, Tensor)>> {
            ad.experts
                .get(name)
                .map(|l| l.oriented(lora.weight(&l.a), lora.weight(&l.b)))
                .transpose()
        };
        Ok(ExpertLora {
            gate_up: factors(&self.gate_up_name)?,
            down: factors(&self.down_name)?,
            r: ad.settings.r,
            scaling: ad.settings.scaling(),
        })
    }

    /// The held experts on their rows: xs [M, H] grouped by held expert, `counts[e]` rows
    /// each → [M, H]. Expert adapters hold the same experts as the weights (local index 0 is
    /// `first_expert`).
    fn experts(&self, xs: &Tensor, counts: &[usize], lora: &LoraCtx) -> Result<Tensor> {
        let ExpertLora {
            gate_up: gate_up_lora,
            down: down_lora,
            r,
            scaling: s,
        } = self.expert_lora(lora)?;
        let mut gu = grouped_nf4(xs, &self.gate_up, counts)?; // [M, 2I]
        if let Some((a, b)) = &gate_up_lora {
            gu = (gu + grouped_lora(xs, a, b, counts, 0, r, s)?)?;
        }
        let act = glu_packed(&gu, self.gate_up.glu)?; // [M, I]
        let mut y = grouped_nf4(&act, &self.down, counts)?; // [M, H]
        if let Some((a, b)) = &down_lora {
            y = (y + grouped_lora(&act, a, b, counts, 0, r, s)?)?;
        }
        Ok(y)
    }
}

impl Layer {
    /// x [N, H] → [N, H].
    pub fn forward(
        &self,
        index: usize,
        spec: &ArchSpec,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
        exchange: Option<&dyn ExpertExchange>,
    ) -> Result<(Tensor, LayerStats)> {
        let dev = x.device();
        let pass = if lora.live { "recompute" } else { "forward" };
        let [attn_side, mlp_side] = self.sides(spec);
        let x = timed(phase("attention", pass), dev, || {
            let h = super::joint::attention_input(&attn_side, &self.attn, spec, x, lora)?;
            attn_side.join(x, &self.attn.forward(spec, index, &h, inputs, lora)?)
        })?;
        let (m, stats) = timed(phase("mlp", pass), dev, || -> Result<_> {
            let h = mlp_side.input(&x)?;
            Ok(match &self.mlp {
                Mlp::Dense(p) => (swiglu_mlp(p, &h, lora)?, LayerStats::default()),
                Mlp::Moe(moe) => {
                    let mut routes = inputs.routes.borrow_mut();
                    let (m, per_expert) =
                        moe.forward(spec, &h, lora, exchange, &mut routes[index])?;
                    (
                        m,
                        LayerStats {
                            expert_tokens: per_expert,
                        },
                    )
                }
            })
        })?;
        Ok((mlp_side.join(&x, &m)?, stats))
    }
}

/// A static phase name for `timed` ("attention forward", "mlp recompute", ...).
fn phase(part: &str, pass: &str) -> &'static str {
    match (part, pass) {
        ("attention", "forward") => "attention forward",
        ("attention", _) => "attention recompute",
        ("mlp", "forward") => "mlp forward",
        _ => "mlp recompute",
    }
}
