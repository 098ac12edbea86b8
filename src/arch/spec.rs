//! `ArchSpec`: everything the model code needs to know about an architecture, read from a
//! Hugging Face `config.json`. Architectures are rows of data (docs/ARCHITECTURE.md, decision 6): one
//! `ModelType` row says which config keys name what and which defaults apply; the model
//! implementation reads only the resulting spec.

use super::cfg::{
    attention_windows, glu, gpt_oss_rope, moe_layer_pattern, rope_spec, router_spec, shared_expert,
    text_part, Cfg,
};
use super::cfg_heads::{attention_scale, heads_dim, latent_spec, rotary};
pub use super::cfg_linear::{LinearAttnSpec, LinearProjections};
pub use super::cfg_llama4::NopeTemperature;
use super::rows::AttentionRow;
pub use super::rows::{supported_model_types, ModelType};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: missing 'model_type' (is this a Hugging Face config.json?)")]
    NoModelType { path: String },
    #[error("{path}: unsupported model_type '{found}' (supported: {supported})")]
    Unsupported {
        path: String,
        found: String,
        supported: String,
    },
    #[error("{path}: key '{key}' {problem}")]
    Key {
        path: String,
        key: String,
        problem: String,
    },
}

/// How q/k are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3).
    PerHead,
    /// RMSNorm over the whole q (or k) projection output (OLMoE).
    FullProjection,
    /// RMSNorm over each head's `head_dim` after the rotary embedding (Hunyuan).
    PerHeadAfterRotary,
    /// RMSNorm without a weight over each head after the rotation, on rotary layers only
    /// (Llama 4's `use_qk_norm`).
    L2AfterRotary,
}

impl QkNorm {
    /// Whether the norm comes after the rotation (Hunyuan, Llama 4).
    pub fn after_rotary(self) -> bool {
        matches!(self, QkNorm::PerHeadAfterRotary | QkNorm::L2AfterRotary)
    }
}

/// How the router turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// `softmax` over all experts (Qwen, Mixtral, OLMoE, DeepSeek-V2).
    Softmax,
    /// `sigmoid` per expert (DeepSeek-V3, GLM-4.5, GLM-4.7-Flash).
    Sigmoid,
}

pub use crate::ops::router::GroupScore;

/// Group-limited routing: the experts form `groups` equal groups, a token keeps its `keep`
/// best groups and chooses its top-k among their experts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GroupLimit {
    pub groups: usize,
    pub keep: usize,
    pub score: GroupScore,
}

/// The router: scores from the logits (in f32), the top-k choice (over the scores plus the
/// correction bias where there is one, within the kept groups where routing is group-limited),
/// then the chosen experts' scores as weights — renormalised to sum 1 when `renormalize` (qwen
/// `norm_topk_prob`, always for Mixtral) — times `scaling` (`routed_scaling_factor`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RouterSpec {
    pub top_k: usize,
    pub renormalize: bool,
    pub scoring: Scoring,
    /// `e_score_correction_bias [E]` (f32) added to the scores for the choice only.
    pub correction_bias: bool,
    pub group_limit: Option<GroupLimit>,
    pub scaling: f64,
    /// A bias added to the router's logits (gpt-oss: `mlp.router.bias`).
    pub logit_bias: bool,
    /// The routing weight multiplies the expert's input instead of its output, and the expert
    /// outputs are summed unweighted (Llama 4).
    pub weights_input: bool,
}

impl RouterSpec {
    /// Softmax then top-k, no groups or bias: what the fused router kernel computes.
    pub fn is_plain_softmax(&self) -> bool {
        self.scoring == Scoring::Softmax && !self.correction_bias && self.group_limit.is_none()
    }
}

pub use crate::ops::rope::RopeSpec;
pub use crate::ops::swiglu::Glu;

