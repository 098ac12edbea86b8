//! `model_config`: overrides of a base model's `config.json`, as axolotl applies them to the
//! transformers config before loading. A key is taken when moeq reads it and it keeps the
//! weights' shapes (rope settings, norm epsilon, top-k, ...); it is refused, with the reason,
//! when it would set the shape of a checkpoint tensor, when moeq does not read it (transformers
//! would then train another model than moeq), or when it asks for what moeq does not compute
//! (`output_router_logits: true`, the router's load-balancing loss). Settings that change
//! nothing in training (`use_cache`, ...) and values equal to the file's pass as they are.

use super::ModelDir;
use crate::arch::ArchSpec;
use serde_json::{Map, Value};

/// Keys whose value changes nothing moeq or transformers' training computes.
const NO_EFFECT: &[&str] = &[
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "attn_implementation",
    "_attn_implementation",
    "transformers_version",
    // Weighs the load-balancing loss, which only `output_router_logits: true` turns on.
    "router_aux_loss_coef",
];

/// What sets the shapes (and the presence) of the checkpoint's tensors.
fn weights(s: &ArchSpec) -> impl PartialEq + std::fmt::Debug {
    (
        (s.model_type, s.vocab_size, s.hidden_size, s.num_layers),
        (s.num_heads, s.num_kv_heads, s.head_dim, s.num_experts),
        (s.expert_intermediate_size, s.dense_intermediate_size),
        (s.shared_expert, s.moe_layers.clone()),
        (s.tie_word_embeddings, s.qkv_bias, s.o_bias, s.qk_norm),
    )
}

impl ModelDir {
    /// Applies `overrides` to this directory's config and spec; the keys taken, or every
    /// refused key's reason (one line each). Nothing changes when any key is refused.
    pub fn apply_overrides(
        &mut self,
        overrides: &Map<String, Value>,
    ) -> Result<Vec<String>, String> {
        let origin = format!(
            "{} (with model_config)",
            self.root.join("config.json").display()
        );
        let Value::Object(original) = &self.config_json else {
            return Err(format!("{origin}: config.json is not a JSON object"));
        };
        let mut problems = Vec::new();
        let mut taken = Vec::new();
        for (key, value) in overrides {
            match judge(&self.spec, original, key, value, &origin) {
                Ok(true) => taken.push(key.clone()),
                Ok(false) => {}
                Err(why) => problems.push(format!("model_config.{key}: {why}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let mut merged = original.clone();
        for (k, v) in overrides {
            merged.insert(k.clone(), v.clone());
        }
        let merged = Value::Object(merged);
        self.spec = ArchSpec::from_json(&merged, &origin).map_err(|e| e.to_string())?;
        self.config_json = merged;
        Ok(taken)
    }
}

/// Whether `key: value` changes what moeq computes (true), changes nothing (false), or why it
/// is refused.
fn judge(
    spec: &ArchSpec,
    original: &Map<String, Value>,
    key: &str,
    value: &Value,
    origin: &str,
) -> Result<bool, String> {
    if key == "output_router_logits" && value.as_bool() == Some(true) {
        return Err("true adds the router's load-balancing loss, which moeq does not compute; remove it (moeq trains on the language-model loss alone)".into());
    }
    let mut one = original.clone();
    one.insert(key.to_string(), value.clone());
    let changed = ArchSpec::from_json(&Value::Object(one), origin).map_err(|e| e.to_string())?;
    if weights(&changed) != weights(spec) {
        return Err(format!(
            "it sets the shape of the checkpoint's weights ({}), so it cannot be overridden",
            match original.get(key) {
                Some(v) => format!("{v} in config.json"),
                None => "absent from config.json".into(),
            }
        ));
    }
    if changed != *spec {
        return Ok(true);
    }
    let unchanged = match original.get(key) {
        Some(v) => v == value,
        // Absent: transformers' default, which for switches and rates is off.
        None => matches!(value, Value::Null | Value::Bool(false)) || value.as_f64() == Some(0.0),
    };
    if unchanged || NO_EFFECT.contains(&key) || key == "output_router_logits" {
        return Ok(false);
    }
    Err(format!(
        "moeq does not read '{key}' from config.json, so overriding it would change the model in transformers and nothing here; remove it from model_config"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir() -> (tempfile::TempDir, ModelDir) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let opts = crate::synth::SynthOptions {
            config_only: true,
            ..Default::default()
        };
        crate::synth::write(&opts, &out).unwrap();
        let d = ModelDir::open(&out).unwrap();
        (tmp, d)
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn settings_moeq_reads_are_taken() {
        let (_t, mut d) = dir();
        let before = d.spec.clone();
        let taken = d
            .apply_overrides(&map(
                json!({"rope_theta": 12345.0, "rms_norm_eps": 1e-5, "use_cache": false}),
            ))
            .unwrap();
        assert_eq!(
            taken,
            vec!["rope_theta".to_string(), "rms_norm_eps".to_string()]
        );
        assert_eq!(d.spec.rope.theta, 12345.0);
        assert_eq!(d.spec.rms_norm_eps, 1e-5);
        assert_eq!(d.config_json["rope_theta"], json!(12345.0));
        assert_eq!(
            (d.spec.hidden_size, d.spec.num_layers),
            (before.hidden_size, before.num_layers)
        );
    }

    #[test]
    fn shapes_unread_keys_and_the_aux_loss_are_refused_together() {
        let (_t, mut d) = dir();
        let before = d.spec.clone();
        let e = d
            .apply_overrides(&map(json!({
                "hidden_size": 4096,
                "attn_logit_softcapping": 30.0,
                "output_router_logits": true,
                "rope_theta": 99.0,
            })))
            .unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("model_config.hidden_size: it sets the shape")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("model_config.attn_logit_softcapping: moeq does not read")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("model_config.output_router_logits: true adds")),
            "{e}"
        );
        assert_eq!(d.spec, before, "nothing applied when a key is refused");
    }

    #[test]
    fn no_ops_pass() {
        let (_t, mut d) = dir();
        let theta = d.config_json["rope_theta"].clone();
        let taken = d
            .apply_overrides(&map(json!({
                "output_router_logits": false,
                "router_aux_loss_coef": 0.02,
                "rope_theta": theta,
                "attention_dropout": 0.0,
            })))
            .unwrap();
        assert!(taken.is_empty(), "{taken:?}");
    }
}
