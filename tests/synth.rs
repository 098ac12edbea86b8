//! Synthetic checkpoints: tokenizer round trips, preset shapes against published totals,
//! `synth://` resolution, and the `moeq synth` / `moeq inspect` commands end to end.

mod common;
use common::moeq;

use moeq::arch::{ArchSpec, ModelType};
use moeq::synth::{self, config_json, tokenizer, DiskLayout, SynthUri};

#[test]
fn tokenizer_is_a_real_byte_level_bpe_that_round_trips() {
    let tok = tokenizer::build(2048);
    let text = serde_json::to_string(&tok.json).unwrap();
    let t = tokenizers::Tokenizer::from_bytes(text.as_bytes()).expect("tokenizers loads it");
    assert_eq!(t.get_vocab_size(true), tokenizer::VOCAB_SIZE);
    let samples = [
        "The quick brown fox jumps over the lazy dog.",
        "Reverse the letters: planet -> tenalp",
        "  leading spaces, tabs\tand\nnew lines\r\n",
        "unicode: naïve café, 日本語, emoji 🙂, math ∑∫",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "",
    ];
    for s in samples {
        let enc = t.encode(s, false).unwrap();
        let ids = enc.get_ids();
        assert!(ids.iter().all(|&i| (i as usize) < tokenizer::VOCAB_SIZE));
        let back = t.decode(ids, false).unwrap();
        assert_eq!(back, s, "round trip of {s:?}");
    }
    // Merges were learned: common English compresses below one token per byte.
    let enc = t
        .encode("the history of the market and the robot", false)
        .unwrap();
    assert!(enc.get_ids().len() < 20, "{} tokens", enc.get_ids().len());
    // Special tokens are single ids.
    let enc = t.encode("<|im_start|>", false).unwrap();
    assert_eq!(enc.get_ids(), &[tok.im_start_id]);
}

#[test]
fn tokenizer_is_deterministic() {
    let a = serde_json::to_string(&tokenizer::build(128).json).unwrap();
    let b = serde_json::to_string(&tokenizer::build(128).json).unwrap();
    assert_eq!(a, b);
}

fn spec(arch: ModelType, preset: &str) -> ArchSpec {
    ArchSpec::from_json(
        &config_json(arch, preset, None, "bfloat16").unwrap(),
        "preset",
    )
    .unwrap()
}

