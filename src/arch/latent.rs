//! Multi-head latent attention (DeepSeek-V2, DeepSeek-V3, Kimi K2, GLM-4.7-Flash), as
//! transformers computes it: q from `q_proj`, or `q_a_proj` → `q_a_layernorm` → `q_b_proj`;
//! one latent `kv_a_proj_with_mqa` whose first `kv_lora_rank` dims go through
//! `kv_a_layernorm` and `kv_b_proj` to each head's key part without position and its value,
//! and whose last `qk_rope_head_dim` dims are one rotated key part shared by all heads. A
//! query/key head is its part without position then its rotated part; q, k and v then meet in
//! the attention block (`ops::attention_block`, rotation done here, values of their own size).
//! The forward with a graph (evaluation, the autograd reference) and the taped forward with
//! its hand-written backward (training, `arch::backward`) compute the same values.

use super::backward::{norm_backward, proj, AdapterGrads, ProjTape};
use super::layers::{part, Proj};
use super::model::{Inputs, LoraCtx};
use super::{ArchSpec, LatentSpec, LATENT_NORM_EPS};
use crate::ops::attention::query_block;
use crate::ops::attention_block::{attention_block, attention_block_taped, BlockArgs, BlockTape};
use crate::ops::norm::rms_norm;
use crate::ops::rope_part::{rope_part, rope_part_backward};
use crate::util::phases::timed;
use candle_core::{DType, Result, Tensor, D};

/// How q is projected.
pub enum LatentQ {
    /// `q_proj` (no `q_lora_rank`).
    Full(Proj),
    /// `q_a_proj` → `q_a_layernorm` (weight) → `q_b_proj`.
    LowRank { a: Proj, norm: Tensor, b: Proj },
}

pub struct LatentAttention {
    pub q: LatentQ,
    pub kv_a: Proj,
    /// `kv_a_layernorm` weight `[kv_lora_rank]`.
    pub kv_norm: Tensor,
    pub kv_b: Proj,
    pub o: Proj,
}

/// The latent shape of `spec` (present for every latent-attention model).
fn shape(spec: &ArchSpec) -> Result<LatentSpec> {
    spec.latent
        .ok_or_else(|| candle_core::Error::Msg("latent attention without a latent spec".into()))
}

/// The attention block's arguments: q/k heads of `head_dim`, values of `v_head_dim`, the
/// rotation already done.
fn block_args<'a>(
    spec: &ArchSpec,
    layer: usize,
    inputs: &'a Inputs,
    dtype: DType,
) -> BlockArgs<'a> {
    let (b, s, nh) = (inputs.batch, inputs.seq, spec.num_heads);
    BlockArgs {
        batch: b,
        seq: s,
        heads: nh,
        kv_heads: nh,
        head_dim: spec.head_dim,
        v_head_dim: spec.v_head_dim(),
        norms: None,
        rotary: None,
        segments: &inputs.segments,
        samples: &inputs.samples,
        window: None,
        sinks: None,
        scale: spec.attention_scale,
        block: query_block(b, nh, s, dtype),
        memo: inputs.keep_attention.then(|| &inputs.attention[layer]),
    }
}

/// Keys `[N, heads·(nope + rope)]` from each head's part without position `[N, heads, nope]`
/// and the shared rotated part `[N, 1, rope]`.
fn keys(k_nope: &Tensor, k_rot: &Tensor, l: LatentSpec) -> Result<Tensor> {
    let (n, nh, _) = k_nope.dims3()?;
    let shared = k_rot.broadcast_as((n, nh, l.rope_dim))?;
    Tensor::cat(&[k_nope, &shared], 2)?.reshape((n, nh * (l.nope_dim + l.rope_dim)))
}

