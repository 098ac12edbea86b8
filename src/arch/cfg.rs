//! Reading config.json: typed values with errors that name the file and key, the rope
//! settings, which layers are MoE, the router and the shared expert.

use super::rows::{MoeLayers, Row, SharedRow};
use super::spec::{
    ArchSpec, Glu, GroupLimit, GroupScore, RopeSpec, RouterSpec, SharedExpertSpec, SpecError,
};
use serde_json::{Map, Value};

/// Typed access to config.json values with errors that name the file and key.
pub(super) struct Cfg<'a> {
    pub path: &'a str,
    pub map: &'a Map<String, Value>,
}

impl Cfg<'_> {
    pub(super) fn err(&self, key: &str, problem: impl Into<String>) -> SpecError {
        SpecError::Key {
            path: self.path.to_string(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// A list of `n` entries of `key` read by `entry`.
    pub(super) fn per_layer<T>(
        &self,
        key: &str,
        n: usize,
        what: &str,
        entry: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Array(items)) if items.len() == n => items
                .iter()
                .map(|v| {
                    entry(v)
                        .ok_or_else(|| self.err(key, format!("entries must be {what}, got {v}")))
                })
                .collect::<Result<Vec<T>, _>>()
                .map(Some),
            Some(_) => Err(self.err(
                key,
                format!("must be a list of {n} entries (num_hidden_layers), each {what}"),
            )),
        }
    }

    pub(super) fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("must be a non-negative integer, got {v}"))),
        }
    }

    pub(super) fn usize_req(&self, key: &str) -> Result<usize, SpecError> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| self.err(key, "is required"))?;
        if n == 0 {
            return Err(self.err(key, "must be at least 1, got 0"));
        }
        Ok(n)
    }

    /// A positive integer, or a list of them that are all equal (Hunyuan's per-layer
    /// `moe_topk`); required.
    pub(super) fn usize_uniform(&self, key: &str) -> Result<usize, SpecError> {
        let Some(Value::Array(items)) = self.present(key) else {
            return self.usize_req(key);
        };
        let values: Vec<u64> = items.iter().filter_map(Value::as_u64).collect();
        match values.first() {
            Some(&v) if v > 0 && values.len() == items.len() && values.iter().all(|&x| x == v) => {
                Ok(v as usize)
            }
            _ => Err(self.err(
                key,
                format!("must be a positive integer or a list of equal ones (moeq routes every layer alike), got {}", Value::Array(items.clone())),
            )),
        }
    }

    pub(super) fn f64_opt(&self, key: &str) -> Result<Option<f64>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a number, got {v}"))),
        }
    }

    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool, SpecError> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("must be true or false, got {v}"))),
        }
    }

    pub(super) fn str_opt(&self, key: &str) -> Result<Option<String>, SpecError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("must be a string, got {v}"))),
        }
    }

    /// Token ids may be an integer or a list of integers (`eos_token_id: [1, 2]`).
    pub(super) fn ids(&self, key: &str) -> Result<Vec<u32>, SpecError> {
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

/// Which layers are MoE, as the row says: Qwen's `decoder_sparse_step` and `mlp_only_layers`
/// (layer `l` is sparse iff it is not listed and `(l + 1) % step == 0`), DeepSeek's
/// `first_k_dense_replace` and `moe_layer_freq` (sparse iff `l >= k` and `l % freq == 0`),
/// GLM-4.7-Flash's `mlp_layer_types`, ERNIE-4.5's start, end and interval; Mixtral and OLMoE:
/// every layer.
pub(super) fn moe_layer_pattern(
    cfg: &Cfg,
    row: &Row,
    num_layers: usize,
) -> Result<Vec<bool>, SpecError> {
    match row.moe_layers {
        MoeLayers::All => Ok(vec![true; num_layers]),
        MoeLayers::SparseStep => sparse_step(cfg, num_layers),
        MoeLayers::FirstKDense { default_k } => {
            let k = cfg.usize_opt("first_k_dense_replace")?.unwrap_or(default_k);
            let freq = cfg.usize_opt("moe_layer_freq")?.unwrap_or(1);
            if freq == 0 {
                return Err(cfg.err("moe_layer_freq", "must be at least 1, got 0"));
            }
            Ok((0..num_layers).map(|l| l >= k && l % freq == 0).collect())
        }
        MoeLayers::Interval => {
            let start = cfg.usize_opt("moe_layer_start_index")?.unwrap_or(1);
            let interval = cfg.usize_opt("moe_layer_interval")?.unwrap_or(1);
            if interval == 0 {
                return Err(cfg.err("moe_layer_interval", "must be at least 1, got 0"));
            }
            // −1 (the default) is the last layer.
            let end = match cfg.present("moe_layer_end_index") {
                None => num_layers as i64 - 1,
                Some(v) => match v.as_i64() {
                    Some(-1) => num_layers as i64 - 1,
                    Some(e) if e >= 0 => e,
                    _ => {
                        return Err(cfg.err(
                            "moe_layer_end_index",
                            format!("must be a layer index or -1, got {v}"),
                        ))
                    }
                },
            };
            Ok((0..num_layers)
                .map(|l| (l + 1) % interval == 0 && l >= start && l as i64 <= end)
                .collect())
        }
        MoeLayers::InterleaveStep => super::cfg_llama4::moe_layers(cfg, num_layers),
        MoeLayers::LayerTypes => Ok(cfg
            .per_layer(
                "mlp_layer_types",
                num_layers,
                "\"dense\" or \"sparse\"",
                |v| match v.as_str() {
                    Some("sparse") => Some(true),
                    Some("dense") => Some(false),
                    _ => None,
                },
            )?
            .unwrap_or_else(|| (0..num_layers).map(|l| l > 0).collect())),
    }
}

fn sparse_step(cfg: &Cfg, num_layers: usize) -> Result<Vec<bool>, SpecError> {
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
pub(super) fn rope_spec(cfg: &Cfg, default_theta: f64) -> Result<RopeSpec, SpecError> {
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

/// Per layer: its attention's sliding window, None for full attention. gpt-oss reads
/// `layer_types` (`sliding_attention` / `full_attention`; when absent, sliding on even layers)
/// and `sliding_window` (128 when absent); every other type attends in full.
pub(super) fn attention_windows(
    cfg: &Cfg,
    row: &Row,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, SpecError> {
    if !row.gpt_oss_keys {
        return Ok(vec![None; num_layers]);
    }
    let window = match cfg.present("sliding_window") {
        None | Some(Value::Null) => 128,
        Some(v) => match v.as_u64() {
            Some(w) if w > 0 => w as usize,
            _ => {
                return Err(cfg.err(
                    "sliding_window",
                    format!("must be a positive integer, got {v}"),
                ))
            }
        },
    };
    let sliding = cfg
        .per_layer(
            "layer_types",
            num_layers,
            "\"sliding_attention\" or \"full_attention\"",
            |v| match v.as_str() {
                Some("sliding_attention") => Some(true),
                Some("full_attention") => Some(false),
                _ => None,
            },
        )?
        .unwrap_or_else(|| (0..num_layers).map(|l| l % 2 == 0).collect());
    Ok(sliding.into_iter().map(|s| s.then_some(window)).collect())
}

/// The experts' gated activation: gpt-oss's clamped GLU (`swiglu_limit`, 7 when absent; its
/// sigmoid's slope 1.702 is fixed in the model), SwiGLU elsewhere.
pub(super) fn glu(cfg: &Cfg, row: &Row) -> Result<Glu, SpecError> {
    if !row.gpt_oss_keys {
        return Ok(Glu::Silu);
    }
    match cfg.f64_opt("swiglu_limit")?.unwrap_or(7.0) {
        limit if limit > 0.0 && limit.is_finite() => Ok(Glu::Clamped {
            alpha: 1.702,
            limit: limit as f32,
        }),
        limit => Err(cfg.err(
            "swiglu_limit",
            format!("must be a positive number, got {limit}"),
        )),
    }
}

/// gpt-oss's rope when the config gives no scaling: yarn, factor 32 over 4096 positions
/// (transformers' `GptOssConfig` default).
pub(super) fn gpt_oss_rope(cfg: &Cfg, rope: &mut RopeSpec) {
    let given = ["rope_parameters", "rope_scaling"]
        .iter()
        .any(|k| cfg.present(k).is_some_and(|v| !v.is_null()));
    if given {
        return;
    }
    rope.rope_type = "yarn".into();
    rope.factor = Some(32.0);
    rope.original_max_position_embeddings = Some(4096);
    for (k, v) in [("beta_fast", 32.0), ("beta_slow", 1.0)] {
        rope.extra.insert(k.into(), v.into());
    }
    rope.extra.insert("truncate".into(), false.into());
}

pub(super) fn router_spec(
    cfg: &Cfg,
    row: &Row,
    top_k: usize,
    num_experts: usize,
) -> Result<RouterSpec, SpecError> {
    let r = row.router;
    let renormalize = r.always_renormalize
        || (r.reads_norm_topk && cfg.bool_or("norm_topk_prob", r.default_norm_topk)?);
    // A softmax router limits groups only under `topk_method: group_limited_greedy`.
    let grouped = match (r.groups, r.correction_bias) {
        (None, _) => None,
        (Some(score), true) => Some(score),
        (Some(score), false) => match cfg.str_opt("topk_method")?.as_deref() {
            None | Some("greedy") => None,
            Some("group_limited_greedy") => Some(score),
            Some(other) => {
                return Err(cfg.err(
                    "topk_method",
                    format!("'{other}' is not supported (greedy, group_limited_greedy)"),
                ))
            }
        },
    };
    let group_limit = match grouped {
        None => None,
        Some(score) => {
            let groups = cfg.usize_opt("n_group")?.unwrap_or(1).max(1);
            let keep = cfg.usize_opt("topk_group")?.unwrap_or(groups);
            if num_experts % groups != 0 || keep == 0 || keep > groups {
                return Err(cfg.err(
                    "n_group",
                    format!("{groups} groups keeping {keep} (topk_group) do not fit {num_experts} experts"),
                ));
            }
            if score == GroupScore::TopTwoSum && num_experts / groups < 2 {
                return Err(cfg.err(
                    "n_group",
                    format!("{groups} groups of {num_experts} experts: each needs at least 2"),
                ));
            }
            if keep * (num_experts / groups) < top_k {
                return Err(cfg.err(
                    "topk_group",
                    format!("{keep} of {groups} groups hold fewer experts than num_experts_per_tok ({top_k})"),
                ));
            }
            // Keeping every group is no limit.
            (keep < groups).then_some(GroupLimit {
                groups,
                keep,
                score,
            })
        }
    };
    let scaling = match r.reads_scaling {
        true => cfg.f64_opt("routed_scaling_factor")?.unwrap_or(1.0),
        false => 1.0,
    };
    Ok(RouterSpec {
        top_k,
        renormalize,
        scoring: r.scoring,
        correction_bias: r.correction_bias,
        group_limit,
        scaling,
        logit_bias: row.gpt_oss_keys,
        weights_input: row.llama4_keys,
    })
}

pub(super) fn shared_expert(
    cfg: &Cfg,
    row: &Row,
    expert_intermediate: usize,
) -> Result<Option<SharedExpertSpec>, SpecError> {
    Ok(match row.shared {
        SharedRow::None => None,
        SharedRow::Plain { module } => Some(SharedExpertSpec {
            intermediate_size: expert_intermediate,
            gated: false,
            module,
            fused: false,
        }),
        SharedRow::QwenGated => match cfg.usize_opt("shared_expert_intermediate_size")? {
            Some(i) if i > 0 => Some(SharedExpertSpec {
                intermediate_size: i,
                gated: true,
                module: "mlp.shared_expert",
                fused: false,
            }),
            _ => None,
        },
        SharedRow::Fused { module, size_key } => match cfg.usize_opt(size_key)?.unwrap_or(0) {
            0 => None,
            i => Some(SharedExpertSpec {
                intermediate_size: i,
                gated: false,
                module,
                fused: true,
            }),
        },
        SharedRow::Summed {
            count_key,
            default_count,
        } => match cfg.usize_opt(count_key)?.unwrap_or(default_count) {
            0 => None,
            n => Some(SharedExpertSpec {
                intermediate_size: expert_intermediate * n,
                gated: false,
                module: "mlp.shared_experts",
                fused: false,
            }),
        },
    })
}

/// The text model of a multimodal config (`llama4`, `qwen3_5_moe`), whose vision weights moeq
/// does not read: its `text_config` read as a `text_type` config, and where its tensors sit
/// (`ArchSpec::weights_prefix`).
pub(super) fn text_part(cfg: &Cfg, outer: &str) -> Result<ArchSpec, SpecError> {
    let (text_type, class, prefix) = match outer {
        "llama4" => ("llama4_text", "Llama4ForCausalLM", ("", "language_model.")),
        _ => (
            "qwen3_5_moe_text",
            "Qwen3_5MoeForCausalLM",
            ("model.", "model.language_model."),
        ),
    };
    let mut text = match cfg.present("text_config") {
        Some(Value::Object(t)) => t.clone(),
        _ => {
            return Err(cfg.err(
                "text_config",
                format!("is required for model_type '{outer}' (the text model moeq trains)"),
            ))
        }
    };
    text.insert("model_type".into(), Value::from(text_type));
    text.insert("architectures".into(), Value::from(vec![class]));
    let path = format!("{} (text_config)", cfg.path);
    let mut spec = ArchSpec::from_json(&Value::Object(text), &path)?;
    spec.weights_prefix = prefix;
    Ok(spec)
}
