//! Generation with a key/value cache (`moeq generate`): the same layers and weights as training
//! (frozen projections with their adapters, detached; MoE routing; q/k norms and rotary
//! embeddings as the architecture sets them), with attention written for a few new queries
//! against every cached key. Attention is transformers' eager arithmetic: scores and softmax in
//! f32, grouped-query heads sharing their key/value head.

use super::layers::{output_gate, swiglu_mlp, Attn, Layer, Mlp};
use super::model::{LoraCtx, Model};
use super::ArchSpec;
use crate::ops::embedding::TokenIds;
use candle_core::{DType, Result, Tensor};

/// Keys and values of every position seen so far, per layer: `[T, kv_heads, head_dim]`; for a
/// Gated DeltaNet layer, its state instead (`LinearAttention::step`).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions cached.
    pub len: usize,
}

impl Model {
    /// An empty cache for this model.
    pub fn kv_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.num_layers()],
            len: 0,
        }
    }

    /// The logits `[V]` (f32) after `ids`, which continue the sequence in `cache` (a prompt, or
    /// one new token); their keys and values join the cache.
    pub fn decode(&self, ids: &[u32], cache: &mut KvCache, lora: &LoraCtx) -> Result<Tensor> {
        let (n, start) = (ids.len(), cache.len);
        if n == 0 {
            candle_core::bail!("decode: no tokens");
        }
        if start + n > self.rope.max_positions {
            candle_core::bail!(
                "decode: {} positions, the model was set up for {}",
                start + n,
                self.rope.max_positions
            );
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            candle_core::bail!(
                "token id {t} outside the vocabulary of {}",
                self.spec.vocab_size
            );
        }
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let rope = self.rope.tables(&pos, self.dtype)?;
        let mask = causal_mask(n, start, (None, None), &self.device)?;
        // Sliding-window layers (gpt-oss) share one window, chunked layers (Llama 4) one size.
        let window = self.spec.attention_windows.iter().flatten().next();
        let window_mask = match window {
            Some(&w) => causal_mask(n, start, (Some(w), None), &self.device)?,
            None => None,
        };
        let chunk = self.spec.attention_chunks.iter().flatten().next();
        let chunk_mask = match chunk {
            Some(&c) => causal_mask(n, start, (None, Some(c)), &self.device)?,
            None => None,
        };
        let q_scale = self.nope_q_scale(&positions)?;
        let mut x = self.embed_ids(&TokenIds::new(ids, &self.device)?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let slot = &mut cache.layers[l];
            let mask = match (
                self.spec.attention_windows[l],
                self.spec.attention_chunks[l],
            ) {
                (Some(_), _) => window_mask.as_ref(),
                (None, Some(_)) => chunk_mask.as_ref(),
                (None, None) => mask.as_ref(),
            };
            let at = Position {
                layer: l,
                rope: &rope,
                mask,
                q_scale: q_scale.as_ref(),
            };
            x = layer.decode(&self.spec, &x, at, slot, lora, self)?;
        }
        cache.len += n;
        let h = self.final_norm(&x.narrow(0, n - 1, 1)?)?;
        h.matmul(&self.lm_head.t()?)?
            .to_dtype(DType::F32)?
            .squeeze(0)
    }
}

/// Where new tokens are: the decoder layer, and their positions' rotary tables, attention mask
/// and NoPE q factor.
struct Position<'a> {
    layer: usize,
    rope: &'a (Tensor, Tensor),
    mask: Option<&'a Tensor>,
    q_scale: Option<&'a Tensor>,
}

impl Layer {
    /// x `[n, H]` → `[n, H]` at `at`, appending the new keys and values to `slot`.
    fn decode(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        at: Position,
        slot: &mut Option<(Tensor, Tensor)>,
        lora: &LoraCtx,
        model: &Model,
    ) -> Result<Tensor> {
        let [attn_side, mlp_side] = self.sides(spec);
        let h = attn_side.input(x)?;
        let a = match &self.attn {
            Attn::Linear(linear) => linear.step(spec, &h, slot, lora)?,
            _ => self.attend_cached(spec, &h, &at, slot, lora)?,
        };
        let x = attn_side.join(x, &a)?;
        let h = mlp_side.input(&x)?;
        let m = match &self.mlp {
            Mlp::Dense(p) => swiglu_mlp(p, &h, lora)?,
            Mlp::Moe(moe) => {
                moe.forward(spec, &h, lora, model.exchange.as_deref(), &mut None)?
                    .0
            }
        };
        mlp_side.join(&x, &m)
    }

