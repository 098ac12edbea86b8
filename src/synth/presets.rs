//! Shapes of synthetic checkpoints. `tiny` exists for every architecture (CPU tests in
//! seconds); the named presets carry the published shapes of real models so that memory
//! estimates and benchmarks run at true size (`--layers N` cuts depth).

use super::presets_gpt_oss::{gpt_oss_120b, gpt_oss_20b, tiny_gpt_oss};
use super::presets_llama4::{llama4_maverick, llama4_scout, tiny_llama4};
use super::presets_qwen3_next::{
    qwen35_35b_a3b, qwen3_next_80b_a3b, tiny_qwen35_moe, tiny_qwen3_next,
};
use super::SynthError;
use crate::arch::ModelType;
use serde_json::{json, Value};

pub struct Preset {
    pub name: &'static str,
    pub model_type: ModelType,
    /// The architecture-specific config.json keys (everything but dtype; token ids where the
    /// preset keeps a release's own, else the synthetic tokenizer's).
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
        name: "tiny",
        model_type: ModelType::Glm4Moe,
        config: tiny_glm4_moe,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Glm4MoeLite,
        config: tiny_glm4_moe_lite,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::DeepseekV2,
        config: tiny_deepseek_v2,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::DeepseekV3,
        config: tiny_deepseek_v3,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::KimiK2,
        config: tiny_deepseek_v3,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::FlexOlmo,
        config: tiny_flex_olmo,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::MinimaxM2,
        config: tiny_minimax_m2,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Ernie45Moe,
        config: tiny_ernie45_moe,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::GraniteMoe,
        config: tiny_granitemoe,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::HunyuanV1Moe,
        config: tiny_hunyuan_v1_moe,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::GptOss,
        config: tiny_gpt_oss,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::GraniteMoeShared,
        config: tiny_granitemoeshared,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Llama4Text,
        config: tiny_llama4,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Qwen3Next,
        config: tiny_qwen3_next,
    },
    Preset {
        name: "tiny",
        model_type: ModelType::Qwen35MoeText,
        config: tiny_qwen35_moe,
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
    Preset {
        name: "glm-4.5-air",
        model_type: ModelType::Glm4Moe,
        config: glm45_air,
    },
    Preset {
        name: "glm-4.7-flash",
        model_type: ModelType::Glm4MoeLite,
        config: glm47_flash,
    },
    Preset {
        name: "deepseek-v2-lite",
        model_type: ModelType::DeepseekV2,
        config: deepseek_v2_lite,
    },
    Preset {
        name: "deepseek-v3",
        model_type: ModelType::DeepseekV3,
        config: deepseek_v3,
    },
    Preset {
        name: "kimi-k2",
        model_type: ModelType::KimiK2,
        config: kimi_k2,
    },
    Preset {
        name: "minimax-m2",
        model_type: ModelType::MinimaxM2,
        config: minimax_m2,
    },
    Preset {
        name: "ernie-4.5-21b-a3b",
        model_type: ModelType::Ernie45Moe,
        config: ernie45_21b_a3b,
    },
    Preset {
        name: "granite-3.1-1b-a400m",
        model_type: ModelType::GraniteMoe,
        config: granite_31_1b_a400m,
    },
    Preset {
        name: "gpt-oss-20b",
        model_type: ModelType::GptOss,
        config: gpt_oss_20b,
    },
    Preset {
        name: "gpt-oss-120b",
        model_type: ModelType::GptOss,
        config: gpt_oss_120b,
    },
    Preset {
        name: "llama4-scout",
        model_type: ModelType::Llama4Text,
        config: llama4_scout,
    },
    Preset {
        name: "llama4-maverick",
        model_type: ModelType::Llama4Text,
        config: llama4_maverick,
    },
    Preset {
        name: "qwen3-next-80b-a3b",
        model_type: ModelType::Qwen3Next,
        config: qwen3_next_80b_a3b,
    },
    Preset {
        name: "qwen3.5-35b-a3b",
        model_type: ModelType::Qwen35MoeText,
        config: qwen35_35b_a3b,
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

// The tiny shapes of the DeepSeek/GLM family have a dense first layer, group-limited routing
// where the family has it and a rotated part narrower than the head, so every hook of these
// architectures runs in seconds on the CPU.

fn tiny_glm4_moe() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "partial_rotary_factor": 0.5, "use_qk_norm": true, "attention_bias": true,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    })
}

