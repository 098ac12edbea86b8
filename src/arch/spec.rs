//! `ArchSpec`: everything the model code needs to know about an architecture, read from a
//! Hugging Face `config.json`. Architectures are rows of data (docs/ARCHITECTURE.md, decision 6): one
//! `ModelType` row says which config keys name what and which defaults apply; the model
//! implementation reads only the resulting spec.

use serde_json::{Map, Value};
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

/// The model families moeq implements. Adding one is a row in `ModelType::row` plus, at most,
/// a small hook in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    Qwen3Moe,
    Qwen2Moe,
    Mixtral,
    Olmoe,
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
}

/// Router: `softmax(logits)` over all experts, then top-k; weights renormalised to sum 1 when
/// `renormalize` (qwen `norm_topk_prob`, always for Mixtral).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RouterSpec {
    pub top_k: usize,
    pub renormalize: bool,
}

pub use crate::ops::rope::RopeSpec;

/// The shared expert of qwen2_moe: a dense SwiGLU MLP added to every token's expert output,
/// scaled by `sigmoid(shared_expert_gate(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SharedExpertSpec {
    pub intermediate_size: usize,
    pub gated: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ArchSpec {
    pub model_type: ModelType,
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeSpec,
    pub qk_norm: QkNorm,
    /// Biases on q, k and v projections (qwen2_moe, or `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` where the arch applies it to o_proj).
    pub o_bias: bool,
    /// Clamp of q/k/v activations (OLMoE `clip_qkv`).
    pub clip_qkv: Option<f64>,
    pub num_experts: usize,
    pub router: RouterSpec,
    /// Width of one expert's gate/up projection (`I` in `gate_up_proj [E, 2I, H]`).
    pub expert_intermediate_size: usize,
    pub shared_expert: Option<SharedExpertSpec>,
    /// Width of the MLP of dense (non-MoE) layers.
    pub dense_intermediate_size: usize,
    /// Per layer: true for an MoE block, false for a dense MLP.
    pub moe_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    /// The checkpoint's declared dtype (`torch_dtype` / `dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub initializer_range: f64,
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"];

/// One architecture as data: where its config.json keeps each quantity and what the
/// transformers config class defaults to when a key is absent.
struct Row {
    experts_key: &'static str,
    expert_intermediate_key: &'static str,
    default_norm_topk: bool,
    always_renormalize: bool,
    qk_norm: QkNorm,
    default_qkv_bias: bool,
    has_shared_expert: bool,
    has_sparse_step: bool,
    default_rope_theta: f64,
    default_eps: f64,
    default_max_positions: usize,
    /// Reads `attention_bias` (bias on q, k, v and o; Mixtral has no attention biases).
    reads_attention_bias: bool,
    /// Reads `qkv_bias` (q, k, v only; default `default_qkv_bias`), else they follow the above.
    reads_qkv_bias: bool,
    /// Reads `clip_qkv` (q, k, v clamped to ±clip after projection).
    reads_clip_qkv: bool,
    /// Other spellings transformers' `attribute_map` accepts for the expert count.
    experts_alias: Option<&'static str>,
}

impl ModelType {
    pub fn parse(s: &str) -> Option<ModelType> {
        match s {
            "qwen3_moe" => Some(ModelType::Qwen3Moe),
            "qwen2_moe" => Some(ModelType::Qwen2Moe),
            "mixtral" => Some(ModelType::Mixtral),
            "olmoe" => Some(ModelType::Olmoe),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Qwen3Moe => "qwen3_moe",
            ModelType::Qwen2Moe => "qwen2_moe",
            ModelType::Mixtral => "mixtral",
            ModelType::Olmoe => "olmoe",
        }
    }

    /// The class name transformers writes into `architectures`.
    pub fn architecture_class(self) -> &'static str {
        match self {
            ModelType::Qwen3Moe => "Qwen3MoeForCausalLM",
            ModelType::Qwen2Moe => "Qwen2MoeForCausalLM",
            ModelType::Mixtral => "MixtralForCausalLM",
            ModelType::Olmoe => "OlmoeForCausalLM",
        }
    }

    fn row(self) -> Row {
        match self {
            ModelType::Qwen3Moe => Row {
                experts_key: "num_experts",
                expert_intermediate_key: "moe_intermediate_size",
                default_norm_topk: false,
                always_renormalize: false,
                qk_norm: QkNorm::PerHead,
                default_qkv_bias: false,
                has_shared_expert: false,
                has_sparse_step: true,
                default_rope_theta: 10000.0,
                default_eps: 1e-6,
                default_max_positions: 32768,
                reads_attention_bias: true,
                reads_qkv_bias: false,
                reads_clip_qkv: false,
                experts_alias: Some("num_local_experts"),
            },
            ModelType::Qwen2Moe => Row {
                experts_key: "num_experts",
                expert_intermediate_key: "moe_intermediate_size",
                default_norm_topk: false,
                always_renormalize: false,
                qk_norm: QkNorm::None,
                default_qkv_bias: true,
                has_shared_expert: true,
                has_sparse_step: true,
                default_rope_theta: 10000.0,
                default_eps: 1e-6,
                default_max_positions: 32768,
                reads_attention_bias: false,
                reads_qkv_bias: true,
                reads_clip_qkv: false,
                experts_alias: None,
            },
            ModelType::Mixtral => Row {
                experts_key: "num_local_experts",
                expert_intermediate_key: "intermediate_size",
                default_norm_topk: true,
                always_renormalize: true,
                qk_norm: QkNorm::None,
                default_qkv_bias: false,
                has_shared_expert: false,
                has_sparse_step: false,
                default_rope_theta: 1e6,
                default_eps: 1e-5,
                default_max_positions: 131072,
                reads_attention_bias: false,
                reads_qkv_bias: false,
                reads_clip_qkv: false,
                experts_alias: Some("num_experts"),
            },
            ModelType::Olmoe => Row {
                experts_key: "num_experts",
                expert_intermediate_key: "intermediate_size",
                default_norm_topk: false,
                always_renormalize: false,
                qk_norm: QkNorm::FullProjection,
                default_qkv_bias: false,
                has_shared_expert: false,
                has_sparse_step: false,
                default_rope_theta: 10000.0,
                default_eps: 1e-5,
                default_max_positions: 4096,
                reads_attention_bias: true,
                reads_qkv_bias: false,
                reads_clip_qkv: true,
                experts_alias: Some("num_local_experts"),
            },
        }
    }
}