impl LatentAttention {
    /// q, k `[N, heads·(nope + rope)]` (rotated) and v `[N, heads·v]` of x `[N, H]`, with the
    /// rotary tables `[N, 1, rope]` of x's positions.
    pub(super) fn qkv(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        lora: &LoraCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let l = shape(spec)?;
        let (n, nh, r) = (x.dim(0)?, spec.num_heads, l.kv_lora_rank);
        let q = match &self.q {
            LatentQ::Full(p) => p.forward(x, lora)?,
            LatentQ::LowRank { a, norm, b } => b.forward(
                &rms_norm(&a.forward(x, lora)?, norm, LATENT_NORM_EPS)?,
                lora,
            )?,
        };
        let q = rope_part(
            &q.reshape((n, nh, spec.head_dim))?,
            cos,
            sin,
            part(spec, l.nope_dim),
        )?;
        let ckv = self.kv_a.forward(x, lora)?; // [N, r + rope]
        let c = rms_norm(&ckv.narrow(1, 0, r)?, &self.kv_norm, LATENT_NORM_EPS)?;
        let k_rot = ckv.narrow(1, r, l.rope_dim)?.reshape((n, 1, l.rope_dim))?;
        let k_rot = rope_part(&k_rot, cos, sin, part(spec, 0))?;
        let kv = self
            .kv_b
            .forward(&c, lora)?
            .reshape((n, nh, l.nope_dim + l.v_head_dim))?;
        let k = keys(&kv.narrow(2, 0, l.nope_dim)?, &k_rot, l)?;
        let v = kv
            .narrow(2, l.nope_dim, l.v_head_dim)?
            .contiguous()?
            .reshape((n, nh * l.v_head_dim))?;
        Ok((q.reshape((n, nh * spec.head_dim))?, k, v))
    }

    /// x `[N, H]` → `[N, H]` in decoder layer `layer`.
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        layer: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let dev = x.device();
        let (cos, sin) = &inputs.rope;
        let (q, k, v) = timed("attn: q/k/v projections", dev, || {
            self.qkv(spec, x, (cos, sin), lora)
        })?;
        let args = block_args(spec, layer, inputs, q.dtype());
        let ctx = timed("attn: attention", dev, || {
            attention_block(&q, &k, &v, &args)
        })?;
        timed("attn: o projection", dev, || self.o.forward(&ctx, lora))
    }

    /// [`Self::forward`]'s arithmetic without a graph, keeping its tape.
    pub(super) fn taped(
        &self,
        spec: &ArchSpec,
        layer: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<(Tensor, LatentTape)> {
        let l = shape(spec)?;
        let (n, nh, r) = (x.dim(0)?, spec.num_heads, l.kv_lora_rank);
        let (cos, sin) = &inputs.rope;
        let (q, q_tape) = match &self.q {
            LatentQ::Full(p) => {
                let (q, t) = proj(p, x, lora)?;
                (q, QTape::Full(t))
            }
            LatentQ::LowRank { a, norm, b } => {
                let (qa, at) = proj(a, x, lora)?;
                let (q, bt) = proj(b, &rms_norm(&qa, norm, LATENT_NORM_EPS)?, lora)?;
                (q, QTape::LowRank { a: at, qa, b: bt })
            }
        };
        let q = rope_part(
            &q.reshape((n, nh, spec.head_dim))?,
            cos,
            sin,
            part(spec, l.nope_dim),
        )?
        .reshape((n, nh * spec.head_dim))?;
        let (ckv, kv_a) = proj(&self.kv_a, x, lora)?;
        let c = ckv.narrow(1, 0, r)?.contiguous()?;
        let (kv, kv_b) = proj(
            &self.kv_b,
            &rms_norm(&c, &self.kv_norm, LATENT_NORM_EPS)?,
            lora,
        )?;
        let kv = kv.reshape((n, nh, l.nope_dim + l.v_head_dim))?;
        let k_rot = ckv.narrow(1, r, l.rope_dim)?.reshape((n, 1, l.rope_dim))?;
        let k = keys(
            &kv.narrow(2, 0, l.nope_dim)?,
            &rope_part(&k_rot, cos, sin, part(spec, 0))?,
            l,
        )?;
        let v = kv
            .narrow(2, l.nope_dim, l.v_head_dim)?
            .contiguous()?
            .reshape((n, nh * l.v_head_dim))?;
        let args = block_args(spec, layer, inputs, q.dtype());
        let (ctx, block) = attention_block_taped(&q, &k, &v, &args)?;
        let (out, o) = proj(&self.o, &ctx, lora)?;
        let tape = LatentTape {
            q: q_tape,
            kv_a,
            c,
            kv_b,
            qkv: [q, k, v],
            block,
            o,
        };
        Ok((out, tape))
    }
}

