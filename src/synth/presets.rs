//! Shapes of synthetic checkpoints. `tiny` exists for every architecture (CPU tests in
//! seconds); the named presets carry the published shapes of real models so that memory
//! estimates and benchmarks run at true size (`--layers N` cuts depth).

use super::SynthError;
use crate::arch::ModelType;
use serde_json::{json, Value};

pub struct Preset {
    pub name: &'static str,
    pub model_type: ModelType,
    /// The architecture-specific config.json keys (everything but token ids and dtype).
    pub config: fn() -> Value,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        model_type: ModelType::Qwen3Moe,
        config: tiny_qwen3,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Qwen2Moe,
        config: tiny_qwen2,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Mixtral,
        config: tiny_mixtral,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Olmoe,
        config: tiny_olmoe,
    },
    Preset {
        name: "qwen3-30b-a3b",
        model_type: ModelType::Qwen3Moe,
        config: qwen3_30b_a3b,
    },
    Preset {
        name: "qwen3-235b-a22b",
        model_type: ModelType::Qwen3Moe,
        config: qwen3_235b_a22b,
    },
    Preset {
        name: "qwen1.5-moe-a2.7b",
        model_type: ModelType::Qwen2Moe,
        config: qwen15_moe_a27b,
    },
    Preset {
        name: "mixtral-8x7b",
        model_type: ModelType::Mixtral,
        config: mixtral_8x7b,
    },
    Preset {
        name: "olmoe-1b-7b",
        model_type: ModelType::Olmoe,
        config: olmoe_1b_7b,
    },
];

pub fn find(model_type: ModelType, name: &str) -> Result<&'static Preset, SynthError> {
    if let Some(p) = PRESETS
        .iter()
        .find(|p| p.model_type == model_type && p.name == name)
    {
        return Ok(p);
    }
    let valid: Vec<&str> = PRESETS
        .iter()
        .filter(|p| p.model_type == model_type)
        .map(|p| p.name)
        .collect();
    let hint = match PRESETS.iter().find(|p| p.name == name) {
        Some(other) => format!(
            " ('{name}' is a {} preset: use --arch {})",
            other.model_type.as_str(),
            other.model_type.as_str()
        ),
        None => String::new(),
    };
    Err(SynthError::Usage(format!(
        "unknown preset '{name}' for {}: choose one of {}{hint}",
        model_type.as_str(),
        valid.join(", ")
    )))
}

fn tiny_qwen3() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

fn tiny_qwen2() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false,
        "decoder_sparse_step": 1, "mlp_only_layers": [1], "qkv_bias": true,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false
    })
}

fn tiny_mixtral() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "sliding_window": null, "tie_word_embeddings": false
    })
}

fn tiny_olmoe() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "attention_bias": false, "clip_qkv": null, "tie_word_embeddings": false
    })
}

fn qwen3_30b_a3b() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936
    })
}

fn qwen3_235b_a22b() -> Value {
    json!({
        "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936
    })
}

fn qwen15_moe_a27b() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": true,
        "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "vocab_size": 151936
    })
}

fn mixtral_8x7b() -> Value {
    json!({
        "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "sliding_window": null, "tie_word_embeddings": false, "vocab_size": 32000
    })
}

fn olmoe_1b_7b() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": false,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "attention_bias": false, "clip_qkv": null, "tie_word_embeddings": false, "vocab_size": 50304
    })
}
