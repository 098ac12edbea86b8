//! The model: one implementation for every `ArchSpec` (docs/ARCHITECTURE.md, decision 6).
//!
//! Frozen weights: attention, shared-expert, dense-MLP and expert projections are 4-bit
//! (`FrozenWeight::Nf4`, `ExpertStore::Nf4`, used through `nf4_linear` / `grouped_nf4`), or
//! unquantized in the compute dtype for a 16-bit base; embeddings, norms, router and
//! `lm_head` are dense in the compute dtype (bf16 on a GPU, f32 on the CPU). LoRA adapters
//! come in through `LoraCtx`, either live (gradients flow into them) or detached.
//!
//! Activations are token-major: a micro-batch of B rows × S tokens is `x: [N = B·S, H]`.

pub use super::inputs::Inputs;
use super::latent::{LatentAttention, LatentQ};
use super::layers::{Attention, Attn, Layer, Mlp, MlpProjs, Moe, Proj};
use super::linear_attn::{LinearAttention, LinearIn};
use super::spec::{LinearAttnSpec, LinearProjections};
use super::{ArchSpec, ExpertExchange, QkNorm};
use crate::lora::Adapters;
use crate::ops::embedding::Embedding;
use crate::ops::experts::{ExpertStore, ExpertWeights};
use crate::ops::nf4_linear::{FrozenWeight, Nf4Weight, Scales};
use crate::ops::norm::rms_norm;
use crate::ops::rope::Rope;
use crate::quant::frozen::{Frozen, FrozenBase};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::Arc;

/// How LoRA enters a forward pass.
pub struct LoraCtx<'a> {
    pub adapters: &'a Adapters,
    /// Gradients flow into the adapter `Var`s (the recompute pass); otherwise detached.
    pub live: bool,
    /// Dropout on linear targets: (seed, pass) keys the masks, so the recompute of a layer
    /// draws the same masks as its forward. None: no dropout (evaluation).
    pub dropout: Option<(u64, u64)>,
}

impl LoraCtx<'_> {
    pub fn weight(&self, v: &Var) -> Tensor {
        if self.live {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
}

/// What a layer's forward reports besides its output.
#[derive(Default, Clone)]
pub struct LayerStats {
    /// Tokens routed to each global expert (empty for dense layers).
    pub expert_tokens: Vec<u64>,
}

pub struct Model {
    pub spec: ArchSpec,
    pub dtype: DType,
    pub device: Device,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) final_norm: Tensor,
    pub(super) lm_head: Tensor,
    pub(super) rope: Rope,
    /// Set when experts are spread over processes: routed rows travel to their owners.
    pub(super) exchange: Option<Arc<dyn ExpertExchange>>,
}

struct Weights<'a> {
    base: &'a FrozenBase,
    dtype: DType,
    device: &'a Device,
}

