//! Llama 4 (`llama4_text`) checkpoints on disk: the hub layout's `feed_forward.` names and
//! experts stored `[E, in, out]` (gate columns first), the fused layout under moeq's canonical
//! names (also `[E, in, out]`), both read back to the same canonical tensors; `moeq merge` into
//! the hub layout; the published shapes through `moeq inspect`; MXFP4 refused.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{eval_logits, moeq, random_adapters, rel, EXPERT_PARAMETERS};
use moeq::arch::ModelType;
use moeq::lora::peft;
use moeq::model_files::{ExpertLayout, ExpertParam, ModelDir};
use moeq::synth::{self, config_json, DiskLayout, SynthOptions};
use std::path::Path;

fn synth_into(dir: &Path, layout: DiskLayout, dtype: &str, shard_bytes: u64) -> ModelDir {
    let opts = SynthOptions {
        model_type: ModelType::Llama4Text,
        layout,
        seed: 11,
        dtype: dtype.into(),
        shard_bytes,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).expect("synth");
    ModelDir::open(dir).expect("open")
}

/// Every canonical parameter as f32 values, in `params()` order.
fn canonical(dir: &ModelDir) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    dir.spec
        .params()
        .into_iter()
        .map(|p| {
            let t = dir
                .read(&p.name)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(t.dims(), p.shape.as_slice(), "{}", p.name);
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (p.name, p.shape, v.to_vec1().unwrap())
        })
        .collect()
}

/// An on-disk tensor as it is stored.
fn stored(dir: &ModelDir, name: &str) -> Tensor {
    let shard = dir
        .locate(name)
        .unwrap_or_else(|| panic!("'{name}' missing"));
    let info = shard.info(name).unwrap();
    let dtype = match info.dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        other => panic!("'{name}': {other:?}"),
    };
    let bytes = shard.bytes(name, None).unwrap();
    Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu).unwrap()
}

#[test]
fn hub_and_fused_layouts_read_back_to_the_same_canonical_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    // Small shards for the hub copy: the index path too.
    let hub = synth_into(&tmp.path().join("hub"), DiskLayout::Hub, "bfloat16", 40_000);
    let fused = synth_into(
        &tmp.path().join("fused"),
        DiskLayout::Fused,
        "bfloat16",
        u64::MAX,
    );
    assert!(hub.shards().len() > 1);
    assert_eq!(hub.layout(), Some(ExpertLayout::Transposed));
    assert_eq!(fused.layout(), Some(ExpertLayout::Transposed));
    let (e, h, i) = (4, 64, 32);
    // Hub: transformers' names, the experts `[E, H, 2I]` and `[E, I, H]`; layer 1 is MoE,
    // layer 0 dense (`interleave_moe_layer_step: 2`).
    for (name, shape) in [
        ("model.layers.1.feed_forward.router.weight", vec![e, h]),
        (
            "model.layers.1.feed_forward.experts.gate_up_proj",
            vec![e, h, 2 * i],
        ),
        (
            "model.layers.1.feed_forward.experts.down_proj",
            vec![e, i, h],
        ),
        (
            "model.layers.1.feed_forward.shared_expert.up_proj.weight",
            vec![i, h],
        ),
        ("model.layers.0.feed_forward.down_proj.weight", vec![h, 96]),
    ] {
        assert_eq!(stored(&hub, name).dims(), shape.as_slice(), "{name}");
    }
    assert!(hub.locate("model.layers.1.mlp.gate.weight").is_none());
    assert!(hub
        .locate("model.layers.1.mlp.experts.gate_up_proj")
        .is_none());
    assert!(hub
        .locate("model.layers.1.feed_forward.experts.0.gate_proj.weight")
        .is_none());
    // Fused: moeq's names, the experts also `[E, in, out]`.
    assert_eq!(
        stored(&fused, "model.layers.1.mlp.experts.gate_up_proj").dims(),
        &[e, h, 2 * i]
    );
    assert!(fused.locate("model.layers.1.mlp.gate.weight").is_some());
    let (a, b) = (canonical(&hub), canonical(&fused));
    assert_eq!(a.len(), b.len());
    for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        assert!(va == vb, "{na} differs between layouts");
        assert!(va.iter().any(|&x| x != 0.0), "{na} is all zeros");
    }
    // Gate = the first I columns of each stored expert, up = the last I (halves, not
    // gpt-oss's interleaving): canonical gate rows are the stored gate columns transposed.
    let gate_up = hub.read_experts(1, ExpertParam::GateUp, 2..3).unwrap();
    let disk = stored(&hub, "model.layers.1.feed_forward.experts.gate_up_proj");
    for (rows, cols) in [(0, 0), (i, i)] {
        let canon = gate_up.squeeze(0).unwrap().narrow(0, rows, i).unwrap();
        let want = disk
            .get(2)
            .unwrap()
            .narrow(1, cols, i)
            .unwrap()
            .t()
            .unwrap();
        let diff = (canon.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
    // `inspect` sums the hub names' bytes.
    let (code, stdout, err) = moeq(&["inspect", tmp.path().join("hub").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("expert layout fused [E, in, out]"),
        "{stdout}"
    );
    // 2 MoE layers × 4 experts × 3 × 32 × 64 bf16 values.
    assert!(
        stdout.contains("experts             49.2k     98.30 kB"),
        "{stdout}"
    );
}

/// `moeq eval`'s logits of `model` (f32, unquantized), with `adapter` where given.
/// The adapter's expert updates land in `[E, in, out]` as such, the shared expert's and the
/// dense MLP's under `feed_forward.`; every file, name and shape stays the input's; the merged
/// model computes what the base with the adapter computes (f32: relative 1e-5, as in
/// tests/merge_cli.rs).
#[test]
fn merge_keeps_the_hub_layout_and_adds_each_update() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let md = synth_into(&base, DiskLayout::Hub, "float32", u64::MAX);
    let a = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 5, 0.2);
    let adapter = tmp.path().join("adapter");
    peft::save(&a, "base", &adapter).unwrap();
    let out = tmp.path().join("merged");
    let (code, _, err) = moeq(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let merged = ModelDir::open(&out).unwrap();
    assert_eq!(merged.layout(), Some(ExpertLayout::Transposed));
    let names = |d: &ModelDir| {
        let mut v: Vec<(String, Vec<usize>)> = d.shards()[0]
            .names()
            .map(|n| (n.clone(), d.shards()[0].info(n).unwrap().shape.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&merged), names(&md));
    let s = a.settings.scaling();
    let max_diff = |x: &Tensor, y: &Tensor| -> f32 {
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar().unwrap()
    };
    for which in [ExpertParam::GateUp, ExpertParam::Down] {
        let lora = &a.experts[&which.canonical_name(1)];
        let (w0, w1) = (
            md.read_experts(1, which, 0..4).unwrap(),
            merged.read_experts(1, which, 0..4).unwrap(),
        );
        for e in 0..4 {
            let b = lora.expert_b(e).unwrap();
            let delta = (b.matmul(&lora.expert_a(e).unwrap()).unwrap() * s).unwrap();
            // Swapped factors (PEFT's layout for Llama 4) give the update `[in, out]`.
            let delta = match lora.swapped {
                true => delta.t().unwrap(),
                false => delta,
            };
            let want = (w0.get(e).unwrap() + delta).unwrap();
            let got = w1.get(e).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{which:?} expert {e}");
        }
        assert!(max_diff(&w0, &w1) > 1e-3, "{which:?}: nothing was added");
    }
    for module in [
        "model.layers.1.mlp.shared_expert.gate_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ] {
        let lora = &a.linear[module];
        let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor()).unwrap() * s).unwrap();
        let name = format!("{module}.weight");
        let want = (md.read(&name).unwrap() + delta).unwrap();
        let got = merged.read(&name).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{module}");
    }
    // Lines longer than the 8-position chunks, past the first NoPE temperature step.
    let data = tmp.path().join("d.jsonl");
    let ids: Vec<u32> = (0..20).map(|k| (k * 37 + 11) % 512).collect();
    std::fs::write(&data, serde_json::json!({ "input_ids": ids }).to_string()).unwrap();
    let want = eval_logits(&base, Some(&adapter), &data, &tmp.path().join("a.st"));
    let got = eval_logits(&out, None, &data, &tmp.path().join("m.st"));
    let plain = eval_logits(&base, None, &data, &tmp.path().join("b.st"));
    assert!(rel(&got, &want) <= 1e-5, "{}", rel(&got, &want));
    assert!(rel(&plain, &want) > 1e-3, "the adapter changed nothing");
}