#[test]
fn real_presets_match_published_parameter_counts() {
    use moeq::arch::Component::{Embedding, LmHead};
    // (arch, preset, total B, active B, tolerance on each in B, what the publisher leaves out
    // of "active"). Published figures are rounded (to 0.1B, or to 1B for the large models); the
    // tolerance covers the rounding and, for Mixtral, whether the embeddings are counted;
    // MiniMax-M2's "230B" is rounded to 10B (its safetensors hold 229B), ERNIE-4.5's "21B"
    // and "A3B" are cut to whole billions (21.8B).
    // Totals leave out the multi-token-prediction layers, as DeepSeek's 671B does.
    type Case<'a> = (
        ModelType,
        &'a str,
        f64,
        f64,
        f64,
        &'a [moeq::arch::Component],
    );
    let cases: [Case; 19] = [
        (ModelType::Qwen3Moe, "qwen3-30b-a3b", 30.5, 3.3, 0.2, &[]),
        (
            ModelType::Qwen3Moe,
            "qwen3-235b-a22b",
            235.0,
            22.0,
            1.0,
            &[],
        ),
        (
            ModelType::Qwen2Moe,
            "qwen1.5-moe-a2.7b",
            14.3,
            2.7,
            0.2,
            &[],
        ),
        (ModelType::Mixtral, "mixtral-8x7b", 46.7, 12.9, 0.2, &[]),
        (ModelType::Olmoe, "olmoe-1b-7b", 6.9, 1.3, 0.2, &[]),
        (
            ModelType::DeepseekV2,
            "deepseek-v2-lite",
            15.7,
            2.4,
            0.1,
            &[Embedding],
        ),
        (
            ModelType::DeepseekV3,
            "deepseek-v3",
            671.0,
            37.0,
            1.0,
            &[Embedding],
        ),
        (
            ModelType::Glm4Moe,
            "glm-4.5-air",
            106.0,
            12.0,
            1.0,
            &[Embedding, LmHead],
        ),
        (
            ModelType::Glm4MoeLite,
            "glm-4.7-flash",
            30.0,
            3.0,
            0.3,
            &[Embedding, LmHead],
        ),
        (ModelType::KimiK2, "kimi-k2", 1000.0, 32.0, 30.0, &[]),
        (ModelType::MinimaxM2, "minimax-m2", 230.0, 10.0, 1.5, &[]),
        (
            ModelType::Ernie45Moe,
            "ernie-4.5-21b-a3b",
            21.0,
            3.0,
            1.0,
            &[],
        ),
        (
            ModelType::GraniteMoe,
            "granite-3.1-1b-a400m",
            1.3,
            0.4,
            0.05,
            &[],
        ),
        // OpenAI counts active parameters without the input embedding.
        (
            ModelType::GptOss,
            "gpt-oss-20b",
            20.9,
            3.6,
            0.05,
            &[Embedding],
        ),
        (
            ModelType::GptOss,
            "gpt-oss-120b",
            116.8,
            5.1,
            0.05,
            &[Embedding],
        ),
        // Meta publishes 109B / 17B (Scout) and 400B / 17B (Maverick) for the multimodal
        // checkpoints, vision encoder included; the text models alone are 107.8B / 17.2B and
        // 400.7B / 17.2B (tests/llama4_files.rs).
        (
            ModelType::Llama4Text,
            "llama4-scout",
            107.8,
            17.2,
            0.05,
            &[],
        ),
        (
            ModelType::Llama4Text,
            "llama4-maverick",
            400.7,
            17.2,
            0.05,
            &[],
        ),
        // Qwen publishes 80B / 3B (Qwen3-Next-80B-A3B) and 35B / 3B (Qwen3.5-35B-A3B, the
        // multimodal checkpoint, vision encoder included); the text models count 79.67B /
        // 3.87B and 34.66B / 3.45B with both embedding tables (tests/qwen3_next_config.rs).
        (
            ModelType::Qwen3Next,
            "qwen3-next-80b-a3b",
            79.67,
            3.87,
            0.05,
            &[],
        ),
        (
            ModelType::Qwen35MoeText,
            "qwen3.5-35b-a3b",
            34.66,
            3.45,
            0.05,
            &[],
        ),
    ];
    for (arch, preset, total, active, tol, left_out) in cases {
        let s = spec(arch, preset);
        let t = s.total_params() as f64 / 1e9;
        let a = s.active_params_without(left_out) as f64 / 1e9;
        assert!(
            (t - total).abs() <= tol,
            "{preset}: total {t:.3}B vs {total}B"
        );
        assert!(
            (a - active).abs() <= tol,
            "{preset}: active {a:.3}B vs {active}B"
        );
    }
}

