//! Qwen3-Next's (`qwen3_next`) and Qwen3.5's (`qwen3_5_moe_text`, and the multimodal
//! `qwen3_5_moe` around it) config keys as transformers 5.17's config classes read them: which
//! layers are Gated DeltaNet layers (`layer_types`, else every `full_attention_interval`-th
//! layer attends in full), the linear-attention shapes, the hybrid switches, one-line errors for
//! values that do not fit; the published shapes' sizes; which projections LoRA targets.

mod common;
use common::{moeq, spec_error as error, spec_of as spec};
use moeq::arch::{ArchSpec, LinearProjections, ModelType};
use moeq::lora::{Adapters, LoraSettings};
use moeq::synth::config_json;
use serde_json::{json, Value};

fn base(model_type: &str) -> Value {
    json!({
        "model_type": model_type, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 48, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8
    })
}

fn with(model_type: &str, changes: Value) -> Value {
    let mut v = base(model_type);
    for (k, x) in changes.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// `layer_types` of `linear` (true: `linear_attention`).
fn layer_types(linear: &[bool]) -> Value {
    let kind = |&l: &bool| match l {
        true => "linear_attention",
        false => "full_attention",
    };
    json!(linear.iter().map(kind).collect::<Vec<_>>())
}

#[test]
fn layer_kinds_come_from_layer_types_or_the_interval() {
    for model_type in ["qwen3_next", "qwen3_5_moe_text"] {
        // Default interval 4: layers 3 and 7 attend in full.
        let s = spec(&base(model_type));
        let every_4th: Vec<bool> = (0..8).map(|l| (l + 1) % 4 != 0).collect();
        assert_eq!(s.linear_layers, every_4th, "{model_type}");
        let s = spec(&with(model_type, json!({"full_attention_interval": 2})));
        assert_eq!(s.linear_layers, [true, false].repeat(4), "{model_type}");
        // An explicit list wins over the interval.
        let listed = [false, true, true, false, true, false, false, true];
        let s = spec(&with(
            model_type,
            json!({"layer_types": layer_types(&listed), "full_attention_interval": 2}),
        ));
        assert_eq!(s.linear_layers, listed, "{model_type}");
    }
}

#[test]
fn the_hybrid_switches_and_shapes_are_read() {
    let s = spec(&base("qwen3_next"));
    assert_eq!(s.model_type, ModelType::Qwen3Next);
    assert!(s.attn_output_gate && s.norm_offset);
    let l = s.linear_attn.unwrap();
    assert_eq!(
        (l.key_heads, l.value_heads, l.key_head_dim, l.value_head_dim),
        (2, 4, 8, 8)
    );
    assert_eq!(l.conv_kernel, 4, "linear_conv_kernel_dim defaults to 4");
    assert_eq!(
        (l.key_dim(), l.value_dim(), l.conv_dim(), l.group()),
        (16, 32, 64, 2)
    );
    assert_eq!(l.projections, LinearProjections::Grouped);
    // Partial rotary 0.25 by default and as given, flat or under `rope_parameters`.
    assert_eq!(s.rotary.dim, 16 / 4);
    let s = spec(&with("qwen3_next", json!({"partial_rotary_factor": 0.5})));
    assert_eq!(s.rotary.dim, 16 / 2);
    let q35 = with(
        "qwen3_5_moe_text",
        json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                                   "partial_rotary_factor": 0.25}}),
    );
    let s = spec(&q35);
    assert_eq!(s.model_type, ModelType::Qwen35MoeText);
    assert!(s.attn_output_gate && s.norm_offset);
    assert_eq!(s.rotary.dim, 16 / 4);
    assert_eq!(s.linear_attn.unwrap().projections, LinearProjections::Split);
    // Qwen3-Next follows `norm_topk_prob`; Qwen3.5 renormalises the top-k whatever it says.
    for (model_type, norm_topk_prob, renormalize) in [
        ("qwen3_next", true, true),
        ("qwen3_next", false, false),
        ("qwen3_5_moe_text", true, true),
        ("qwen3_5_moe_text", false, true),
    ] {
        let s = spec(&with(model_type, json!({"norm_topk_prob": norm_topk_prob})));
        assert_eq!(
            s.router.renormalize, renormalize,
            "{model_type}, norm_topk_prob {norm_topk_prob}"
        );
    }
    // Other types keep plain norms and ungated attention.
    let s = spec(&base("qwen3_moe"));
    assert!(!s.attn_output_gate && !s.norm_offset && s.linear_attn.is_none());
    assert_eq!(s.linear_layers, vec![false; 8]);
}