    /// The attention of the normed input h `[n, H]` over the cached keys and values and its
    /// own, which join `slot`.
    fn attend_cached(
        &self,
        spec: &ArchSpec,
        h: &Tensor,
        at: &Position,
        slot: &mut Option<(Tensor, Tensor)>,
        lora: &LoraCtx,
    ) -> Result<Tensor> {
        let (n, nh, kvh) = (h.dim(0)?, spec.num_heads, spec.num_kv_heads);
        let (cos, sin) = at.rope;
        let (q, k, v, gate) = self
            .attn
            .heads(spec, at.layer, h, (cos, sin), at.q_scale, lora)?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 0)?, Tensor::cat(&[&cv, &v], 0)?),
        };
        *slot = Some((k.clone(), v.clone()));
        let sinks = self.attn.sinks();
        let ctx = attend(&q, &k, &v, (at.mask, sinks), nh / kvh, spec.attention_scale)?
            .to_dtype(h.dtype())?;
        let width = nh * spec.v_head_dim();
        let ctx = output_gate(ctx.reshape((n, width))?, gate.as_ref())?;
        self.attn.o().forward(&ctx, lora)
    }
}

/// The additive causal mask `[1, n, T]` (T = start + n) of n new queries at positions
/// `start..start + n`, built once per call for every layer; with a `window`, a query sees only
/// the last `window` positions, itself included; with a `chunk` size, only the positions of its
/// own chunk (`⌊p / chunk⌋` equal). None when every query sees every key.
fn causal_mask(
    n: usize,
    start: usize,
    (window, chunk): (Option<usize>, Option<usize>),
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let t = start + n;
    let window = window.unwrap_or(usize::MAX);
    let chunk = chunk.unwrap_or(usize::MAX);
    if n == 1 && t <= window && t <= chunk {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let p = start + i;
                if j <= p && p - j < window && j / chunk == p / chunk {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (1, n, t), device).map(Some)
}

/// q `[n, heads, hd]` against k `[T, kv_heads, hd]` and v `[T, kv_heads, vd]` with the
/// causal `mask` and the heads' sink logits `[heads]` (gpt-oss: one more softmax column whose
/// probability is dropped), `groups` query heads per key/value head, softmax scale `scale` →
/// `[n, heads, vd]` in f32.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (mask, sinks): (Option<&Tensor>, Option<&Tensor>),
    groups: usize,
    scale: f64,
) -> Result<Tensor> {
    let nh = q.dim(1)?;
    let (t, kvh, _) = k.dims3()?;
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    // [nh, n, hd]
    let q = f(q)?.transpose(0, 1)?.contiguous()?;
    // Key/value head j serves query heads j·groups .. (j + 1)·groups.
    let heads = |x: &Tensor| -> Result<Tensor> {
        let d = x.dim(2)?;
        f(x)?
            .transpose(0, 1)? // [kvh, T, d]
            .unsqueeze(1)?
            .expand((kvh, groups, t, d))?
            .reshape((nh, t, d))
    };
    let (k, v) = (heads(k)?, heads(v)?);
    let mut scores = (q.matmul(&k.t()?)? * scale)?; // [nh, n, T]
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = match sinks {
        None => candle_nn::ops::softmax_last_dim(&scores)?,
        Some(s) => {
            let n = scores.dim(1)?;
            let column = f(s)?.reshape((nh, 1, 1))?.expand((nh, n, 1))?;
            let with_sink = Tensor::cat(&[&scores, &column], 2)?.contiguous()?;
            candle_nn::ops::softmax_last_dim(&with_sink)?
                .narrow(2, 0, t)?
                .contiguous()?
        }
    };
    probs.matmul(&v)?.transpose(0, 1) // [n, nh, hd]
}