/// Typed access to config.json values with errors that name the file and key.
struct Cfg<'a> {
    path: &'a str,
    map: &'a Map<String, Value>,
}

impl Cfg<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> SpecError {
        SpecError::Key {
            path: self.path.to_string(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("must be a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize, SpecError> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| self.err(key, "is required"))?;
        if n == 0 {
            return Err(self.err(key, "must be at least 1, got 0"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, SpecError> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("must be true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<String>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("must be a string, got {v}"))),
        }
    }

    /// Token ids may be an integer or a list of integers (`eos_token_id: [1, 2]`).
    fn ids(&self, key: &str) -> Result<Vec<u32>, SpecError> {
        let bad = || self.err(key, "must be an integer or a list of integers");
        match self.present(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(bad)? as u32]),
        }
    }
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
        let model_type =
            ModelType::parse(&model_type_str).ok_or_else(|| SpecError::Unsupported {
                path: path.to_string(),
                found: model_type_str.clone(),
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            })?;
        let row = model_type.row();

        let hidden_size = cfg.usize_req("hidden_size")?;
        let num_layers = cfg.usize_req("num_hidden_layers")?;
        let num_heads = cfg.usize_req("num_attention_heads")?;
        let num_kv_heads = cfg.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(cfg.err(
                "num_key_value_heads",
                format!("must divide num_attention_heads ({num_heads}), got {num_kv_heads}"),
            ));
        }
        let head_dim = match cfg.usize_opt("head_dim")? {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_heads != 0 {
                    return Err(cfg.err(
                        "head_dim",
                        format!("is absent and hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads})"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        let experts_key = match row.experts_alias {
            Some(alias)
                if cfg.present(row.experts_key).is_none() && cfg.present(alias).is_some() =>
            {
                alias
            }
            _ => row.experts_key,
        };
        let num_experts = cfg.usize_req(experts_key)?;
        let top_k = cfg.usize_req("num_experts_per_tok")?;
        if top_k > num_experts {
            return Err(cfg.err(
                "num_experts_per_tok",
                format!("({top_k}) exceeds {experts_key} ({num_experts})"),
            ));
        }
        let expert_intermediate_size = cfg.usize_req(row.expert_intermediate_key)?;
        let dense_intermediate_size = cfg
            .usize_opt("intermediate_size")?
            .unwrap_or(expert_intermediate_size);
        let renormalize =
            row.always_renormalize || cfg.bool_or("norm_topk_prob", row.default_norm_topk)?;

        let moe_layers = moe_layer_pattern(&cfg, &row, num_layers)?;
        let shared_expert = if row.has_shared_expert {
            match cfg.usize_opt("shared_expert_intermediate_size")? {
                Some(i) if i > 0 => Some(SharedExpertSpec {
                    intermediate_size: i,
                    gated: true,
                }),
                _ => None,
            }
        } else {
            None
        };
        let attention_bias = row.reads_attention_bias && cfg.bool_or("attention_bias", false)?;
        let qkv_bias = if row.reads_qkv_bias {
            cfg.bool_or("qkv_bias", row.default_qkv_bias)?
        } else {
            attention_bias
        };
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
            rope: rope_spec(&cfg, row.default_rope_theta)?,
            qk_norm: row.qk_norm,
            qkv_bias,
            o_bias: attention_bias,
            clip_qkv,
            num_experts,
            router: RouterSpec { top_k, renormalize },
            expert_intermediate_size,
            shared_expert,
            dense_intermediate_size,
            moe_layers,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            hidden_act,
            torch_dtype,
            bos_token_id: cfg.ids("bos_token_id")?.first().copied(),
            eos_token_ids: cfg.ids("eos_token_id")?,
            pad_token_id: cfg.ids("pad_token_id")?.first().copied(),
            initializer_range: cfg.f64_opt("initializer_range")?.unwrap_or(0.02),
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
}

/// Which layers are MoE. Qwen: layer `l` is sparse iff it is not in `mlp_only_layers` and
/// `(l + 1) % decoder_sparse_step == 0`; Mixtral and OLMoE: every layer.
fn moe_layer_pattern(cfg: &Cfg, row: &Row, num_layers: usize) -> Result<Vec<bool>, SpecError> {
    if !row.has_sparse_step {
        return Ok(vec![true; num_layers]);
    }
    let step = cfg.usize_opt("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(cfg.err("decoder_sparse_step", "must be at least 1, got 0"));
    }
    let dense_only: Vec<usize> = match cfg.present("mlp_only_layers") {
        None => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| cfg.err("mlp_only_layers", "must be a list of layer indices"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(cfg.err("mlp_only_layers", "must be a list of layer indices")),
    };
    Ok((0..num_layers)
        .map(|l| !dense_only.contains(&l) && (l + 1) % step == 0)
        .collect())
}

/// Rope settings from transformers v5 `rope_parameters` or the older `rope_theta` +
/// `rope_scaling` keys (both appear in published config.json files).
fn rope_spec(cfg: &Cfg, default_theta: f64) -> Result<RopeSpec, SpecError> {
    const KINDS: &[&str] = &["default", "linear", "dynamic", "yarn", "llama3", "longrope"];
    let (key, params) = match (cfg.present("rope_parameters"), cfg.present("rope_scaling")) {
        (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
        (Some(_), _) => return Err(cfg.err("rope_parameters", "must be an object")),
        (None, Some(Value::Object(p))) => ("rope_scaling", Some(p)),
        (None, Some(_)) => return Err(cfg.err("rope_scaling", "must be an object or null")),
        (None, None) => ("rope_scaling", None),
    };
    let mut theta = cfg.f64_opt("rope_theta")?.unwrap_or(default_theta);
    let mut spec = RopeSpec {
        theta,
        rope_type: "default".into(),
        factor: None,
        original_max_position_embeddings: None,
        extra: Map::new(),
    };
    let Some(params) = params else {
        return Ok(spec);
    };
    for (k, v) in params {
        match k.as_str() {
            "rope_type" | "type" => {
                let kind = v.as_str().unwrap_or_default();
                if !KINDS.contains(&kind) {
                    return Err(cfg.err(
                        key,
                        format!(
                            "has unsupported rope type {v} (supported: {})",
                            KINDS.join(", ")
                        ),
                    ));
                }
                spec.rope_type = kind.to_string();
            }
            "rope_theta" => {
                theta = v
                    .as_f64()
                    .ok_or_else(|| cfg.err(key, "rope_theta must be a number"))?;
            }
            "factor" => {
                spec.factor = Some(
                    v.as_f64()
                        .ok_or_else(|| cfg.err(key, "factor must be a number"))?,
                );
            }
            "original_max_position_embeddings" => {
                spec.original_max_position_embeddings = Some(v.as_u64().ok_or_else(|| {
                    cfg.err(key, "original_max_position_embeddings must be an integer")
                })? as usize);
            }
            _ => {
                spec.extra.insert(k.clone(), v.clone());
            }
        }
    }
    spec.theta = theta;
    // A top-level original_max_position_embeddings (Phi-3 style) takes priority, as in
    // transformers' `standardize_rope_params`.
    if let Some(v) = cfg.present("original_max_position_embeddings") {
        if ["llama3", "yarn", "longrope"].contains(&spec.rope_type.as_str()) {
            spec.original_max_position_embeddings =
                Some(v.as_u64().ok_or_else(|| {
                    cfg.err("original_max_position_embeddings", "must be an integer")
                })? as usize);
        }
    }
    if spec.rope_type != "default" && spec.factor.is_none() {
        return Err(cfg.err(
            key,
            format!("rope type '{}' needs a 'factor'", spec.rope_type),
        ));
    }
    Ok(spec)
}