/// The shared expert: a dense SwiGLU MLP added to every token's expert output — qwen2_moe's
/// (`mlp.shared_expert`) scaled by `sigmoid(shared_expert_gate(x))`, DeepSeek's and GLM's
/// (`mlp.shared_experts`, `n_shared_experts` experts as one MLP) summed as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SharedExpertSpec {
    pub intermediate_size: usize,
    pub gated: bool,
    /// The module under the decoder layer: `mlp.shared_expert`, `mlp.shared_experts`,
    /// `mlp.shared_mlp` or (Granite) `shared_mlp`.
    pub module: &'static str,
    /// Gate and up as one linear layer (`input_linear [2·I, H]`, gate rows first) and down as
    /// `output_linear` (Granite MoE's shared MLP); else `gate_proj`, `up_proj`, `down_proj`.
    pub fused: bool,
}

/// Which dims of a head the rotary embedding turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rotary {
    /// Rotated dims per head: the first `dim` of an ordinary head (`partial_rotary_factor`;
    /// equal to `head_dim` for most models), the `qk_rope_head_dim` part of a latent one.
    pub dim: usize,
    /// DeepSeek and ERNIE-4.5: the rotated pairs are adjacent dims `(2i, 2i + 1)`, and the
    /// rotated part comes out as its even dims then its odd dims (transformers'
    /// `apply_rotary_pos_emb_interleave`; ERNIE's keeps each pair in place, which permutes q and
    /// k alike and leaves every q·k as it is); otherwise the pairs are `(i, i + dim/2)`
    /// (`rotate_half`).
    pub interleaved: bool,
}

/// Granite's µP multipliers (docs: `ArchSpec::mup`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Mup {
    pub embedding: f64,
    pub residual: f64,
    pub logits: f64,
}

impl Mup {
    pub const NONE: Mup = Mup {
        embedding: 1.0,
        residual: 1.0,
        logits: 1.0,
    };
}

/// Multi-head latent attention (DeepSeek-V2): q from `q_proj`, or through the low-rank
/// `q_a_proj` → `q_a_layernorm` → `q_b_proj`; keys and values from one latent
/// `kv_a_proj_with_mqa` → (`kv_a_layernorm` on its first `kv_lora_rank` dims) → `kv_b_proj`,
/// plus one rotated key part shared by all heads. A query/key head is `nope_dim` dims without
/// position then `rope_dim` rotated dims; a value head is `v_head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LatentSpec {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub nope_dim: usize,
    pub rope_dim: usize,
    pub v_head_dim: usize,
}