#[test]
fn values_that_do_not_fit_are_one_line_errors() {
    let seven = [true; 7];
    for (change, key) in [
        (
            json!({"linear_num_key_heads": 4, "linear_num_value_heads": 6}),
            "linear_num_value_heads",
        ),
        (json!({"linear_num_key_heads": 0}), "linear_num_key_heads"),
        (
            json!({"linear_conv_kernel_dim": 0}),
            "linear_conv_kernel_dim",
        ),
        (
            json!({"full_attention_interval": 0}),
            "full_attention_interval",
        ),
        (
            json!({"layer_types": ["linear_attention", "sliding_attention", "full_attention",
                                   "full_attention", "full_attention", "full_attention",
                                   "full_attention", "full_attention"]}),
            "layer_types",
        ),
        (json!({"layer_types": layer_types(&seven)}), "layer_types"),
        (json!({"layer_types": "linear_attention"}), "layer_types"),
    ] {
        for model_type in ["qwen3_next", "qwen3_5_moe_text"] {
            let e = error(&with(model_type, change.clone()));
            assert!(
                e.contains(key) && !e.contains('\n'),
                "{model_type} {change}: {e}"
            );
        }
    }
}

#[test]
fn the_multimodal_wrapper_reads_its_text_config() {
    let mut text = base("qwen3_5_moe_text");
    text.as_object_mut().unwrap().remove("model_type");
    let v = json!({"model_type": "qwen3_5_moe", "text_config": text, "vision_config": {}});
    let s = spec(&v);
    assert_eq!(s.model_type, ModelType::Qwen35MoeText);
    assert_eq!(s.weights_prefix, ("model.", "model.language_model."));
    assert_eq!(s.num_layers, 8);
    assert!(s.linear_attn.is_some() && s.attn_output_gate && s.norm_offset);
    assert_eq!(
        s.text_name("model.language_model.layers.0.linear_attn.in_proj_qkv.weight"),
        Some("model.layers.0.linear_attn.in_proj_qkv.weight".into())
    );
    assert_eq!(s.text_name("model.visual.blocks.0.attn.qkv.weight"), None);
    let e = error(&json!({"model_type": "qwen3_5_moe", "vision_config": {}}));
    assert!(e.contains("text_config") && !e.contains('\n'), "{e}");
    // A text_config that does not fit is named as such.
    let mut bad = text.clone();
    bad["linear_num_value_heads"] = json!(3);
    let e = error(&json!({"model_type": "qwen3_5_moe", "text_config": bad}));
    assert!(
        e.contains("text_config") && e.contains("linear_num_value_heads") && !e.contains('\n'),
        "{e}"
    );
}

