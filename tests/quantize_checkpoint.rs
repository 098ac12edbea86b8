//! Loading with quantization, pre-quantized checkpoints (`moeq quantize`), and world-size
//! independence at load time.

mod common;
use common::moeq;

use moeq::arch::ModelType;
use moeq::model_files::frozen::{
    self, CpuQuantizer, Frozen, FrozenBase, SingleProcess, StatsGather,
};
use moeq::model_files::ModelDir;
use moeq::quant::{QuantKind, QuantSettings};
use moeq::synth::{self, DiskLayout, SynthOptions};
use std::collections::BTreeMap;
use std::path::Path;

fn synth_into(dir: &Path, arch: ModelType, layout: DiskLayout) -> ModelDir {
    let opts = SynthOptions {
        model_type: arch,
        layout,
        seed: 3,
        shard_bytes: 150_000,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).unwrap();
    ModelDir::open(dir).unwrap()
}

fn load(dir: &ModelDir, settings: QuantSettings) -> FrozenBase {
    frozen::load(dir, settings, None, &mut CpuQuantizer, &mut SingleProcess).unwrap()
}

/// Bytes that identify a frozen tensor completely.
fn fingerprint(f: &Frozen) -> Vec<u8> {
    match f {
        Frozen::Quantized { param, experts, .. } => {
            let mut v = format!("{:?}{:?}{:?}", param.shape, param.settings, experts).into_bytes();
            v.extend(&param.packed);
            v.extend(format!("{:?}", param.absmax).into_bytes());
            v
        }
        Frozen::DenseExperts { .. } => panic!("a 16-bit expert parameter in a 4-bit base"),
        Frozen::Dense(t) => {
            let t = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect()
        }
    }
}

fn fingerprints(base: &FrozenBase) -> BTreeMap<String, Vec<u8>> {
    base.tensors
        .iter()
        .map(|(k, v)| (k.clone(), fingerprint(v)))
        .collect()
}

#[test]
fn quantized_checkpoint_loads_back_identically_for_every_arch() {
    for arch in [
        ModelType::Qwen3Moe,
        ModelType::Qwen2Moe,
        ModelType::Mixtral,
        ModelType::Olmoe,
        ModelType::Llama4Text,
        ModelType::Qwen3Next,
        ModelType::Qwen35MoeText,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let src = synth_into(&tmp.path().join("src"), arch, DiskLayout::Hub);
        let settings = QuantSettings::default();
        let direct = load(&src, settings);
        let out = tmp.path().join("nf4");
        let (code, _, err) = moeq(&[
            "quantize",
            "--model",
            src.root.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shard-size-mb",
            "1",
        ]);
        assert_eq!(code, 0, "{err}");
        let pre = ModelDir::open(&out).unwrap();
        assert_eq!(frozen::prequantized(&pre), Some(settings));
        if arch == ModelType::Llama4Text {
            // transformers' runtime names, as its bitsandbytes loader expects them.
            for name in [
                "model.layers.1.feed_forward.router.weight",
                "model.layers.1.feed_forward.shared_expert.gate_proj.weight.absmax",
                "model.layers.0.feed_forward.down_proj.weight.absmax",
            ] {
                assert!(pre.locate(name).is_some(), "{name}");
            }
        }
        if src.spec.linear_attn.is_some() {
            // Gated DeltaNet: the projections in NF4 (bitsandbytes replaces `nn.Linear`s), the
            // convolution, decay parameters and gated norm as they were.
            let a = "model.layers.0.linear_attn";
            let projection = format!("{a}.out_proj.weight.absmax");
            assert!(pre.locate(&projection).is_some(), "{projection}");
            for name in ["conv1d.weight", "A_log", "dt_bias", "norm.weight"] {
                let name = format!("{a}.{name}");
                assert!(pre.locate(&name).is_some(), "{name}");
                assert!(pre.locate(&format!("{name}.absmax")).is_none(), "{name}");
            }
        }
        let loaded = load(&pre, settings);
        assert_eq!(fingerprints(&direct), fingerprints(&loaded), "{arch:?}");
        assert!(direct
            .tensors
            .values()
            .any(|f| matches!(f, Frozen::Quantized { .. })));
        // A 16-bit base cannot come from 4-bit codes: refused, naming both ways out.
        let e = moeq::model_files::dense::load(
            &pre,
            None,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("pre-quantized (4-bit), but the run asks for a 16-bit base")
                && e.contains("adapter: qlora"),
            "{e}"
        );
    }
}