/// Meta publishes 109B total / 17B active for Scout and 400B / 17B for Maverick: the
/// multimodal checkpoints, vision encoder included. The text models count (embedding and
/// lm_head included, as for the other types; `tests/synth.rs` checks them against the
/// published figures too): Scout 107.77B / 17.17B, Maverick 400.71B / 17.18B.
#[test]
fn inspect_gives_the_published_shapes_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    for (preset, line) in [
        (
            "llama4-scout",
            "parameters  107.77B total, 17.17B active per token",
        ),
        (
            "llama4-maverick",
            "parameters  400.71B total, 17.18B active per token",
        ),
    ] {
        let out = tmp.path().join(preset);
        let (code, _, err) = moeq(&[
            "synth",
            "--arch",
            "llama4_text",
            "--preset",
            preset,
            "--config-only",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let (code, stdout, err) = moeq(&["inspect", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains(line), "{preset}: {stdout}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["eos_token_id"],
            serde_json::json!([200001, 200007, 200008])
        );
    }
}

/// `--layers` cuts the per-layer lists with the depth; the published shapes keep their
/// interleaving.
#[test]
fn layers_cut_the_depth() {
    let c = config_json(ModelType::Llama4Text, "tiny", Some(2), "bfloat16").unwrap();
    assert_eq!(c["no_rope_layers"], serde_json::json!([1, 0]));
    let s = moeq::arch::ArchSpec::from_json(&c, "x").unwrap();
    assert_eq!(s.moe_layers, [false, true]);
    assert_eq!(s.rope_layers, [true, false]);
    assert_eq!(s.attention_chunks, [Some(8), None]);
    let c = config_json(
        ModelType::Llama4Text,
        "llama4-maverick",
        Some(4),
        "bfloat16",
    )
    .unwrap();
    let s = moeq::arch::ArchSpec::from_json(&c, "x").unwrap();
    assert_eq!(s.moe_layers, [false, true, false, true]);
    assert_eq!(s.rope_layers, [true, true, true, false]);
}

#[test]
fn mxfp4_layout_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let (code, _, err) = moeq(&[
        "synth",
        "--arch",
        "llama4_text",
        "--layout",
        "mxfp4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "error: --layout mxfp4 is gpt-oss's release format; llama4_text checkpoints are 'hub' or 'fused'"
    );
    assert!(!out.exists());
}