/// Qwen publishes 80B total / 3B activated for Qwen3-Next-80B-A3B and 35B / 3B for
/// Qwen3.5-35B-A3B (that one the multimodal checkpoint, vision encoder included). Counted as
/// moeq counts every type (both embedding tables in "active"): 79.67B / 3.87B and 34.66B /
/// 3.45B; the "A3B" matches the count without both embedding tables (3.25B) for Qwen3-Next,
/// without the input embedding (2.95B) for Qwen3.5.
#[test]
fn inspect_gives_the_published_shapes_sizes() {
    use moeq::arch::Component::{Embedding, LmHead};
    let tmp = tempfile::tempdir().unwrap();
    for (arch, preset, total, active, line, linear) in [
        (
            ModelType::Qwen3Next,
            "qwen3-next-80b-a3b",
            79.0..82.0,
            2.8..4.0,
            "parameters  79.67B total, 3.87B active per token (3.56B without the input embedding, 3.25B without both embedding tables)",
            "linear      Gated DeltaNet on 36 of 48 layers (full attention with an output gate on the others): 16 key heads x 128, 32 value heads x 128, conv 4",
        ),
        (
            ModelType::Qwen35MoeText,
            "qwen3.5-35b-a3b",
            34.0..36.0,
            2.8..4.0,
            "parameters  34.66B total, 3.45B active per token (2.95B without the input embedding, 2.44B without both embedding tables)",
            "linear      Gated DeltaNet on 30 of 40 layers (full attention with an output gate on the others): 16 key heads x 128, 32 value heads x 128, conv 4",
        ),
    ] {
        let s = ArchSpec::from_json(&config_json(arch, preset, None, "bfloat16").unwrap(), "x")
            .unwrap();
        let (t, a) = (s.total_params(), s.active_params());
        let bare = s.active_params_without(&[Embedding, LmHead]);
        println!("{preset}: {t} total, {a} active, {bare} active without the embedding tables");
        let b = |n: u64| n as f64 / 1e9;
        assert!(total.contains(&b(t)), "{preset}: total {t}");
        assert!(active.contains(&b(a)), "{preset}: active {a}");
        let out = tmp.path().join(preset);
        let name = arch.as_str();
        let args = ["synth", "--arch", name, "--preset", preset, "--config-only"];
        let (code, _, err) = moeq(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
        assert_eq!(code, 0, "{err}");
        let (code, stdout, err) = moeq(&["inspect", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains(line), "{preset}: {stdout}");
        assert!(stdout.contains(linear), "{preset}: {stdout}");
    }
}

/// `all-linear` puts adapters on every projection of both kinds of layer: the Gated DeltaNet
/// input and output projections (as the checkpoint lays them out), and the gated full
/// attention's; never on the depthwise convolution (PEFT's `all-linear` takes `nn.Linear`
/// only), the decay parameters or the norms.
#[test]
fn all_linear_targets_the_linear_attention_projections() {
    for (arch, projections) in [
        (
            ModelType::Qwen3Next,
            &["in_proj_qkvz", "in_proj_ba", "out_proj"][..],
        ),
        (
            ModelType::Qwen35MoeText,
            &[
                "in_proj_qkv",
                "in_proj_z",
                "in_proj_b",
                "in_proj_a",
                "out_proj",
            ][..],
        ),
    ] {
        let c = config_json(arch, "tiny", None, "float32").unwrap();
        let s = ArchSpec::from_json(&c, "x").unwrap();
        assert_eq!(s.linear_layers, [true, false, true, false]);
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["all-linear".into()],
            target_parameters: vec![],
        };
        let a = Adapters::new(&s, settings, 1, &candle_core::Device::Cpu).unwrap();
        for l in [0, 2] {
            let mut got: Vec<&str> = a
                .linear
                .keys()
                .filter_map(|k| k.strip_prefix(&format!("model.layers.{l}.linear_attn.")))
                .collect();
            got.sort();
            let mut want = projections.to_vec();
            want.sort();
            assert_eq!(got, want, "{arch:?} layer {l}");
            assert!(!a
                .linear
                .contains_key(&format!("model.layers.{l}.self_attn.q_proj")));
        }
        for l in [1, 3] {
            for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                let name = format!("model.layers.{l}.self_attn.{p}");
                assert!(a.linear.contains_key(&name), "{arch:?}: {name}");
            }
        }
        // The out projection's adapter reads the value heads' width; q_proj's writes q and
        // its output gate.
        let out = &a.linear["model.layers.0.linear_attn.out_proj"];
        assert_eq!((out.a.dims(), out.b.dims()), (&[4, 32][..], &[64, 4][..]));
        let q = &a.linear["model.layers.1.self_attn.q_proj"];
        assert_eq!(q.b.dims(), &[2 * 4 * 16, 4]);
        for (name, _) in a.vars() {
            for left_out in ["conv1d", "A_log", "dt_bias", "norm"] {
                assert!(!name.contains(left_out), "{arch:?}: {name}");
            }
        }
    }
}

/// Targets that reach none of a hybrid model's linear-attention layers (the default q/k/v/o)
/// train, with a warning that names the projections to add; all-linear gets no warning.
#[test]
fn targets_missing_the_linear_attention_layers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, targets, warned) in [
        (
            "qwen3_5_moe_text",
            "[q_proj, k_proj, v_proj, o_proj]",
            Some("in_proj_qkv, in_proj_z"),
        ),
        (
            "qwen3_next",
            "[q_proj, o_proj]",
            Some("in_proj_qkvz, in_proj_ba, out_proj"),
        ),
        ("qwen3_5_moe_text", "all-linear", None),
    ] {
        let out = dir.path().join(format!("{arch}-{}", warned.is_some()));
        let config = format!(
            "base_model: synth://{arch}/tiny?seed=0\ndevice: cpu\nadapter: qlora\n\
             load_in_4bit: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: {targets}\n\
             datasets:\n  - path: synth://reverse?n=64\n    type: input_output\n\
             sequence_len: 32\nmicro_batch_size: 2\nmax_steps: 1\nlearning_rate: 1.0e-3\n\
             save_steps: 100\noutput_dir: {}\nseed: 0\n",
            out.display()
        );
        let path = dir.path().join(format!("{arch}-{}.yaml", warned.is_some()));
        std::fs::write(&path, config).unwrap();
        let (code, _, err) = moeq(&["train", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{arch}: {err}");
        let line = err.lines().find(|l| l.contains("linear-attention layers"));
        match warned {
            Some(names) => {
                let line = line.unwrap_or_else(|| panic!("{arch}: no warning in {err}"));
                assert!(
                    line.contains("none of this") && line.contains("2 linear-attention"),
                    "{line}"
                );
                assert!(
                    line.contains(names) && line.contains("2 full-attention"),
                    "{line}"
                );
            }
            None => assert!(line.is_none(), "{arch}: {line:?}"),
        }
    }
}
