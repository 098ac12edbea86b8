//! Gated DeltaNet, the linear attention of Qwen3-Next's and Qwen3.5's `linear_attention`
//! layers (docs/ARCHITECTURE.md decision 34), as transformers 5.17's `Qwen3NextGatedDeltaNet`
//! / `Qwen3_5MoeGatedDeltaNet` compute it on a training pass: input projections → q, k, v (one
//! depthwise causal conv + SiLU over the three), z, b, a; `beta = sigmoid(b)`,
//! `g = −exp(A_log)·softplus(a + dt_bias)`; the gated delta rule over each sample
//! (`ops::delta_rule`, q and k repeated to the value heads); the gated RMSNorm with z; the
//! output projection.
//!
//! Built from differentiable ops, so candle's autograd gives its backward (the taped layer
//! recomputes it under a graph: `backward::AttnPart::Graph`); on CUDA the delta rule's inputs
//! (`ops::delta_prep_op`), the rule (`ops::delta_rule_op`) and the gated norm
//! (`ops::gated_norm_op`) are ops with written-out backwards inside that graph.

use super::layers::Proj;
use super::model::{Inputs, LoraCtx};
use super::spec::LinearAttnSpec;
use super::ArchSpec;
use crate::ops::conv_silu_op::conv1d_silu;
use crate::ops::delta_rule;
use crate::ops::gated_norm_op::gated_rms_norm;
use crate::ops::linear_attn_parts::sigmoid_rounded;
use candle_core::{DType, Result, Tensor};

/// The input projections, as the checkpoint lays them out (`LinearProjections`).
// One per linear-attention layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum LinearIn {
    Grouped {
        qkvz: Proj,
        ba: Proj,
    },
    Split {
        qkv: Proj,
        z: Proj,
        b: Proj,
        a: Proj,
    },
}

pub struct LinearAttention {
    pub input: LinearIn,
    /// The depthwise convolution's weight `[conv_dim, K]` (the checkpoint's `[C, 1, K]`).
    pub conv: Tensor,
    /// `A_log [Hv]` and `dt_bias [Hv]` (in the compute dtype; read in f32).
    pub a_log: Tensor,
    pub dt_bias: Tensor,
    /// The gated RMSNorm's weight `[Dv]` (a plain scale, not zero-centred).
    pub norm: Tensor,
    pub out: Proj,
}

/// `softplus(x) = ln(1 + eˣ)` in the stable form `max(x, 0) + ln(1 + e^−|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

impl LinearAttention {
    /// q | k | v `[N, 2·Kd + Vd]` (the convolution's input, in its channel order), z `[N, Vd]`,
    /// b and a `[N, Hv]`.
    fn project(&self, l: &LinearAttnSpec, x: &Tensor, lora: &LoraCtx) -> Result<[Tensor; 4]> {
        let n = x.dim(0)?;
        let (kd, vd, r) = (l.key_head_dim, l.value_head_dim, l.group());
        match &self.input {
            LinearIn::Split { qkv, z, b, a } => Ok([
                qkv.forward(x, lora)?,
                z.forward(x, lora)?,
                b.forward(x, lora)?,
                a.forward(x, lora)?,
            ]),
            LinearIn::Grouped { qkvz, ba } => {
                // Per key head: q [kd], k [kd], v [r·vd], z [r·vd]; then b [r], a [r].
                let hk = l.key_heads;
                let g = qkvz
                    .forward(x, lora)?
                    .reshape((n, hk, 2 * kd + 2 * r * vd))?;
                let part = |at: usize, width: usize| -> Result<Tensor> {
                    g.narrow(2, at, width)?.reshape((n, hk * width))
                };
                let ba = ba.forward(x, lora)?.reshape((n, hk, 2 * r))?;
                let mixed = Tensor::cat(&[part(0, kd)?, part(kd, kd)?, part(2 * kd, r * vd)?], 1)?;
                Ok([
                    mixed,
                    part(2 * kd + r * vd, r * vd)?,
                    ba.narrow(2, 0, r)?.reshape((n, hk * r))?,
                    ba.narrow(2, r, r)?.reshape((n, hk * r))?,
                ])
            }
        }
    }

