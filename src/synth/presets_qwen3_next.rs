//! Qwen3-Next's and Qwen3.5's text shapes: tiny ones for CPU tests, the published ones.

use serde_json::{json, Value};

/// Every hybrid hook in four layers: Gated DeltaNet layers 0 and 2 (two value heads per key
/// head), gated full attention on layers 1 and 3 with a quarter of each head rotated, a dense
/// layer (2) among the MoE ones, the gated shared expert.
pub(super) fn tiny_qwen3_next() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [2], "partial_rotary_factor": 0.25,
        "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

/// Qwen3.5's text model in four layers: split projections, every layer MoE, the layer kinds
/// given as `layer_types`.
pub(super) fn tiny_qwen35_moe() -> Value {
    json!({
        "hidden_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "num_experts": 8, "num_experts_per_tok": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                            "mrope_interleaved": true},
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

// The releases' shapes as Qwen describes them and transformers' config classes default to
// (Qwen3NextConfig's defaults are Qwen3-Next-80B-A3B's, Qwen3_5MoeTextConfig's are
// Qwen3.5-35B-A3B's); not read from the hub files here (no hub access).

pub(super) fn qwen3_next_80b_a3b() -> Value {
    json!({
        "hidden_size": 2048, "intermediate_size": 5120, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "num_experts": 512, "num_experts_per_tok": 10, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "partial_rotary_factor": 0.25,
        "max_position_embeddings": 262144, "rope_theta": 10000000.0, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936,
        "bos_token_id": 151643, "eos_token_id": 151645
    })
}

pub(super) fn qwen35_35b_a3b() -> Value {
    json!({
        "hidden_size": 2048, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
        "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "num_experts": 256, "num_experts_per_tok": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                            "mrope_interleaved": true},
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 248320
    })
}