/// MiniMax-M2's hub config names its rotated dims `rotary_dim` (64 of 128) and no
/// `partial_rotary_factor`; its q/k norms span the whole projections; FlexOlmo norms each
/// block's output; ERNIE-4.5 picks its MoE layers by start, end and interval, keeps its
/// correction bias as `[1, E]` under the router's statistics, rotates adjacent pairs, ties its
/// embeddings unless told otherwise, and `use_bias: true` is refused by name; Hunyuan norms q
/// and k after the rotation, routes through a linear (quantized) router, takes a per-layer
/// `moe_topk` whose entries agree and `attention_head_dim` for a missing `head_dim`.
#[test]
fn later_grouped_query_specs_read_as_the_models_run() {
    use moeq::arch::QkNorm;
    let m = spec(ModelType::MinimaxM2, "minimax-m2");
    assert_eq!(
        (m.head_dim, m.rotary.dim, m.rotary.interleaved),
        (128, 64, false)
    );
    assert_eq!(m.qk_norm, QkNorm::FullProjection);
    assert!(m.router.correction_bias && m.router.renormalize && !m.post_norms);
    assert_eq!(
        m.correction_bias_name(3),
        "model.layers.3.mlp.e_score_correction_bias"
    );
    let e = spec(ModelType::Ernie45Moe, "ernie-4.5-21b-a3b");
    assert_eq!(e.moe_layers.iter().filter(|m| **m).count(), 27);
    assert!(!e.moe_layers[0] && e.rotary.interleaved && e.tie_word_embeddings);
    assert_eq!(e.correction_bias_shape(), vec![1, 64]);
    assert_eq!(
        e.correction_bias_name(1),
        "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"
    );
    assert_eq!(
        ModelType::Ernie45Moe.hub_name(&e.correction_bias_name(1)),
        Some("model.layers.1.mlp.moe_statics.e_score_correction_bias".into())
    );
    let mut c = config_json(ModelType::Ernie45Moe, "tiny", None, "float32").unwrap();
    c["moe_layer_interval"] = 2.into();
    c["moe_layer_end_index"] = 1.into();
    let every_other = ArchSpec::from_json(&c, "x").unwrap();
    assert_eq!(every_other.moe_layers, [false, true, false]);
    c["use_bias"] = true.into();
    assert_eq!(
        ArchSpec::from_json(&c, "x").unwrap_err().to_string(),
        "x: key 'use_bias' true (biases on every projection and on lm_head) is not supported: published ERNIE-4.5 MoE checkpoints set it false"
    );
    let g = spec(ModelType::GraniteMoe, "granite-3.1-1b-a400m");
    assert_eq!(g.attention_scale, 0.015625);
    assert_eq!(
        (g.mup.embedding, g.mup.residual, g.mup.logits),
        (12.0, 0.22, 6.0)
    );
    assert!(g.router.renormalize && g.tie_word_embeddings);
    let t = ModelType::GraniteMoe;
    assert_eq!(
        t.hub_name("model.layers.2.mlp.experts.gate_up_proj"),
        Some("model.layers.2.block_sparse_moe.input_linear.weight".into())
    );
    assert_eq!(
        t.canonical_target("block_sparse_moe.experts.down_proj"),
        "mlp.experts.down_proj"
    );
    let mut c = config_json(ModelType::HunyuanV1Moe, "tiny", None, "float32").unwrap();
    let h = ArchSpec::from_json(&c, "x").unwrap();
    assert_eq!((h.router.top_k, h.qk_norm), (2, QkNorm::PerHeadAfterRotary));
    assert_eq!(
        ModelType::HunyuanV1Moe.router_name(0),
        ("model.layers.0.mlp.gate.wg.weight".into(), true)
    );
    c.as_object_mut().unwrap().remove("head_dim");
    c["attention_head_dim"] = 32.into();
    assert_eq!(ArchSpec::from_json(&c, "x").unwrap().head_dim, 32);
    c["moe_topk"] = serde_json::json!([2, 3]);
    assert_eq!(
        ArchSpec::from_json(&c, "x").unwrap_err().to_string(),
        "x: key 'moe_topk' must be a positive integer or a list of equal ones (moeq routes every layer alike), got [2,3]"
    );
    let f = spec(ModelType::FlexOlmo, "tiny");
    assert!(f.post_norms && !f.router.renormalize && !f.router.correction_bias);
    assert_eq!(f.rotary.dim, f.head_dim);
    assert_eq!(
        f.layer_norm_names(1),
        [
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.1.post_feedforward_layernorm.weight"
        ]
    );
}

#[test]
fn presets_are_checked_against_the_arch() {
    let err = config_json(ModelType::Mixtral, "qwen3-30b-a3b", None, "bfloat16").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown preset 'qwen3-30b-a3b' for mixtral: choose one of tiny, mixtral-8x7b ('qwen3-30b-a3b' is a qwen3_moe preset: use --arch qwen3_moe)"
    );
    let s = ArchSpec::from_json(
        &config_json(ModelType::Qwen3Moe, "qwen3-30b-a3b", Some(12), "bfloat16").unwrap(),
        "x",
    )
    .unwrap();
    assert_eq!(s.num_layers, 12);
}