/// The epsilon of the latent norms (`q_a_layernorm`, `kv_a_layernorm`): transformers builds
/// them with the RMSNorm default, not `rms_norm_eps`.
pub const LATENT_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ArchSpec {
    pub model_type: ModelType,
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// The query/key head size (`qk_nope_head_dim + qk_rope_head_dim` for latent attention).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeSpec,
    pub rotary: Rotary,
    /// The softmax scale: `head_dim^-1/2`, times YaRN's `mscale_all_dim` correction squared for
    /// latent attention.
    pub attention_scale: f64,
    pub latent: Option<LatentSpec>,
    pub qk_norm: QkNorm,
    /// Biases on q, k and v projections (qwen2_moe, or `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` where the arch applies it to o_proj).
    pub o_bias: bool,
    /// Clamp of q/k/v activations (OLMoE `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Granite's µP multipliers (1 elsewhere): the embeddings are scaled by `embedding`, each
    /// block's output by `residual` before it joins the residual stream, the logits divided by
    /// `logits` (`logits_scaling`).
    pub mup: Mup,
    /// OLMo-2's layer (FlexOlmo): each block's output is normed before it joins the residual
    /// stream (`post_attention_layernorm`, `post_feedforward_layernorm`), its input is not.
    pub post_norms: bool,
    /// Per layer: the sliding window of its attention (gpt-oss's `sliding_attention` layers: a
    /// query sees the last `w` positions, itself included), None for full attention.
    pub attention_windows: Vec<Option<usize>>,
    /// gpt-oss: a learned logit per query head joins each softmax's denominator
    /// (`self_attn.sinks [heads]`).
    pub attention_sinks: bool,
    /// Whether each layer turns q and k; the others (Llama 4's NoPE layers) attend without
    /// positions, q scaled by `nope_temperature` where set.
    pub rope_layers: Vec<bool>,
    pub nope_temperature: Option<NopeTemperature>,
    /// Llama 4's `attention_chunk_size` on its chunked layers: a query sees the keys of its own
    /// chunk of positions (`⌊p / size⌋` equal) up to itself.
    pub attention_chunks: Vec<Option<usize>>,
    /// gpt-oss: biases on the experts' projections (`gate_up_proj_bias [E, 2I]`,
    /// `down_proj_bias [E, H]`).
    pub expert_bias: bool,
    /// The gated activation of the experts' gate_up output (and of every MLP).
    pub glu: Glu,
    pub num_experts: usize,
    pub router: RouterSpec,
    /// Width of one expert's gate/up projection (`I` in `gate_up_proj [E, 2I, H]`).
    pub expert_intermediate_size: usize,
    pub shared_expert: Option<SharedExpertSpec>,
    /// Width of the MLP of dense (non-MoE) layers.
    pub dense_intermediate_size: usize,
    /// Per layer: true for an MoE block, false for a dense MLP.
    pub moe_layers: Vec<bool>,
    /// Multi-token-prediction layers stored after the decoder layers (`num_nextn_predict_layers`):
    /// not trained, their weights are skipped at load.
    pub mtp_layers: usize,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    /// The checkpoint's declared dtype (`torch_dtype` / `dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub initializer_range: f64,
    /// Where the text model's tensors sit in a multimodal checkpoint whose vision weights moeq
    /// does not read: names starting `.0` are stored starting `.1` instead — Llama 4's (`llama4`)
    /// under `language_model.`, Qwen3.5's (`qwen3_5_moe`) `model.` as `model.language_model.`.
    /// `("", "")` elsewhere.
    pub weights_prefix: (&'static str, &'static str),
    /// Qwen3-Next / Qwen3.5: the Gated DeltaNet layers' shapes, and per layer whether it is one
    /// (`cfg_linear`); the other layers attend in full.
    pub linear_attn: Option<LinearAttnSpec>,
    pub linear_layers: Vec<bool>,
    /// Full attention's output times `sigmoid(gate)`, the gate from q_proj's second half of
    /// each head (Qwen3-Next, Qwen3.5).
    pub attn_output_gate: bool,
    /// Zero-centred norm weights: the decoder's RMSNorms (layers', q/k's, the final one) scale
    /// by `1 + w` (Qwen3-Next, Qwen3.5). moeq adds the 1 once at load.
    pub norm_offset: bool,
}