    /// x [N, H] → [N, H].
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let l = shapes(spec)?;
        let n = x.dim(0)?;
        let (mixed, z, g, beta) = self.inputs(&l, x, lora)?;
        let Some(runs) = &inputs.runs else {
            candle_core::bail!("linear attention: the inputs carry no sample runs");
        };
        // Tokens grouped so that each group of equally long samples is one [runs, len] block.
        let grouped = |t: &Tensor| match &runs.order {
            Some((order, _)) => t.index_select(order, 0),
            None => Ok(t.clone()),
        };
        let (mixed, g, beta) = (grouped(&mixed)?, grouped(&g)?, grouped(&beta)?);
        let mut outs = Vec::with_capacity(runs.groups.len());
        let mut start = 0;
        for &(rows, len) in &runs.groups {
            let tokens = rows * len;
            let block = |t: &Tensor| -> Result<Tensor> {
                let width = t.dim(1)?;
                t.narrow(0, start, tokens)?.reshape((rows, len, width))
            };
            let conv = conv1d_silu(&block(&mixed)?, &self.conv)?;
            let (o, _) = self.rule(&l, &conv, &block(&g)?, &block(&beta)?, None)?;
            outs.push(o.reshape((tokens, l.value_dim()))?);
            start += tokens;
        }
        let o = Tensor::cat(&outs, 0)?;
        let o = match &runs.order {
            Some((_, inverse)) => o.index_select(inverse, 0)?,
            None => o,
        };
        self.output(spec, &l, &o, &z, n, lora)
    }

    /// One sequence's next `n` tokens x `[n, H]` given its `state` (the last K−1 rows entering
    /// the convolution `[K−1, C]` and the delta rule's state `[1, Hv, Dk, Dv]` f32; zeros at
    /// the start), which moves on past them: generation with a cache.
    pub(super) fn step(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        state: &mut Option<(Tensor, Tensor)>,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let l = shapes(spec)?;
        let (n, k) = (x.dim(0)?, l.conv_kernel);
        let (mixed, z, g, beta) = self.inputs(&l, x, lora)?;
        let (tail, s) = match state.take() {
            Some((tail, s)) => (tail, Some(s)),
            None => (
                Tensor::zeros((k - 1, l.conv_dim()), mixed.dtype(), x.device())?,
                None,
            ),
        };
        let seen = Tensor::cat(&[&tail, &mixed], 0)?;
        let conv = conv1d_silu(&seen.unsqueeze(0)?, &self.conv)?.narrow(1, k - 1, n)?;
        let row = |t: &Tensor| t.unsqueeze(0);
        let (o, s) = self.rule(&l, &conv, &row(&g)?, &row(&beta)?, s.as_ref())?;
        *state = Some((seen.narrow(0, n, k - 1)?, s));
        self.output(spec, &l, &o.reshape((n, l.value_dim()))?, &z, n, lora)
    }

    /// The convolution's input `[N, C]` (q, k, v), z `[N, Vd]`, g (f32) and beta `[N, Hv]`.
    fn inputs(
        &self,
        l: &LinearAttnSpec,
        x: &Tensor,
        lora: &LoraCtx,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let [mixed, z, b, a] = self.project(l, x, lora)?;
        let beta = sigmoid_rounded(&b)?;
        let dt = self.dt_bias.to_dtype(DType::F32)?;
        let g = softplus(&a.to_dtype(DType::F32)?.broadcast_add(&dt)?)?
            .broadcast_mul(&self.a_log.to_dtype(DType::F32)?.exp()?)?
            .neg()?;
        Ok((mixed, z, g, beta))
    }

    /// The gated delta rule over convolved q, k, v `[B, T, C]` with g, beta `[B, T, Hv]`:
    /// o `[B, T, Hv, Dv]` and the final state.
    fn rule(
        &self,
        l: &LinearAttnSpec,
        conv: &Tensor,
        g: &Tensor,
        beta: &Tensor,
        initial: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let h = delta_rule::Heads {
            key_heads: l.key_heads,
            value_heads: l.value_heads,
            dk: l.key_head_dim,
            dv: l.value_head_dim,
        };
        // One new token after a cached prefix: token by token, as transformers decodes.
        match (initial, conv.dim(1)?) {
            (Some(_), 1) => {
                let (q, k, v) = delta_rule::heads(conv, h)?;
                delta_rule::recurrent(&q, &k, &v, g, beta, initial)
            }
            // The CUDA kernels on CUDA, the chunked form elsewhere.
            _ => delta_rule::fused_conv(conv, h, g, beta, initial),
        }
    }

    /// The gated RMSNorm of the rule's output `[N, Vd]` with z, then the output projection.
    fn output(
        &self,
        spec: &ArchSpec,
        l: &LinearAttnSpec,
        o: &Tensor,
        z: &Tensor,
        n: usize,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let (hv, dv) = (l.value_heads, l.value_head_dim);
        let normed = gated_rms_norm(
            &o.reshape((n * hv, dv))?,
            &z.reshape((n * hv, dv))?,
            &self.norm,
            spec.rms_norm_eps,
        )?;
        self.out.forward(&normed.reshape((n, hv * dv))?, lora)
    }

    /// The projections with their LoRA module names.
    pub fn projections(&self) -> Vec<&Proj> {
        let mut all = match &self.input {
            LinearIn::Grouped { qkvz, ba } => vec![qkvz, ba],
            LinearIn::Split { qkv, z, b, a } => vec![qkv, z, b, a],
        };
        all.push(&self.out);
        all
    }
}

fn shapes(spec: &ArchSpec) -> Result<LinearAttnSpec> {
    match spec.linear_attn {
        Some(l) => Ok(l),
        None => candle_core::bail!("a linear-attention layer in a model without linear_attn"),
    }
}