fn tiny_glm4_moe_lite() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.8,
        "topk_method": "noaux_tc", "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
        "partial_rotary_factor": 1.0, "rope_interleave": true, "attention_bias": false,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    })
}

fn tiny_deepseek_v2() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": null, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "norm_topk_prob": false, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

fn tiny_deepseek_v3() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
        "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "rope_interleave": true,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

/// OLMo-2's post-norm layer, q/k norms over the whole projections, softmax top-k.
fn tiny_flex_olmo() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false,
        "max_position_embeddings": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

/// Heads wider than the hidden size (4 × 32 over 64), half of each rotated (`rotary_dim`; the
/// factor too, which is all transformers 5.17 reads), sigmoid routing with the correction bias.
fn tiny_minimax_m2() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rotary_dim": 16, "partial_rotary_factor": 0.5,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 2048, "rope_theta": 5000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false
    })
}

/// A dense first layer, summed shared experts, softmax routing with the correction bias, rotary
/// pairs of adjacent dims, tied embeddings (ERNIE's default).
fn tiny_ernie45_moe() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "moe_num_experts": 8, "moe_k": 2, "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
        "max_position_embeddings": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "use_bias": false, "tie_word_embeddings": true
    })
}

/// µP multipliers of the published shape's kind (the attention scale other than 1/√d; a
/// logits divisor under 1, as a random tied head's logits are otherwise too flat to learn from
/// in a few steps), top-k then softmax over the k, tied embeddings, experts fused on disk under
/// Granite's names.
fn tiny_granitemoe() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
        "residual_multiplier": 0.22, "logits_scaling": 0.5,
        "max_position_embeddings": 2048, "rope_theta": 1500000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": true
    })
}

/// Per-head q/k norms after the rotation, a linear router, the unrouted MLP beside the experts,
/// `moe_topk` per layer, the dynamic rope's `alpha` (Hunyuan-A13B's rope).
fn tiny_hunyuan_v1_moe() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 8, "moe_topk": [2, 2],
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

/// Granite MoE with its shared MLP (gate and up fused in `input_linear`) beside the experts.
fn tiny_granitemoeshared() -> Value {
    let mut c = tiny_granitemoe();
    c["shared_intermediate_size"] = 48.into();
    c
}

// Published shapes, as the models' hub config.json files give them.

fn glm45_air() -> Value {
    json!({
        "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "partial_rotary_factor": 0.5, "use_qk_norm": false, "attention_bias": true,
        "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 131072, "rope_theta": 1000000, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "vocab_size": 151552
    })
}

fn glm47_flash() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
        "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20,
        "q_lora_rank": 768, "kv_lora_rank": 512,
        "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "n_routed_experts": 64, "num_experts_per_tok": 4, "n_shared_experts": 1,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.8,
        "topk_method": "noaux_tc", "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 1.0, "rope_interleave": true, "attention_bias": false,
        "max_position_embeddings": 202752, "rope_theta": 1000000, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "vocab_size": 154880
    })
}

fn deepseek_v2_lite() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": null, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": false, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 102400
    })
}

fn deepseek_v3() -> Value {
    json!({
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 129280
    })
}

fn kimi_k2() -> Value {
    json!({
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
        "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": true, "routed_scaling_factor": 2.827,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 131072, "rope_theta": 50000.0, "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 163840
    })
}

fn minimax_m2() -> Value {
    json!({
        "hidden_size": 3072, "intermediate_size": 1536,
        "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
        "rotary_dim": 64, "num_local_experts": 256, "num_experts_per_tok": 8,
        "use_qk_norm": true, "qk_norm_type": "per_layer", "scoring_func": "sigmoid",
        "use_routing_bias": true,
        "max_position_embeddings": 196608, "rope_theta": 5000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "vocab_size": 200064
    })
}

fn ernie45_21b_a3b() -> Value {
    json!({
        "hidden_size": 2560, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4,
        "moe_num_experts": 64, "moe_k": 6, "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_layer_interval": 1,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "use_bias": false, "tie_word_embeddings": true, "vocab_size": 103424
    })
}

fn granite_31_1b_a400m() -> Value {
    json!({
        "hidden_size": 1024, "intermediate_size": 512,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
        "num_local_experts": 32, "num_experts_per_tok": 8,
        "embedding_multiplier": 12.0, "attention_multiplier": 0.015625,
        "residual_multiplier": 0.22, "logits_scaling": 6.0,
        "max_position_embeddings": 131072, "rope_theta": 1500000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": true, "vocab_size": 49155
    })
}