#[test]
fn synth_uri_parses_and_rejects() {
    let u = SynthUri::parse("synth://qwen3_moe/tiny?seed=3&layers=1&layout=fused").unwrap();
    assert_eq!(u.model_type, ModelType::Qwen3Moe);
    assert_eq!(
        (u.seed, u.layers, u.layout),
        (3, Some(1), DiskLayout::Fused)
    );
    let err = SynthUri::parse("synth://qwen3_moe/tiny?sed=3")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "base_model 'synth://qwen3_moe/tiny?sed=3': unknown parameter 'sed' (expected synth://<arch>/<preset>?seed=N[&layers=L][&layout=hub|fused][&init=disk|device])"
    );
    let u = SynthUri::parse("synth://qwen3_moe/qwen3-30b-a3b?seed=5&init=device").unwrap();
    assert!(u.generated);
    assert_eq!(
        synth::generated_seed("synth://olmoe/tiny?init=device&seed=7").unwrap(),
        Some(7)
    );
    assert_eq!(
        synth::generated_seed("synth://olmoe/tiny?seed=7").unwrap(),
        None
    );
    assert_eq!(synth::generated_seed("/models/olmoe").unwrap(), None);
    assert!(SynthUri::parse("synth://olmoe/tiny?init=gpu")
        .unwrap_err()
        .to_string()
        .contains("init must be 'disk' or 'device', got 'gpu'"));
    let err = SynthUri::parse("synth://llama/tiny")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "unknown architecture 'llama' (supported: qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe, glm4_moe_lite, deepseek_v2, deepseek_v3, kimi_k2, flex_olmo, minimax_m2, ernie4_5_moe, granitemoe, hunyuan_v1_moe, gpt_oss, granitemoeshared, llama4_text, qwen3_next, qwen3_5_moe_text)"
    );
}

