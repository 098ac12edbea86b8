//! Llama 4's text shapes: the tiny one for CPU tests, Scout and Maverick.

use serde_json::{json, Value};

/// Every Llama 4 hook in four layers: dense and MoE layers alternating, rotary and NoPE layers
/// (`no_rope_layers`: 1 rotates) with the NoPE temperature growing every 8 positions, chunks of
/// 8 positions (shorter than the test lines) on the rotary layers, the L2 q/k norm, llama3 rope
/// scaling over 16 original positions (so that the 16 dims' frequencies fall in both its
/// smoothed and its scaled band).
pub(super) fn tiny_llama4() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
        "no_rope_layers": [1, 0, 0, 1], "attention_chunk_size": 8,
        "attn_temperature_tuning": true, "floor_scale": 8, "attn_scale": 0.1, "use_qk_norm": true,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "attention_bias": false, "tie_word_embeddings": false
    })
}

// The releases' text shapes: Scout's is transformers' `Llama4TextConfig` default (documented
// as meta-llama/Llama-4-Scout-17B-16E); Maverick's differences (128 experts on every other
// layer, no q/k norm) are the ones transformers' modeling code names. Rope scaling and token ids
// as Meta's releases are described; not read from the hub files here (no hub access). Every
// 4th layer is NoPE (`no_rope_layers` left to its default).

pub(super) fn llama4_scout() -> Value {
    json!({
        "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": true, "floor_scale": 8192, "attn_scale": 0.1, "use_qk_norm": true,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 10485760, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 202048,
        "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018
    })
}

/// Scout's layers with 128 experts on every other layer, no q/k norm and no rope scaling.
pub(super) fn llama4_maverick() -> Value {
    let mut c = llama4_scout();
    c["num_local_experts"] = 128.into();
    c["interleave_moe_layer_step"] = 2.into();
    c["use_qk_norm"] = false.into();
    c["rope_scaling"] = Value::Null;
    c["max_position_embeddings"] = 1048576.into();
    c
}