enum QTape {
    Full(ProjTape),
    /// `q_a_proj`'s tape and output (the norm's input), `q_b_proj`'s tape.
    LowRank {
        a: ProjTape,
        qa: Tensor,
        b: ProjTape,
    },
}

/// What latent attention's backward needs.
pub struct LatentTape {
    q: QTape,
    kv_a: ProjTape,
    /// The latent before `kv_a_layernorm`.
    c: Tensor,
    kv_b: ProjTape,
    /// The attention block's inputs.
    qkv: [Tensor; 3],
    block: BlockTape,
    o: ProjTape,
}

impl LatentTape {
    /// d(normed input) `[N, H]` for upstream `dy`.
    pub(super) fn backward(
        self,
        a: &LatentAttention,
        spec: &ArchSpec,
        (cos, sin): (&Tensor, &Tensor),
        dy: &Tensor,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        let l = shape(spec)?;
        let (nh, nope, rope, vd) = (spec.num_heads, l.nope_dim, l.rope_dim, l.v_head_dim);
        let dctx = self.o.backward(&a.o, dy, None, grads)?;
        let [q, k, v] = &self.qkv;
        let [dq, dk, dv] = self.block.backward(q, k, v, &dctx)?;
        drop((dctx, self.block));
        let n = dq.dim(0)?;
        let z = crate::ops::at_offset_zero;
        // Queries: the rotated part's transpose.
        let dq = rope_part_backward(
            &dq.reshape((n, nh, nope + rope))?,
            cos,
            sin,
            part(spec, nope),
        )?
        .reshape((n, nh * (nope + rope)))?;
        // Keys and values: each head's part without position and its value go back through
        // kv_b, the shared rotated part (summed over heads) to the latent's last dims.
        let dk = dk.reshape((n, nh, nope + rope))?;
        let dkv = Tensor::cat(&[&dk.narrow(2, 0, nope)?, &dv.reshape((n, nh, vd))?], 2)?
            .reshape((n, nh * (nope + vd)))?;
        let dk_rot = dk
            .narrow(2, nope, rope)?
            .to_dtype(DType::F32)?
            .sum_keepdim(D::Minus2)?
            .to_dtype(dk.dtype())?;
        let dk_rot = rope_part_backward(&z(&dk_rot)?, cos, sin, part(spec, 0))?;
        let dcn = self.kv_b.backward(&a.kv_b, &z(&dkv)?, None, grads)?;
        let dc = norm_backward(&self.c, &a.kv_norm, &dcn, LATENT_NORM_EPS)?;
        let dckv = Tensor::cat(&[&dc, &dk_rot.reshape((n, rope))?.to_dtype(dc.dtype())?], 1)?;
        let dx = self.kv_a.backward(&a.kv_a, &z(&dckv)?, None, grads)?;
        match (self.q, &a.q) {
            (QTape::Full(t), LatentQ::Full(p)) => t.backward(p, &z(&dq)?, Some(dx), grads),
            (QTape::LowRank { a: at, qa, b: bt }, LatentQ::LowRank { a: pa, norm, b: pb }) => {
                let dqan = bt.backward(pb, &z(&dq)?, None, grads)?;
                let dqa = norm_backward(&qa, norm, &dqan, LATENT_NORM_EPS)?;
                at.backward(pa, &dqa, Some(dx), grads)
            }
            _ => candle_core::bail!("latent attention backward: the tape is of another q"),
        }
    }
}