#[test]
fn output_uses_v5_names_and_bitsandbytes_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth_into(&tmp.path().join("src"), ModelType::Mixtral, DiskLayout::Hub);
    let out = tmp.path().join("nf4");
    let (code, stdout, err) = moeq(&[
        "quantize",
        "--model",
        src.root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("peak host memory"), "{stdout}");
    let pre = ModelDir::open(&out).unwrap();
    let p = "model.layers.1.mlp.experts.gate_up_proj";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ] {
        assert!(pre.locate(&format!("{p}{suffix}")).is_some(), "{p}{suffix}");
    }
    assert!(pre
        .locate("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4")
        .is_some());
    assert!(pre.locate("model.layers.0.mlp.gate.weight").is_some());
    assert!(pre
        .locate("model.layers.0.block_sparse_moe.gate.weight")
        .is_none());
    let shard = pre.locate(p).unwrap();
    let info = shard.info(p).unwrap();
    assert_eq!(info.shape, vec![4 * 128 * 64 / 2, 1]);
    let state = shard
        .bytes(&format!("{p}.quant_state.bitsandbytes__nf4"), None)
        .unwrap();
    let json = std::str::from_utf8(state).unwrap();
    assert!(
        json.starts_with(r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 128, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "#),
        "{json}"
    );
}

#[test]
fn hub_and_fused_sources_quantize_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = synth_into(
        &tmp.path().join("hub"),
        ModelType::Qwen3Moe,
        DiskLayout::Hub,
    );
    let fused = synth_into(
        &tmp.path().join("fused"),
        ModelType::Qwen3Moe,
        DiskLayout::Fused,
    );
    for (dir, name) in [(&hub, "a"), (&fused, "b")] {
        let out = tmp.path().join(name);
        let (code, _, err) = moeq(&[
            "quantize",
            "--model",
            dir.root.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let a = std::fs::read(tmp.path().join("a/model.safetensors")).unwrap();
    let b = std::fs::read(tmp.path().join("b/model.safetensors")).unwrap();
    assert!(a == b, "pre-quantized files differ between source layouts");
}

/// A gather that returns what every simulated rank produced, in rank order.
struct Recorded(BTreeMap<String, Vec<Vec<f32>>>);

impl StatsGather for Recorded {
    fn gather(&mut self, name: &str, _local: Vec<f32>) -> Result<Vec<f32>, String> {
        Ok(self.0[name].concat())
    }
}

struct Recorder<'a>(&'a mut BTreeMap<String, Vec<Vec<f32>>>);

impl StatsGather for Recorder<'_> {
    fn gather(&mut self, name: &str, local: Vec<f32>) -> Result<Vec<f32>, String> {
        self.0
            .entry(name.to_string())
            .or_default()
            .push(local.clone());
        Ok(local)
    }
}

#[test]
fn loading_on_any_number_of_ranks_gives_the_single_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_into(tmp.path(), ModelType::Olmoe, DiskLayout::Hub);
    ranks_match_the_single_process(&dir);
    // Weights drawn at load time: each rank draws only its experts.
    ranks_match_the_single_process(&generated(
        &tmp.path().join("generated"),
        ModelType::Olmoe,
        3,
    ));
}

/// A config-only synth directory whose weights are drawn at load time with `seed`.
fn generated(dir: &Path, arch: ModelType, seed: u64) -> ModelDir {
    synth::write(
        &SynthOptions {
            model_type: arch,
            config_only: true,
            ..SynthOptions::default()
        },
        dir,
    )
    .unwrap();
    let mut d = ModelDir::open(dir).unwrap();
    assert!(!d.has_weights());
    d.generate_weights(seed);
    d
}

fn ranks_match_the_single_process(dir: &ModelDir) {
    let settings = QuantSettings {
        kind: QuantKind::Nf4,
        blocksize: 64,
        double_quant: true,
    };
    let whole = load(dir, settings);
    let experts = dir.spec.num_experts;
    for ranks in [1, 2, 3, 4, 8] {
        let plan: Vec<_> = (0..ranks)
            .map(|r| r * experts / ranks..(r + 1) * experts / ranks)
            .collect();
        // Round 1: each rank's local absmax (what the all-gather would send).
        let mut sent = BTreeMap::new();
        for r in &plan {
            frozen::load(
                dir,
                settings,
                Some(r.clone()),
                &mut CpuQuantizer,
                &mut Recorder(&mut sent),
            )
            .unwrap();
        }
        // Round 2: every rank receives all of them.
        for r in &plan {
            let rank = frozen::load(
                dir,
                settings,
                Some(r.clone()),
                &mut CpuQuantizer,
                &mut Recorded(sent.clone()),
            )
            .unwrap();
            for (name, f) in &rank.tensors {
                match (f, &whole.tensors[name]) {
                    (
                        Frozen::Quantized {
                            param,
                            experts: Some(owned),
                            ..
                        },
                        Frozen::Quantized { param: w, .. },
                    ) => {
                        let per = w.packed.len() / experts;
                        assert_eq!(
                            param.packed,
                            w.packed[owned.start * per..owned.end * per],
                            "{name} ranks={ranks}"
                        );
                        assert_eq!(param.absmax, w.absmax, "{name} ranks={ranks}: statistics");
                    }
                    (a, b) => assert_eq!(fingerprint(a), fingerprint(b), "{name} ranks={ranks}"),
                }
            }
        }
    }
}

