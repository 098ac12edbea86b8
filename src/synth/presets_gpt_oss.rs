//! gpt-oss's shapes: the tiny one for CPU tests and the two releases.

use serde_json::{json, Value};

/// A sliding window shorter than the test lines, sinks, biases everywhere, gpt-oss's rope.
pub(super) fn tiny_gpt_oss() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 12,
        "swiglu_limit": 7.0, "attention_bias": true,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": false, "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "rope_theta": 150000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    })
}

// The releases, as their hub config.json files give them.

fn gpt_oss(layers: usize, experts: usize) -> Value {
    let types: Vec<&str> = (0..layers)
        .map(|l| match l % 2 {
            0 => "sliding_attention",
            _ => "full_attention",
        })
        .collect();
    json!({
        "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
        "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8,
        "num_local_experts": experts, "num_experts_per_tok": 4, "experts_per_token": 4,
        "layer_types": types, "sliding_window": 128, "swiglu_limit": 7.0, "attention_bias": true,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": false, "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "rope_theta": 150000, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "vocab_size": 201088
    })
}

pub(super) fn gpt_oss_20b() -> Value {
    gpt_oss(24, 32)
}

pub(super) fn gpt_oss_120b() -> Value {
    gpt_oss(36, 128)
}