impl ArchSpec {
    pub fn from_config_file(path: &Path) -> Result<ArchSpec, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: shown.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| SpecError::Json {
            path: shown.clone(),
            source,
        })?;
        ArchSpec::from_json(&value, &shown)
    }

    /// `path` is only used in messages.
    pub fn from_json(value: &Value, path: &str) -> Result<ArchSpec, SpecError> {
        let map = value.as_object().ok_or_else(|| SpecError::Key {
            path: path.to_string(),
            key: "<top level>".into(),
            problem: "must be a JSON object".into(),
        })?;
        let cfg = Cfg { path, map };
        let model_type_str = cfg
            .str_opt("model_type")?
            .ok_or_else(|| SpecError::NoModelType {
                path: path.to_string(),
            })?;
        if let outer @ ("llama4" | "qwen3_5_moe") = model_type_str.as_str() {
            return text_part(&cfg, outer);
        }
        let model_type =
            ModelType::parse(&model_type_str).ok_or_else(|| SpecError::Unsupported {
                path: path.to_string(),
                found: model_type_str.clone(),
                supported: supported_model_types(),
            })?;
        let row = model_type.row();

        let hidden_size = cfg.usize_req("hidden_size")?;
        let num_layers = cfg.usize_req("num_hidden_layers")?;
        let num_heads = cfg.usize_req("num_attention_heads")?;
        let latent = match row.attention {
            AttentionRow::Heads => None,
            AttentionRow::Latent => Some(latent_spec(&cfg)?),
        };
        let num_kv_heads = match latent {
            Some(_) => num_heads,
            None => cfg.usize_opt("num_key_value_heads")?.unwrap_or(num_heads),
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(cfg.err(
                "num_key_value_heads",
                format!("must divide num_attention_heads ({num_heads}), got {num_kv_heads}"),
            ));
        }
        let head_dim = match latent {
            Some(l) => l.nope_dim + l.rope_dim,
            None => heads_dim(&cfg, &row, hidden_size, num_heads)?,
        };
        let spelled = |key: &'static str, alias: Option<&'static str>| match alias {
            Some(a) if cfg.present(key).is_none() && cfg.present(a).is_some() => a,
            _ => key,
        };
        let experts_key = spelled(row.experts_key, row.experts_alias);
        let num_experts = cfg.usize_req(experts_key)?;
        let top_k_key = spelled(row.top_k_key, row.top_k_alias);
        let top_k = cfg.usize_uniform(top_k_key)?;
        if top_k > num_experts {
            return Err(cfg.err(
                top_k_key,
                format!("({top_k}) exceeds {experts_key} ({num_experts})"),
            ));
        }
        let expert_intermediate_size = cfg.usize_req(row.expert_intermediate_key)?;
        let dense_intermediate_size = cfg
            .usize_opt(row.dense_intermediate_key)?
            .unwrap_or(expert_intermediate_size);
        let router = router_spec(&cfg, &row, top_k, num_experts)?;
        let moe_layers = moe_layer_pattern(&cfg, &row, num_layers)?;
        let shared_expert = shared_expert(&cfg, &row, expert_intermediate_size)?;
        let attention_bias = row.reads_attention_bias
            && cfg.bool_or("attention_bias", row.default_attention_bias)?;
        let qkv_bias = if row.reads_qkv_bias {
            cfg.bool_or("qkv_bias", row.default_qkv_bias)?
        } else {
            attention_bias
        };
        if row.reads_use_bias && cfg.bool_or("use_bias", false)? {
            return Err(cfg.err(
                "use_bias",
                "true (biases on every projection and on lm_head) is not supported: published ERNIE-4.5 MoE checkpoints set it false",
            ));
        }
        let hidden_act = cfg.str_opt("hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(cfg.err(
                "hidden_act",
                format!("'{hidden_act}' is not supported (moeq implements SwiGLU experts: 'silu')"),
            ));
        }
        let torch_dtype = match cfg.str_opt("dtype")? {
            Some(d) => Some(d),
            None => cfg.str_opt("torch_dtype")?,
        };
        let architectures = match cfg.present("architectures") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        };
        let clip_qkv = if row.reads_clip_qkv {
            cfg.f64_opt("clip_qkv")?
        } else {
            None
        };
        let llama4 = match row.llama4_keys {
            true => Some(super::cfg_llama4::attention(&cfg, num_layers)?),
            false => None,
        };
        let qk_norm = if llama4.as_ref().is_some_and(|a| a.qk_norm) {
            QkNorm::L2AfterRotary
        } else if row.reads_use_qk_norm && cfg.bool_or("use_qk_norm", false)? {
            QkNorm::PerHead
        } else {
            row.qk_norm
        };
        let (linear_attn, linear_layers) = match row.hybrid {
            Some(p) => {
                let (l, layers) = super::cfg_linear::linear_attention(&cfg, num_layers, p)?;
                (Some(l), layers)
            }
            None => (None, vec![false; num_layers]),
        };
        let mut rope = rope_spec(&cfg, row.default_rope_theta)?;
        if row.gpt_oss_keys {
            gpt_oss_rope(&cfg, &mut rope);
        }
        if !row.hunyuan_keys {
            // transformers reads a dynamic rope's `alpha` for Hunyuan only.
            rope.extra.remove("alpha");
        }
        let rotary = rotary(&cfg, &row, &rope, head_dim, latent)?;
        let (mup, attention_scale) = match row.reads_mup {
            false => (
                Mup::NONE,
                attention_scale(&rope, head_dim, latent.is_some()),
            ),
            true => {
                let m = |key: &str| -> Result<f64, SpecError> {
                    match cfg.f64_opt(key)?.unwrap_or(1.0) {
                        v if v > 0.0 && v.is_finite() => Ok(v),
                        v => Err(cfg.err(key, format!("must be a positive number, got {v}"))),
                    }
                };
                let mup = Mup {
                    embedding: m("embedding_multiplier")?,
                    residual: m("residual_multiplier")?,
                    logits: m("logits_scaling")?,
                };
                (mup, m("attention_multiplier")?)
            }
        };

        let spec = ArchSpec {
            model_type,
            architectures,
            vocab_size: cfg.usize_req("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: cfg
                .usize_opt("max_position_embeddings")?
                .unwrap_or(row.default_max_positions),
            rms_norm_eps: cfg.f64_opt("rms_norm_eps")?.unwrap_or(row.default_eps),
            rope,
            rotary,
            attention_scale,
            latent,
            qk_norm,
            qkv_bias,
            o_bias: attention_bias && row.o_bias_follows,
            clip_qkv,
            post_norms: row.post_norms,
            attention_windows: attention_windows(&cfg, &row, num_layers)?,
            attention_sinks: row.gpt_oss_keys,
            rope_layers: llama4
                .as_ref()
                .map_or_else(|| vec![true; num_layers], |a| a.rope_layers.clone()),
            nope_temperature: llama4.as_ref().and_then(|a| a.temperature),
            attention_chunks: llama4
                .as_ref()
                .map_or_else(|| vec![None; num_layers], |a| a.chunks.clone()),
            expert_bias: row.gpt_oss_keys,
            glu: glu(&cfg, &row)?,
            mup,
            num_experts,
            router,
            expert_intermediate_size,
            shared_expert,
            dense_intermediate_size,
            moe_layers,
            mtp_layers: cfg.usize_opt("num_nextn_predict_layers")?.unwrap_or(0),
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", row.default_tie)?,
            hidden_act,
            torch_dtype,
            bos_token_id: cfg.ids("bos_token_id")?.first().copied(),
            eos_token_ids: cfg.ids("eos_token_id")?,
            pad_token_id: cfg.ids("pad_token_id")?.first().copied(),
            initializer_range: cfg.f64_opt("initializer_range")?.unwrap_or(0.02),
            weights_prefix: ("", ""),
            linear_attn,
            linear_layers,
            attn_output_gate: row.hybrid.is_some(),
            norm_offset: row.hybrid.is_some(),
        };
        Ok(spec)
    }

    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.iter().filter(|m| **m).count()
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The name of MoE layer `layer`'s `e_score_correction_bias`: on the router
    /// (`mlp.gate.…`, DeepSeek, GLM) or on the MoE block (`mlp.…`, MiniMax-M2).
    pub fn correction_bias_name(&self, layer: usize) -> String {
        let owner = self.model_type.row().router.bias_owner;
        format!("model.layers.{layer}.{owner}.e_score_correction_bias")
    }

    /// The correction bias's stored shape: `[E]`, or `[1, E]` (ERNIE-4.5's statistics).
    pub fn correction_bias_shape(&self) -> Vec<usize> {
        match self.model_type.row().router.bias_owner {
            "mlp.gate.moe_statics" => vec![1, self.num_experts],
            _ => vec![self.num_experts],
        }
    }

    /// The norm weights of decoder layer `layer`: the one on the attention block's side and the
    /// one on the MLP's (before each block, or after it where `post_norms`).
    pub fn layer_norm_names(&self, layer: usize) -> [String; 2] {
        let p = format!("model.layers.{layer}");
        match self.post_norms {
            false => [
                format!("{p}.input_layernorm.weight"),
                format!("{p}.post_attention_layernorm.weight"),
            ],
            true => [
                format!("{p}.post_attention_layernorm.weight"),
                format!("{p}.post_feedforward_layernorm.weight"),
            ],
        }
    }

    /// The text model's name of an on-disk tensor of a multimodal checkpoint stored under
    /// `weights_prefix`; None for a tensor not under it (stored under its own name, as Qwen3.5's
    /// `lm_head.weight`, or outside the text model).
    pub fn text_name(&self, on_disk: &str) -> Option<String> {
        let (text, disk) = self.weights_prefix;
        on_disk
            .strip_prefix(disk)
            .map(|rest| format!("{text}{rest}"))
    }

    /// A value head's size (`v_head_dim` for latent attention).
    pub fn v_head_dim(&self) -> usize {
        self.latent.map_or(self.head_dim, |l| l.v_head_dim)
    }
}