#[test]
fn mismatching_settings_for_a_prequantized_checkpoint_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth_into(
        &tmp.path().join("src"),
        ModelType::Qwen3Moe,
        DiskLayout::Fused,
    );
    let out = tmp.path().join("nf4");
    let (code, _, err) = moeq(&[
        "quantize",
        "--model",
        src.root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--blocksize",
        "128",
    ]);
    assert_eq!(code, 0, "{err}");
    let pre = ModelDir::open(&out).unwrap();
    let err = frozen::load(
        &pre,
        QuantSettings::default(),
        None,
        &mut CpuQuantizer,
        &mut SingleProcess,
    )
    .err()
    .unwrap()
    .to_string();
    assert_eq!(
        err,
        format!(
            "{}: checkpoint is pre-quantized with nf4 blocksize 128 double_quant true, but the run asks for nf4 blocksize 64 double_quant true (re-run moeq quantize with those settings, or change the config)",
            out.display()
        )
    );
    let (code, _, err) = moeq(&[
        "quantize",
        "--model",
        out.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        format!(
            "error: {}: already a pre-quantized checkpoint",
            out.display()
        )
    );
    assert!(!tmp.path().join("x").exists());
}

/// `synth://…&init=device` draws the weights at load time with the counter-based generator:
/// deterministic, with the synth writer's scales (N(0, 0.02), norms 1 + N(0, 0.02), head
/// N(0, 1/√H)), a different stream per seed, and the same frozen base for every architecture
/// shape the loader knows.
#[test]
fn generated_weights_have_the_synth_scales_and_are_deterministic() {
    use moeq::model_files::generated::draw;
    let settings = QuantSettings {
        kind: QuantKind::Nf4,
        blocksize: 64,
        double_quant: true,
    };
    for arch in [ModelType::Qwen3Moe, ModelType::Mixtral, ModelType::Qwen2Moe] {
        let tmp = tempfile::tempdir().unwrap();
        let a = generated(&tmp.path().join("a"), arch, 3);
        let b = generated(&tmp.path().join("b"), arch, 3);
        let c = generated(&tmp.path().join("c"), arch, 4);
        let fa = fingerprints(&load(&a, settings));
        assert_eq!(fa, fingerprints(&load(&b, settings)), "{arch:?}");
        let fc = fingerprints(&load(&c, settings));
        assert!(
            fa.iter().all(|(k, v)| fc[k] != *v),
            "{arch:?}: seed 4 repeats a tensor"
        );
    }
    // Moments of 2^20 draws: standard error of the mean 0.001·std, of the std 0.0007·std;
    // the bounds are ~10 standard errors (bf16 rounding adds < 0.4% relative per value).
    let cpu = &candle_core::Device::Cpu;
    for (std, offset) in [(0.02f32, 0.0f32), (0.02, 1.0), (0.125, 0.0)] {
        let v: Vec<f32> = draw(11, 1 << 20, std, offset, cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (mean - offset as f64).abs() < 0.01 * std as f64,
            "mean {mean}"
        );
        assert!((sd / std as f64 - 1.0).abs() < 0.01, "std {sd} for {std}");
        let tail = v
            .iter()
            .filter(|&&x| (x - offset).abs() > 3.0 * std)
            .count() as f64
            / n;
        assert!((tail - 0.0027).abs() < 0.0005, "3-sigma tail {tail}");
    }
    // A prefix of a stream is the same values however much of it is drawn.
    let long = draw(5, 1000, 1.0, 0.0, cpu).unwrap();
    let short = draw(5, 10, 1.0, 0.0, cpu).unwrap();
    let diff = (long
        .narrow(0, 0, 10)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        - short.to_dtype(candle_core::DType::F32).unwrap())
    .unwrap();
    assert_eq!(
        diff.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
