//! `moeq merge`: the merged checkpoint computes what the base plus the adapter computes, in the
//! base's own layout. For tiny f32 checkpoints of each expert layout (hub per-expert keys,
//! fused, Mixtral's w1/w3/w2; Qwen2-MoE with its shared expert and dense layer; one sharded with
//! an index) and a random adapter on every target: the merged model's logits equal those of the
//! base with the adapter (`moeq eval --quant-type none`, f32; relative 1e-5: W + s·B·A rounded
//! once against x·W + s·(x·A)·B), and every file, tensor name and shape is the input's.
//! Against PEFT's `merge_and_unload`: tests/fixtures/hf/verify_hf.py on the GPU machine.

mod common;
use common::{eval_logits, moeq, random_adapters, rel, EXPERT_PARAMETERS};
use moeq::arch::ModelType;
use moeq::lora::peft;
use moeq::model_files::ModelDir;
use moeq::synth::{self, DiskLayout, SynthOptions};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

fn synth_into(dir: &Path, arch: ModelType, layout: DiskLayout, shard_bytes: u64) -> ModelDir {
    let opts = SynthOptions {
        model_type: arch,
        layout,
        seed: 4,
        dtype: "float32".into(),
        shard_bytes,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).unwrap();
    ModelDir::open(dir).unwrap()
}

/// Random A and B on every linear target and both expert parameters, saved as PEFT files.
fn random_adapter(md: &ModelDir, out: &Path) {
    let a = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 5, 0.2);
    peft::save(&a, "base", out).unwrap();
}

/// Per file: tensor name → (dtype, shape).
fn layout_of(dir: &Path) -> BTreeMap<String, BTreeMap<String, (String, Vec<usize>)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(n, t)| (n, (format!("{:?}", t.dtype()), t.shape().to_vec())))
                .collect();
            out.insert(
                path.file_name().unwrap().to_string_lossy().to_string(),
                tensors,
            );
        }
    }
    out
}

/// `moeq merge --model model --adapter adapter --out out` plus `extra`.
fn merge(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    moeq(&args)
}

#[test]
fn merged_checkpoints_compute_base_plus_adapter_in_the_base_layout() {
    let cases = [
        (ModelType::Qwen3Moe, DiskLayout::Hub, 40_000),
        (ModelType::Qwen3Moe, DiskLayout::Fused, u64::MAX),
        (ModelType::Mixtral, DiskLayout::Hub, u64::MAX),
        (ModelType::Qwen2Moe, DiskLayout::Hub, u64::MAX),
        // Experts stored `[E, in, out]`: each expert's update is added transposed.
        (ModelType::GptOss, DiskLayout::Hub, u64::MAX),
    ];
    for (arch, layout, shard_bytes) in cases {
        let what = format!("{arch:?} {layout:?}");
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let md = synth_into(&base, arch, layout, shard_bytes);
        let adapter = tmp.path().join("adapter");
        random_adapter(&md, &adapter);
        let merged = tmp.path().join("merged");
        let (code, _, err) = merge(&base, &adapter, &merged, &[]);
        assert_eq!(code, 0, "{what}: {err}");
        assert!(err.contains("merged"), "{what}: {err}");
        // The same files, names, dtypes and shapes; the index and tokenizer carried over.
        assert_eq!(layout_of(&merged), layout_of(&base), "{what}");
        let sharded = base.join("model.safetensors.index.json").is_file();
        assert_eq!(
            merged.join("model.safetensors.index.json").is_file(),
            sharded,
            "{what}"
        );
        assert!(merged.join("tokenizer.json").is_file(), "{what}");
        // Base + adapter = merged; and the adapter changes the model.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let data = tmp.path().join("d.jsonl");
        let lines: Vec<String> = (0..3)
            .map(|_| {
                let ids: Vec<u32> = (0..12).map(|_| rng.random_range(0..512)).collect();
                serde_json::json!({ "input_ids": ids }).to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let want = eval_logits(&base, Some(&adapter), &data, &tmp.path().join("a.st"));
        let got = eval_logits(&merged, None, &data, &tmp.path().join("m.st"));
        let plain = eval_logits(&base, None, &data, &tmp.path().join("b.st"));
        assert!(rel(&got, &want) <= 1e-5, "{what}: {}", rel(&got, &want));
        assert!(
            rel(&plain, &want) > 1e-3,
            "{what}: the adapter changed nothing"
        );
    }
}

/// gpt-oss's MXFP4 release format holds 4-bit experts: merge refuses it by name, writes nothing.
#[test]
fn merge_refuses_mxfp4_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let md = synth_into(&base, ModelType::GptOss, DiskLayout::Mxfp4, u64::MAX);
    let adapter = tmp.path().join("adapter");
    random_adapter(&md, &adapter);
    let out = tmp.path().join("out");
    let (code, _, err) = merge(&base, &adapter, &out, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the experts are MXFP4"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
}

#[test]
fn merge_to_bf16_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let md = synth_into(&base, ModelType::Qwen3Moe, DiskLayout::Hub, u64::MAX);
    let adapter = tmp.path().join("adapter");
    random_adapter(&md, &adapter);
    let run = merge;
    // --dtype bf16: every weight in bf16, config.json says so.
    let bf16 = tmp.path().join("bf16");
    let (code, _, err) = run(&base, &adapter, &bf16, &["--dtype", "bf16"]);
    assert_eq!(code, 0, "{err}");
    for tensors in layout_of(&bf16).values() {
        assert!(tensors.values().all(|(d, _)| d == "BF16"), "{tensors:?}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(cfg.get("quantization_config").is_none());

    // Bad input: one line, exit 2, nothing written.
    let other = tmp.path().join("mixtral");
    let mixtral = synth_into(&other, ModelType::Mixtral, DiskLayout::Hub, u64::MAX);
    let foreign = tmp.path().join("foreign");
    random_adapter(&mixtral, &foreign);
    let quantized = tmp.path().join("nf4");
    let (code, _, err) = moeq(&[
        "quantize",
        "--model",
        base.to_str().unwrap(),
        "--out",
        quantized.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let out = tmp.path().join("out");
    let missing = Path::new("/nonexistent");
    let cases: Vec<(&Path, &Path, &Path, &[&str], &str)> = vec![
        (
            &base,
            &adapter,
            &out,
            &["--dtype", "int8"],
            "--dtype 'int8': use bf16, f16 or f32",
        ),
        (&base, &adapter, &bf16, &[], "already exists"),
        (&base, &foreign, &out, &[], "the model needs"),
        (
            &quantized,
            &adapter,
            &out,
            &[],
            "merge needs the unquantized weights",
        ),
        (&base, missing, &out, &[], "adapter_config.json"),
    ];
    for (model, adapter, to, extra, want) in cases {
        let (code, _, err) = run(model, adapter, to, extra);
        assert_eq!(code, 2, "{want}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(want), "expected '{want}' in: {err}");
        assert!(!out.exists(), "{want}: output written");
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