impl Weights<'_> {
    fn dense(&self, name: &str) -> Result<Tensor> {
        self.dense_on(name, self.device)
    }

    fn dense_on(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self.base.tensors.get(name) {
            Some(Frozen::Dense(t)) => t.to_device(device)?.to_dtype(self.dtype),
            Some(Frozen::Quantized { .. } | Frozen::DenseExperts { .. }) => {
                candle_core::bail!("{name}: expected a dense tensor")
            }
            None => candle_core::bail!("{name}: missing from the checkpoint"),
        }
    }

    /// A dense tensor in f32 whatever the compute dtype (the router's correction bias, which
    /// transformers keeps in f32).
    fn dense_f32(&self, name: &str) -> Result<Tensor> {
        Weights {
            dtype: DType::F32,
            ..*self
        }
        .dense(name)
    }

    /// The held experts' biases `[held, out]` of expert parameter `name` (gpt-oss).
    fn expert_bias(
        &self,
        spec: &ArchSpec,
        name: &str,
        held: &std::ops::Range<usize>,
    ) -> Result<Option<Tensor>> {
        match spec.expert_bias {
            true => Ok(Some(self.dense(&format!("{name}_bias"))?.narrow(
                0,
                held.start,
                held.len(),
            )?)),
            false => Ok(None),
        }
    }

    /// A decoder RMSNorm's weight as moeq's norms apply it: `1 + w` for zero-centred weights
    /// (`ArchSpec::norm_offset`; the sum in f32, then rounded to the compute dtype).
    fn norm(&self, spec: &ArchSpec, name: &str) -> Result<Tensor> {
        match spec.norm_offset {
            false => self.dense(name),
            true => (self.dense_f32(name)? + 1.0)?.to_dtype(self.dtype),
        }
    }

    fn norm_opt(&self, spec: &ArchSpec, name: &str) -> Result<Option<Tensor>> {
        match self.base.tensors.get(name) {
            None => Ok(None),
            Some(_) => self.norm(spec, name).map(Some),
        }
    }

    /// A Gated DeltaNet layer's weights under module `m`.
    fn linear_attention(&self, m: &str, l: LinearAttnSpec) -> Result<LinearAttention> {
        let proj = |name: &str| self.proj(&format!("{m}.{name}"), false);
        let conv = self.dense(&format!("{m}.conv1d.weight"))?;
        Ok(LinearAttention {
            input: match l.projections {
                LinearProjections::Grouped => LinearIn::Grouped {
                    qkvz: proj("in_proj_qkvz")?,
                    ba: proj("in_proj_ba")?,
                },
                LinearProjections::Split => LinearIn::Split {
                    qkv: proj("in_proj_qkv")?,
                    z: proj("in_proj_z")?,
                    b: proj("in_proj_b")?,
                    a: proj("in_proj_a")?,
                },
            },
            conv: conv.reshape((l.conv_dim(), l.conv_kernel))?,
            a_log: self.dense(&format!("{m}.A_log"))?,
            dt_bias: self.dense(&format!("{m}.dt_bias"))?,
            norm: self.dense(&format!("{m}.norm.weight"))?,
            out: proj("out_proj")?,
        })
    }

    /// A frozen linear weight's values in the compute dtype (dequantized where 4-bit).
    fn linear_values(&self, name: &str) -> Result<Tensor> {
        match self.linear(name)? {
            FrozenWeight::Nf4(q) => q.dequantize(self.dtype),
            FrozenWeight::Dense(t) => Ok(t),
        }
    }

    /// A frozen linear weight: 4-bit, or dense for a 16-bit base.
    fn linear(&self, name: &str) -> Result<FrozenWeight> {
        match self.base.tensors.get(name) {
            Some(Frozen::Quantized { param, codes, .. }) => Ok(FrozenWeight::Nf4(
                Nf4Weight::from_param_codes(param, codes.as_ref(), self.device)?,
            )),
            Some(Frozen::Dense(_)) => Ok(FrozenWeight::Dense(self.dense(name)?)),
            Some(Frozen::DenseExperts { .. }) => {
                candle_core::bail!("{name}: expected a 2-D weight, found experts")
            }
            None => candle_core::bail!("{name}: missing from the checkpoint"),
        }
    }

    fn proj(&self, module: &str, bias: bool) -> Result<Proj> {
        Ok(Proj {
            name: module.to_string(),
            w: self.linear(&format!("{module}.weight"))?,
            bias: if bias {
                Some(self.dense(&format!("{module}.bias"))?)
            } else {
                None
            },
        })
    }

    /// The held experts of a 3-D expert parameter `[E, out, in]` as one stacked weight, and
    /// the first held expert.
    fn experts(&self, name: &str) -> Result<(ExpertWeights, usize)> {
        let (param, experts, codes) = match self.base.tensors.get(name) {
            Some(Frozen::Quantized {
                param,
                experts,
                codes,
            }) => (param, experts, codes),
            Some(Frozen::DenseExperts { weights, held }) => {
                let weights = weights.to_device(self.device)?.to_dtype(self.dtype)?;
                return Ok((ExpertWeights::dense(weights)?, held.start));
            }
            _ => candle_core::bail!("{name}: missing expert parameter"),
        };
        let [num, out, inp] = param.shape[..] else {
            candle_core::bail!("{name}: expected [E, out, in], got {:?}", param.shape);
        };
        let held = experts.clone().unwrap_or(0..num);
        let per = out * inp;
        let bs = param.settings.blocksize;
        if per % bs != 0 || per % 2 != 0 {
            candle_core::bail!(
                "{name}: one expert ({per} values) is not a whole number of {bs}-blocks"
            );
        }
        let (lo, hi) = (held.start, held.end);
        // The codes of the held experts only (only their slices were loaded), scales of all.
        let bytes = held.len() * per / 2;
        let packed = match codes {
            Some(c) if c.elem_count() == bytes => c.to_device(self.device)?,
            Some(c) => candle_core::bail!(
                "{name}: {} codes on the device for {} experts",
                c.elem_count(),
                held.len()
            ),
            None => Tensor::from_slice(&param.packed[..bytes], bytes, self.device)?,
        };

        Ok((
            ExpertWeights {
                store: ExpertStore::Nf4 {
                    packed,
                    absmax: Scales::from_absmax(
                        &param.absmax,
                        lo * per / bs..hi * per / bs,
                        self.device,
                    )?,
                    kind: param.settings.kind,
                    blocksize: bs,
                },
                num_experts: held.len(),
                out_features: out,
                in_features: inp,
                bias: None,
                glu: crate::ops::swiglu::Glu::Silu,
            },
            held.start,
        ))
    }
}