#[test]
fn synth_uri_resolves_into_the_cache_once() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("MOEQ_CACHE_DIR", tmp.path());
    let dir = synth::resolve_base_model("synth://olmoe/tiny?seed=9").unwrap();
    assert!(dir.starts_with(tmp.path()));
    assert!(dir.join("model.safetensors").is_file());
    let stamp = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = synth::resolve_base_model("synth://olmoe/tiny?seed=9").unwrap();
    assert_eq!(dir, again);
    assert_eq!(
        stamp,
        std::fs::metadata(again.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
    );
    // init=device: config and tokenizer only, the weights are drawn at load time.
    let cfg = synth::resolve_base_model("synth://olmoe/tiny?seed=9&init=device").unwrap();
    assert_ne!(cfg, dir);
    assert!(cfg.join("config.json").is_file() && cfg.join("tokenizer.json").is_file());
    assert!(!cfg.join("model.safetensors").exists());
    // No partial directories are left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn inspect_from_config_only_reports_qwen3_30b_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q30");
    let (code, _, err) = moeq(&[
        "synth",
        "--arch",
        "qwen3_moe",
        "--preset",
        "qwen3-30b-a3b",
        "--config-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file());
    assert!(!out.join("model.safetensors").exists());
    let (code, stdout, err) = moeq(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("parameters  30.53B total, 3.35B active per token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("weights     none (config.json only)"),
        "{stdout}"
    );
    assert!(stdout.contains("NF4 frozen weights"), "{stdout}");
    // A training config's model_config applies as in `train`; a shape is not overridable.
    let cfg = tmp.path().join("c.yaml");
    let write = |extra: &str| {
        let base = format!(
            "base_model: {}\ndatasets:\n  - path: d.jsonl\n    type: completion\nmodel_config:\n",
            out.display()
        );
        std::fs::write(&cfg, base + extra).unwrap();
    };
    write("  num_experts_per_tok: 4\n");
    let (code, stdout, err) = moeq(&[
        "inspect",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("128 per MoE layer, top-4"), "{stdout}");
    write("  moe_intermediate_size: 1024\n");
    let (code, _, err) = moeq(&[
        "inspect",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model_config.moe_intermediate_size: it sets the shape"),
        "{err}"
    );
    // 16-bit LoRA: the unquantized base (≈ 30.5B × 2 bytes), and per GPU of 8 its experts'
    // share (16 of 128 experts each) with their adapters.
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\nadapter: lora\nload_in_4bit: false\ndatasets:\n  - path: d.jsonl\n    type: completion\nlora_target_parameters: [mlp.experts.gate_up_proj]\n",
            out.display()
        ),
    )
    .unwrap();
    let inspect = |extra: &[&str]| {
        let mut args = vec![
            "inspect",
            out.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ];
        args.extend(extra);
        let (code, stdout, err) = moeq(&args);
        assert_eq!(code, 0, "{err}");
        stdout
    };
    let one = inspect(&[]);
    assert!(one.contains("16-bit LoRA memory estimate"), "{one}");
    assert!(
        one.contains("bf16 frozen weights              59.79 GB"),
        "{one}"
    );
    assert!(one.contains("48 GB no, 80 GB yes"), "{one}");
    let eight = inspect(&["--nproc", "8"]);
    assert!(
        eight.contains("per GPU of 8, each holding at most 16 of 128 experts (groups of 8)"),
        "{eight}"
    );
    assert!(
        eight.contains("bf16 frozen weights               9.06 GB"),
        "{eight}"
    );
    assert!(eight.contains("+ 44.04M expert params"), "{eight}");
    assert!(eight.contains("24 GB yes"), "{eight}");
    // Groups of 2 of the 8 GPUs: each holds half the experts.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "expert_parallel_size: 2\n";
    std::fs::write(&cfg, text).unwrap();
    let pairs = inspect(&["--nproc", "8"]);
    assert!(
        pairs.contains("at most 64 of 128 experts (groups of 2)"),
        "{pairs}"
    );
    assert!(
        pairs.contains("bf16 frozen weights              30.80 GB"),
        "{pairs}"
    );
    let (code, _, err) = moeq(&["inspect", out.to_str().unwrap(), "--nproc", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--nproc 0"), "{err}");
}

#[test]
fn inspect_full_checkpoint_reports_layout_and_disk_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let (code, _, err) = moeq(&[
        "synth",
        "--arch",
        "mixtral",
        "--layout",
        "hub",
        "--shard-size-mb",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, stdout, err) = moeq(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("expert layout per-expert Mixtral"),
        "{stdout}"
    );
    // 2 layers × 4 experts × 3 × 64 × 64 bf16 values.
    assert!(
        stdout.contains("experts             98.3k    196.61 kB"),
        "{stdout}"
    );
}

#[test]
fn synth_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let (code, _, err) = moeq(&[
        "synth",
        "--arch",
        "qwen3_moe",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        format!(
            "error: {}: already exists and is not empty (choose another --out or pass --force)",
            tmp.path().display()
        )
    );
    assert!(tmp.path().join("keep.txt").is_file());
}

#[test]
fn inspect_of_a_missing_directory_exits_2() {
    let (code, stdout, err) = moeq(&["inspect", "/nonexistent/model"]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert_eq!(
        err.trim(),
        "error: /nonexistent/model: model directory does not exist (give a Hugging Face model directory or synth://<arch>/<preset>)"
    );
}

#[test]
fn custom_ops_match_their_references_on_the_cpu() {
    // The comparisons `moeq gpu-check` runs on CUDA. On the CPU, SwiGLU compares the custom
    // op's loop with candle primitive ops (forward and backward); the nf4_linear entries run
    // the same CPU path on both sides, so here they only exercise the harness (the op itself
    // is tested against its reference in tests/nf4_linear.rs). RMSNorm, RoPE, the fused norm and
    // rotation (the separate ops on the CPU) and the grouped expert ops compare bf16 against the f32 reference within the stated bf16 tolerance; the
    // AdamW entries run the tensor ops on both sides (bit-identical), the expert adapters'
    // products (`thin_gemm`) the `grouped_gemm` formulation in bf16 against f32. (8-bit AdamW's
    // state compares as its f32 moments, two entries per parameter.) The delta rule's and the
    // conv's ops, and the linear-attention prep and gated norm, compare their CPU twins with
    // autograd through their references (the delta rule's three forms: the chunkwise one, the
    // chunk op and the token-by-token op).
    let results = moeq::gpu_check::ops::run_all(&candle_core::Device::Cpu).unwrap();
    // 294 + the delta rule's 3 forms × 3 shapes × 8 parts × 2 dtypes, the conv's 12, the
    // linear-attention prep's 8 and gated norm's 12, the SwiGLU backward with row dots and the
    // combine's backward by rows 8 each (f32 and bf16), then 85 more: RMSNorm at 1,544 /
    // 2,880 / 4,096 / 1,100 (16), the combine by rows at 1,032 (4), the router at 20 / 384 /
    // 600 experts (6) and on tied logits with and without a graph (1), the norm's backward plus
    // a residual (8), the router's backward (32: softmax/sigmoid × renormalised or not × four
    // sizes × f32/bf16), the group-limited choices' third case (GLM-4.7-Flash's, bf16 ties; 2),
    // then the token-major row gathers (24: two gather/combine cases of 3 entries, two combine
    // rows cases of 2, and the two bit-for-bit rows, × f32/bf16), then the expert adapters in
    // their products' K (22: six outputs and a chunk dequantized beside and below its factor,
    // nested and plain statistics, then the wide producers bit for bit — row gather,
    // activations, activation gradients with and without dots and the dots, weighted rows;
    // the hidden projected into a view is a device-only row), then the thin products at the
    // tiny models' shapes (10: two shapes × five outputs), and the router's values with a
    // graph and replayed against plain (4), then 24 more: the SwiGLU backward in place (3 a
    // dtype: on the CPU it serves none, so each compares the untouched gu), the norm into wider
    // rows (3 a dtype), the experts' chunks in reused buffers (6 a dtype: dxs with and without
    // dots and the dots, each against the allocating chunks and the CPU; after them in each
    // case 9 a dtype more: the rows gathered a chunk at a time, three ways)
    assert_eq!(results.len(), 657);
    for r in results {
        assert!(r.passed(), "{r}");
    }
}

/// gpt-oss: sliding-window and full attention layers by `layer_types` (alternating from a
/// sliding first layer when absent), sinks, biases on attention, router and experts, the
/// clamped GLU, yarn rope when none is given, the router under `mlp.router` on disk.
#[test]
fn gpt_oss_spec_reads_as_the_model_runs() {
    use moeq::arch::{Component, Glu};
    let s = spec(ModelType::GptOss, "gpt-oss-20b");
    assert_eq!(s.attention_windows[..3], [Some(128), None, Some(128)]);
    assert!(s.attention_sinks && s.expert_bias && s.qkv_bias && s.o_bias);
    assert!(s.router.logit_bias && s.router.renormalize && !s.tie_word_embeddings);
    assert_eq!(
        s.glu,
        Glu::Clamped {
            alpha: 1.702,
            limit: 7.0
        }
    );
    assert_eq!(
        (s.rope.rope_type.as_str(), s.rope.factor),
        ("yarn", Some(32.0))
    );
    let names: Vec<(String, Component)> = s
        .params()
        .into_iter()
        .filter(|p| p.name.starts_with("model.layers.0."))
        .map(|p| (p.name, p.component))
        .collect();
    for (name, component) in [
        ("model.layers.0.self_attn.sinks", Component::Attention),
        ("model.layers.0.self_attn.o_proj.bias", Component::Attention),
        ("model.layers.0.mlp.gate.bias", Component::Router),
        (
            "model.layers.0.mlp.experts.gate_up_proj_bias",
            Component::ExpertBias,
        ),
        (
            "model.layers.0.mlp.experts.down_proj_bias",
            Component::ExpertBias,
        ),
    ] {
        assert!(names.contains(&(name.into(), component)), "{name}");
    }
    assert_eq!(
        ModelType::GptOss.hub_name("model.layers.0.mlp.gate.weight"),
        Some("model.layers.0.mlp.router.weight".into())
    );
    let mut c = config_json(ModelType::GptOss, "tiny", None, "float32").unwrap();
    let o = c.as_object_mut().unwrap();
    for key in [
        "layer_types",
        "rope_scaling",
        "sliding_window",
        "attention_bias",
    ] {
        o.remove(key);
    }
    let d = ArchSpec::from_json(&c, "x").unwrap();
    assert_eq!(d.attention_windows, [Some(128), None]);
    assert!(d.qkv_bias && d.rope.rope_type == "yarn");
    c["layer_types"] = serde_json::json!(["sliding_attention", "chunked_attention"]);
    assert_eq!(
        ArchSpec::from_json(&c, "x").unwrap_err().to_string(),
        "x: key 'layer_types' entries must be \"sliding_attention\" or \"full_attention\", got \"chunked_attention\""
    );
    c["layer_types"] = serde_json::json!(["full_attention"]);
    assert!(ArchSpec::from_json(&c, "x").is_err());
    c.as_object_mut().unwrap().remove("layer_types");
    c["swiglu_limit"] = (-1.0).into();
    assert!(ArchSpec::from_json(&c, "x")
        .unwrap_err()
        .to_string()
        .contains("swiglu_limit"));
}
