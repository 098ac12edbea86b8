//! Llama 4's config keys as transformers 5.17's `Llama4TextConfig` reads them: the defaults
//! (every 4th layer NoPE, chunked attention on the others, MoE layers by
//! `interleave_moe_layer_step`), explicit lists, the multimodal wrapper, and one-line errors for
//! values that do not fit.

mod common;
use common::{spec_error as error, spec_of as spec};
use moeq::arch::{ModelType, QkNorm};
use serde_json::{json, Value};

fn base() -> Value {
    json!({
        "model_type": "llama4_text", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 16, "intermediate_size_mlp": 48, "num_local_experts": 4,
        "num_experts_per_tok": 1
    })
}

fn with(changes: Value) -> Value {
    let mut v = base();
    for (k, x) in changes.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn defaults_follow_llama4_text_config() {
    let s = spec(&base());
    let rope: Vec<bool> = (0..8).map(|l| (l + 1) % 4 != 0).collect();
    assert_eq!(s.rope_layers, rope);
    // Chunked attention (8,192) on the rotary layers, full attention on the NoPE ones.
    let chunks: Vec<Option<usize>> = rope.iter().map(|&r| r.then_some(8192)).collect();
    assert_eq!(s.attention_chunks, chunks);
    assert_eq!(s.moe_layers, vec![true; 8]);
    assert_eq!(s.qk_norm, QkNorm::L2AfterRotary);
    assert!(s.router.weights_input && s.router.top_k == 1 && !s.router.renormalize);
    let t = s.nope_temperature.unwrap();
    assert_eq!((t.scale, t.floor), (0.1, 8192));
    // 1 + 0.1·ln(1 + ⌊(p + 1)/8192⌋): 1 below position 8,191, then ln 2 steps.
    assert_eq!(t.at(8190), 1.0);
    assert!((t.at(8191) - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-7);
    assert_eq!(s.dense_intermediate_size, 48);
    assert_eq!(s.expert_intermediate_size, 16);
    assert!(s.rotary.interleaved);
    assert_eq!(s.weights_prefix, ("", ""));
}

#[test]
fn explicit_lists_and_switches() {
    let s = spec(&with(json!({
        "no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 1],
        "layer_types": ["full_attention", "chunked_attention", "full_attention", "chunked_attention",
                        "full_attention", "full_attention", "full_attention", "chunked_attention"],
        "attention_chunk_size": 16,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": false,
        "attn_temperature_tuning": false
    })));
    assert!(!s.rope_layers[2]);
    assert!(!s.rope_layers[6]);
    assert_eq!(s.attention_chunks[1], Some(16));
    assert_eq!(s.attention_chunks[0], None);
    assert_eq!(
        s.moe_layers,
        vec![false, true, false, true, false, true, false, true]
    );
    assert_eq!(s.qk_norm, QkNorm::None);
    assert!(s.nope_temperature.is_none());
    let s = spec(&with(
        json!({"moe_layers": [0, 5], "attention_chunk_size": null,
                               "attn_temperature_tuning": 4}),
    ));
    assert_eq!(s.moe_layers.iter().filter(|m| **m).count(), 2);
    assert!(s.moe_layers[0] && s.moe_layers[5]);
    assert_eq!(s.attention_chunks, vec![None; 8]);
    assert!(s.nope_temperature.is_some());
}

#[test]
fn the_multimodal_wrapper_reads_its_text_config() {
    let v = json!({"model_type": "llama4", "text_config": base(), "vision_config": {}});
    let s = spec(&v);
    assert_eq!(s.model_type, ModelType::Llama4Text);
    assert_eq!(s.weights_prefix, ("", "language_model."));
    assert_eq!(s.num_layers, 8);
    let e = error(&json!({"model_type": "llama4", "vision_config": {}}));
    assert!(e.contains("text_config") && !e.contains('\n'), "{e}");
}

#[test]
fn values_that_do_not_fit_are_one_line_errors() {
    for (change, key) in [
        (json!({"no_rope_layers": [1, 0]}), "no_rope_layers"),
        (
            json!({"no_rope_layers": [1, 1, 2, 1, 1, 1, 1, 1]}),
            "no_rope_layers",
        ),
        (json!({"layer_types": ["sliding_attention"]}), "layer_types"),
        (json!({"attention_chunk_size": 0}), "attention_chunk_size"),
        (json!({"moe_layers": [9]}), "moe_layers"),
        (
            json!({"interleave_moe_layer_step": 0}),
            "interleave_moe_layer_step",
        ),
        (
            json!({"no_rope_layer_interval": 0}),
            "no_rope_layer_interval",
        ),
        (json!({"floor_scale": 0}), "floor_scale"),
    ] {
        let e = error(&with(change.clone()));
        assert!(e.contains(key) && !e.contains('\n'), "{change}: {e}");
    }
}