impl Model {
    /// Builds the model on `device` from a loaded frozen base.
    pub fn new(
        spec: &ArchSpec,
        base: &FrozenBase,
        dtype: DType,
        device: &Device,
        max_positions: usize,
    ) -> Result<Model> {
        if spec.hidden_act != "silu" {
            candle_core::bail!(
                "hidden_act '{}' is not supported (moeq implements silu)",
                spec.hidden_act
            );
        }
        let w = Weights {
            base,
            dtype,
            device,
        };
        let mut layers = Vec::with_capacity(spec.num_layers);
        let (qn, kn) = spec.model_type.qk_norm_names();
        // A weightless norm (Llama 4's L2 q/k norm) is a norm with unit weights.
        let unit = Tensor::ones(spec.head_dim, dtype, device)?;
        for l in 0..spec.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let attn = match (spec.latent, spec.linear_attn) {
                (_, Some(la)) if spec.linear_layers[l] => {
                    Attn::Linear(w.linear_attention(&format!("{p}.linear_attn"), la)?)
                }
                (None, _) => Attn::Heads(Attention {
                    q: w.proj(&format!("{a}.q_proj"), spec.qkv_bias)?,
                    k: w.proj(&format!("{a}.k_proj"), spec.qkv_bias)?,
                    v: w.proj(&format!("{a}.v_proj"), spec.qkv_bias)?,
                    o: w.proj(&format!("{a}.o_proj"), spec.o_bias)?,
                    q_norm: match spec.qk_norm {
                        QkNorm::L2AfterRotary => Some(unit.clone()),
                        _ => w.norm_opt(spec, &format!("{a}.{qn}.weight"))?,
                    },
                    k_norm: match spec.qk_norm {
                        QkNorm::L2AfterRotary => Some(unit.clone()),
                        _ => w.norm_opt(spec, &format!("{a}.{kn}.weight"))?,
                    },
                    sinks: match spec.attention_sinks {
                        true => Some(w.dense_f32(&format!("{a}.sinks"))?),
                        false => None,
                    },
                }),
                (Some(lat), _) => Attn::Latent(LatentAttention {
                    q: match lat.q_lora_rank {
                        None => LatentQ::Full(w.proj(&format!("{a}.q_proj"), false)?),
                        Some(_) => LatentQ::LowRank {
                            a: w.proj(&format!("{a}.q_a_proj"), spec.o_bias)?,
                            norm: w.dense(&format!("{a}.q_a_layernorm.weight"))?,
                            b: w.proj(&format!("{a}.q_b_proj"), false)?,
                        },
                    },
                    kv_a: w.proj(&format!("{a}.kv_a_proj_with_mqa"), spec.o_bias)?,
                    kv_norm: w.dense(&format!("{a}.kv_a_layernorm.weight"))?,
                    kv_b: w.proj(&format!("{a}.kv_b_proj"), false)?,
                    o: w.proj(&format!("{a}.o_proj"), spec.o_bias)?,
                }),
            };
            let mlp = if spec.moe_layers[l] {
                let (gate_up, first) = w.experts(&super::gate_up_name(l))?;
                let (down, _) = w.experts(&super::down_name(l))?;
                let held = first..first + gate_up.num_experts;
                let gate_up = gate_up.with(
                    w.expert_bias(spec, &super::gate_up_name(l), &held)?,
                    spec.glu,
                )?;
                let down_glu = down.glu;
                let down =
                    down.with(w.expert_bias(spec, &super::down_name(l), &held)?, down_glu)?;
                let shared = match spec.shared_expert {
                    None => None,
                    Some(s) => Some((
                        match s.fused {
                            false => MlpProjs::Split([
                                w.proj(&format!("{p}.{}.gate_proj", s.module), false)?,
                                w.proj(&format!("{p}.{}.up_proj", s.module), false)?,
                                w.proj(&format!("{p}.{}.down_proj", s.module), false)?,
                            ]),
                            true => MlpProjs::Fused([
                                w.proj(&format!("{p}.{}.input_linear", s.module), false)?,
                                w.proj(&format!("{p}.{}.output_linear", s.module), false)?,
                            ]),
                        },
                        // 4-bit as every linear weight; its values held dense ([1, H]).
                        if s.gated {
                            Some(w.linear_values(&format!("{p}.mlp.shared_expert_gate.weight"))?)
                        } else {
                            None
                        },
                    )),
                };
                let bias = spec.correction_bias_name(l);
                // A linear router (Hunyuan) is quantized with the other linear weights; its
                // values are the 4-bit ones, held dense (E × H is small).
                let (router, _) = spec.model_type.router_name(l);
                let router = w.linear_values(&router)?;
                Mlp::Moe(Moe {
                    router,
                    router_bias: match spec.router.logit_bias {
                        true => Some(w.dense(&format!("{p}.mlp.gate.bias"))?),
                        false => None,
                    },
                    correction_bias: match spec.router.correction_bias {
                        true => Some(w.dense_f32(&bias)?.flatten_all()?),
                        false => None,
                    },
                    gate_up_name: super::gate_up_name(l),
                    down_name: super::down_name(l),
                    gate_up,
                    down,
                    first_expert: first,
                    shared,
                })
            } else {
                Mlp::Dense([
                    w.proj(&format!("{p}.mlp.gate_proj"), false)?,
                    w.proj(&format!("{p}.mlp.up_proj"), false)?,
                    w.proj(&format!("{p}.mlp.down_proj"), false)?,
                ])
            };
            let [attn_norm, mlp_norm] = spec.layer_norm_names(l);
            layers.push(Layer {
                attn_norm: w.norm(spec, &attn_norm)?,
                mlp_norm: w.norm(spec, &mlp_norm)?,
                attn,
                mlp,
            });
        }
        // An untied input embedding is only gathered from: it stays in host memory (vocab × H,
        // 622 MB for Qwen3-30B-A3B; `ops::embedding`).
        let (embed, lm_head) = if spec.tie_word_embeddings {
            let table = w.dense("model.embed_tokens.weight")?;
            (Embedding::new(table.clone(), device)?, table)
        } else {
            let table = w.dense_on("model.embed_tokens.weight", &Device::Cpu)?;
            (Embedding::new(table, device)?, w.dense("lm_head.weight")?)
        };
        Ok(Model {
            spec: spec.clone(),
            dtype,
            device: device.clone(),
            rope: Rope::new(
                &spec.rope,
                spec.rotary.dim,
                spec.max_position_embeddings,
                max_positions,
                device,
            )?,
            embed,
            layers,
            final_norm: w.norm(spec, "model.norm.weight")?,
            lm_head,
            exchange: None,
        })
    }

    /// Routed rows go through `exchange` to the experts' holders and back. This model must
    /// hold exactly the experts `exchange.held()`.
    pub fn with_exchange(mut self, exchange: Arc<dyn ExpertExchange>) -> Result<Model> {
        let mine = exchange.held();
        for layer in &self.layers {
            if let Mlp::Moe(m) = &layer.mlp {
                let held = m.first_expert..m.first_expert + m.gate_up.num_experts;
                if held != mine {
                    candle_core::bail!(
                        "this model holds experts {held:?} but the exchange gives it {mine:?}"
                    );
                }
            }
        }
        self.exchange = Some(exchange);
        Ok(self)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `lm_head` weight [V, H] in the compute dtype.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// ids → x: [N, H] on the model's device (`ops::embedding`: on CUDA an untied table stays
    /// in page-locked host memory and the GPU gathers its rows; on the CPU rows are copied).
    pub fn embed(&self, inputs: &Inputs) -> Result<Tensor> {
        self.embed_ids(&inputs.ids)
    }

    /// The rows of `ids`, times Granite's `embedding_multiplier`.
    pub(super) fn embed_ids(&self, ids: &crate::ops::embedding::TokenIds) -> Result<Tensor> {
        let x = self.embed.rows(ids)?;
        match self.spec.mup.embedding {
            1.0 => Ok(x),
            m => x.affine(m, 0.0),
        }
    }

    /// Decoder layer `l`: x [N, H] → [N, H].
    pub fn layer(
        &self,
        l: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<(Tensor, LayerStats)> {
        self.layers[l].forward(l, &self.spec, x, inputs, lora, self.exchange.as_deref())
    }

    /// Decoder layer `l` without a graph, keeping what [`Model::layer_backward`] needs
    /// (`arch::backward`). The output equals `layer`'s.
    pub fn layer_taped(
        &self,
        l: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<(Tensor, LayerStats, super::LayerTape)> {
        let exchange = self.exchange.as_deref();
        let layer = &self.layers[l];
        let (out, stats, tape) =
            layer.forward_taped(l, &self.spec, x, inputs, lora, exchange, true)?;
        let out = out.ok_or_else(|| candle_core::Error::Msg(format!("layer {l}: no output")))?;
        Ok((out, stats, tape))
    }

    /// [`Model::layer_taped`]'s tape alone, for a backward that follows at once (the recompute):
    /// the layer's output and what only it needs (the routed experts' down projection and
    /// combine) are not computed. The tape equals `layer_taped`'s.
    pub fn layer_tape(
        &self,
        l: usize,
        x: &Tensor,
        inputs: &Inputs,
        lora: &LoraCtx,
    ) -> Result<super::LayerTape> {
        let exchange = self.exchange.as_deref();
        let layer = &self.layers[l];
        Ok(layer
            .forward_taped(l, &self.spec, x, inputs, lora, exchange, false)?
            .2)
    }

    /// Decoder layer `l`'s backward from its tape for upstream `g` = dL/d(output): dL/dx and
    /// the adapter gradients by factor.
    pub fn layer_backward(
        &self,
        l: usize,
        tape: super::LayerTape,
        g: &Tensor,
        lora: &LoraCtx,
    ) -> Result<(Tensor, super::AdapterGrads)> {
        self.layers[l].backward(&self.spec, tape, g, lora)
    }

    /// Final RMSNorm: x [N, H] → [N, H], divided by Granite's `logits_scaling` (the head is
    /// linear: dividing its input divides the logits).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm(x, &self.final_norm, self.spec.rms_norm_eps)?;
        match self.spec.mup.logits {
            1.0 => Ok(h),
            s => h.affine(1.0 / s, 0.0),
        }
    }

    /// The final norm's backward: dL/dx from its input x and dL/d(output) `dy`.
    pub fn final_norm_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let dy = match self.spec.mup.logits {
            1.0 => dy.clone(),
            s => dy.affine(1.0 / s, 0.0)?,
        };
        super::backward::norm_backward(x, &self.final_norm, &dy, self.spec.rms_norm_eps)
    }
}

#[cfg(test)]
mod send_sync {
    /// A model may be shared with other threads (as it could before expert parallelism went
    /// behind `ExpertExchange`): the compiler checks it.
    #[test]
    fn model_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Model>();
    }
}
