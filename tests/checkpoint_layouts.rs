//! Synthesize → read back: the canonical tensors are identical whatever the on-disk layout,
//! and reading an expert slice touches only that slice's bytes.

use candle_core::{DType, Tensor};
use moeq::arch::{Component, ModelType};
use moeq::model_files::{ExpertLayout, ExpertParam, ModelDir};
use moeq::synth::{self, DiskLayout, SynthOptions};
use std::path::Path;

const ARCHS: [ModelType; 16] = [
    ModelType::Qwen3Moe,
    ModelType::Qwen2Moe,
    ModelType::Mixtral,
    ModelType::Olmoe,
    ModelType::Glm4Moe,
    ModelType::Glm4MoeLite,
    ModelType::DeepseekV2,
    ModelType::DeepseekV3,
    ModelType::KimiK2,
    ModelType::FlexOlmo,
    ModelType::MinimaxM2,
    ModelType::Ernie45Moe,
    ModelType::GraniteMoe,
    ModelType::HunyuanV1Moe,
    ModelType::GptOss,
    ModelType::GraniteMoeShared,
];

fn synth_into(
    dir: &Path,
    arch: ModelType,
    layout: DiskLayout,
    seed: u64,
    shard_bytes: u64,
) -> ModelDir {
    let opts = SynthOptions {
        model_type: arch,
        layout,
        seed,
        shard_bytes,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).expect("synth");
    ModelDir::open(dir).expect("open")
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    // bf16 checkpoints: compare the exact stored bits.
    let v: Vec<half::bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn canonical_tensors(dir: &ModelDir) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    dir.spec
        .params()
        .into_iter()
        .map(|p| {
            let t = dir
                .read(&p.name)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(t.dims(), p.shape.as_slice(), "{}", p.name);
            (p.name, t.dims().to_vec(), bytes_of(&t))
        })
        .collect()
}

#[test]
fn hub_and_fused_layouts_give_identical_canonical_tensors_for_every_arch() {
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        // Small shards for the hub copy so the index path is exercised too.
        let hub = synth_into(&tmp.path().join("hub"), arch, DiskLayout::Hub, 7, 40_000);
        let fused = synth_into(
            &tmp.path().join("fused"),
            arch,
            DiskLayout::Fused,
            7,
            2_000_000_000,
        );
        assert!(hub.shards().len() > 1, "{arch:?}: expected several shards");
        assert_eq!(fused.shards().len(), 1);
        // Granite's hub checkpoints keep the experts fused, under names of their own.
        let gate_up = moeq::arch::gate_up_name(0);
        match arch.hub_name(&gate_up) {
            Some(name) => {
                assert!(hub.locate(&name).is_some() && hub.locate(&gate_up).is_none());
                assert!(fused.locate(&gate_up).is_some());
            }
            // gpt-oss has one layout besides MXFP4: its experts `[E, in, out]`.
            None if arch.experts_transposed() => {
                assert_eq!(hub.layout(), Some(ExpertLayout::Transposed));
                assert_eq!(fused.layout(), Some(ExpertLayout::Transposed));
            }
            None => assert_ne!(hub.layout(), fused.layout()),
        }
        let (a, b) = (canonical_tensors(&hub), canonical_tensors(&fused));
        assert_eq!(a.len(), b.len());
        for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(sa, sb, "{na}");
            assert!(va == vb, "{arch:?}: {na} differs between layouts");
            // Random init, never zeros.
            assert!(va.iter().any(|&x| x != 0), "{na} is all zeros");
        }
    }
}

#[test]
fn mixtral_hub_layout_uses_block_sparse_moe_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_into(tmp.path(), ModelType::Mixtral, DiskLayout::Hub, 1, u64::MAX);
    assert!(dir
        .locate("model.layers.0.block_sparse_moe.experts.3.w1.weight")
        .is_some());
    assert!(dir
        .locate("model.layers.0.block_sparse_moe.gate.weight")
        .is_some());
    assert!(dir.locate("model.layers.0.mlp.gate.weight").is_none());
    // The router reads back under its canonical name.
    let router = dir.read("model.layers.0.mlp.gate.weight").unwrap();
    assert_eq!(router.dims(), &[4, 64]);
}

#[test]
fn gate_rows_come_first_in_gate_up_proj() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_into(
        tmp.path(),
        ModelType::Qwen3Moe,
        DiskLayout::Hub,
        3,
        u64::MAX,
    );
    let i = dir.spec.expert_intermediate_size;
    let fused = dir.read_experts(0, ExpertParam::GateUp, 5..6).unwrap();
    let gate = Tensor::from_raw_buffer(
        dir.locate("model.layers.0.mlp.experts.5.gate_proj.weight")
            .unwrap()
            .bytes("model.layers.0.mlp.experts.5.gate_proj.weight", None)
            .unwrap(),
        DType::BF16,
        &[i, 64],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let first_rows = fused.squeeze(0).unwrap().narrow(0, 0, i).unwrap();
    assert_eq!(bytes_of(&first_rows), bytes_of(&gate));
}

fn expected_ranges(dir: &ModelDir, names: &[String]) -> Vec<std::ops::Range<usize>> {
    names
        .iter()
        .map(|n| {
            let shard = dir.locate(n).unwrap();
            let info = shard.info(n).unwrap();
            let data_start = shard.file_len()
                - shard
                    .names()
                    .map(|k| shard.info(k).unwrap().data_offsets.1)
                    .max()
                    .unwrap();
            data_start + info.data_offsets.0..data_start + info.data_offsets.1
        })
        .collect()
}

#[test]
fn reading_an_expert_slice_touches_only_its_bytes() {
    for layout in [DiskLayout::Hub, DiskLayout::Fused] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = synth_into(tmp.path(), ModelType::Qwen3Moe, layout, 11, 60_000);
        let spec = dir.spec.clone();
        let (h, i) = (spec.hidden_size, spec.expert_intermediate_size);
        for (which, per_expert) in [(ExpertParam::GateUp, 2 * i * h), (ExpertParam::Down, h * i)] {
            dir.clear_reads();
            let t = dir.read_experts(1, which, 2..5).unwrap();
            assert_eq!(t.dim(0).unwrap(), 3);
            let bytes = 3 * per_expert * 2;
            assert_eq!(dir.bytes_read(), bytes, "{layout:?} {which:?}");
            let reads: Vec<_> = dir
                .shards()
                .iter()
                .flat_map(|s| s.reads())
                .filter(|r| !r.is_empty())
                .collect();
            match layout {
                DiskLayout::Fused => {
                    let name = which.canonical_name(1);
                    let whole = &expected_ranges(&dir, &[name])[0];
                    assert_eq!(reads.len(), 1);
                    assert_eq!(reads[0].start, whole.start + 2 * per_expert * 2);
                    assert_eq!(reads[0].end, whole.start + 5 * per_expert * 2);
                }
                DiskLayout::Mxfp4 => unreachable!("Qwen3 checkpoints are not MXFP4"),
                DiskLayout::Hub => {
                    let parts: &[&str] = match which {
                        ExpertParam::GateUp => &["gate_proj", "up_proj"],
                        ExpertParam::Down => &["down_proj"],
                    };
                    let names: Vec<String> = (2..5)
                        .flat_map(|e| {
                            parts
                                .iter()
                                .map(move |p| format!("model.layers.1.mlp.experts.{e}.{p}.weight"))
                        })
                        .collect();
                    assert_eq!(reads, expected_ranges(&dir, &names));
                }
            }
        }
    }
}

#[test]
fn same_seed_is_deterministic_and_seeds_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let a = synth_into(
        &tmp.path().join("a"),
        ModelType::Olmoe,
        DiskLayout::Fused,
        5,
        u64::MAX,
    );
    let b = synth_into(
        &tmp.path().join("b"),
        ModelType::Olmoe,
        DiskLayout::Fused,
        5,
        u64::MAX,
    );
    let c = synth_into(
        &tmp.path().join("c"),
        ModelType::Olmoe,
        DiskLayout::Fused,
        6,
        u64::MAX,
    );
    let file = |d: &ModelDir| std::fs::read(d.root.join("model.safetensors")).unwrap();
    assert_eq!(file(&a), file(&b));
    assert_ne!(file(&a), file(&c));
}

#[test]
fn f16_and_f32_checkpoints_read_back_in_their_dtype() {
    for (dtype, want) in [("float16", DType::F16), ("float32", DType::F32)] {
        let tmp = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            model_type: ModelType::Qwen2Moe,
            layout: DiskLayout::Hub,
            dtype: dtype.into(),
            ..SynthOptions::default()
        };
        synth::write(&opts, tmp.path()).unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        let t = dir.read_experts(0, ExpertParam::Down, 0..8).unwrap();
        assert_eq!(t.dtype(), want);
        assert_eq!(t.dims(), &[8, 64, 32]);
        let shared = dir
            .read("model.layers.0.mlp.shared_expert.up_proj.weight")
            .unwrap();
        assert_eq!(shared.dims(), &[64, 64]);
        // Norm weights are 1 + small noise, as written.
        let norm: Vec<f32> = dir
            .read("model.norm.weight")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(norm.iter().all(|v| (v - 1.0).abs() < 0.2));
    }
}

#[test]
fn qwen2_moe_tiny_has_a_dense_layer_and_shared_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_into(
        tmp.path(),
        ModelType::Qwen2Moe,
        DiskLayout::Hub,
        0,
        u64::MAX,
    );
    assert_eq!(dir.spec.moe_layers, vec![true, false, true]);
    let comps: Vec<Component> = dir.spec.params().iter().map(|p| p.component).collect();
    assert!(comps.contains(&Component::DenseMlp));
    assert!(comps.contains(&Component::SharedExpert));
    assert!(dir.read("model.layers.1.mlp.gate_proj.weight").is_ok());
    let err = dir
        .read_experts(1, ExpertParam::GateUp, 0..1)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("layer 1 is not an MoE layer"), "{err}");
    assert!(dir.read("model.layers.0.self_attn.q_proj.bias").is_ok());
}

/// A 16-bit base (`load_in_4bit: false`) holds the checkpoint's values unchanged: every dense
/// tensor, and of each expert parameter exactly the owned experts — also when they are read a
/// slice at a time into one buffer (slices of one expert here, so experts 1..7 take six reads).
#[test]
fn sixteen_bit_base_holds_the_owned_experts_as_read() {
    use moeq::model_files::dense::load_sliced;
    use moeq::quant::frozen::Frozen;
    let tmp = tempfile::tempdir().unwrap();
    let dir = synth_into(tmp.path(), ModelType::Qwen3Moe, DiskLayout::Hub, 5, 40_000);
    let owned = 1..7;
    for slice_bytes in [1, 1 << 30] {
        let base = load_sliced(
            &dir,
            Some(owned.clone()),
            &candle_core::Device::Cpu,
            DType::BF16,
            slice_bytes,
        )
        .unwrap();
        assert!(base.settings.is_none());
        let mut experts = 0;
        for p in dir.spec.params() {
            let full = dir.read(&p.name).unwrap();
            let (held, want) = match &base.tensors[&p.name] {
                Frozen::DenseExperts { weights, held } => {
                    assert_eq!(held, &owned, "{}", p.name);
                    experts += 1;
                    (
                        weights.clone(),
                        full.narrow(0, owned.start, owned.len()).unwrap(),
                    )
                }
                Frozen::Dense(t) => {
                    assert_ne!(p.component, Component::Experts, "{}", p.name);
                    (t.clone(), full)
                }
                Frozen::Quantized { .. } => panic!("{}: quantized in a 16-bit base", p.name),
            };
            assert_eq!(held.dims(), want.dims(), "{}", p.name);
            assert_eq!(bytes_of(&held), bytes_of(&want), "{}", p.name);
        }
        assert_eq!(experts, 2 * dir.spec.num_moe_layers());
    }
}

/// gpt-oss's release format: the experts as MXFP4 blocks and scales (u8), everything else as in
/// the hub layout. Read back, the experts are the bf16 values to within MXFP4's rounding (half
/// a step at the top of a group's range: at most a third of the group's largest magnitude),
/// and every other tensor is bit for bit the hub checkpoint's.
#[test]
fn gpt_oss_mxfp4_experts_read_back_within_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = synth_into(
        &tmp.path().join("hub"),
        ModelType::GptOss,
        DiskLayout::Hub,
        5,
        u64::MAX,
    );
    let mx = synth_into(
        &tmp.path().join("mx"),
        ModelType::GptOss,
        DiskLayout::Mxfp4,
        5,
        u64::MAX,
    );
    assert_eq!(mx.layout(), Some(ExpertLayout::Mxfp4));
    let blocks = "model.layers.1.mlp.experts.down_proj_blocks";
    let info = mx.locate(blocks).unwrap().info(blocks).unwrap().clone();
    assert_eq!(info.shape, vec![8, 64, 1, 16]);
    assert_eq!(
        mx.locate("model.layers.1.mlp.experts.down_proj")
            .map(|_| ()),
        None
    );
    assert_eq!(
        mx.config_json["quantization_config"]["quant_method"],
        "mxfp4"
    );
    for p in hub.spec.params() {
        let (a, b) = (hub.read(&p.name).unwrap(), mx.read(&p.name).unwrap());
        assert_eq!(a.dims(), b.dims(), "{}", p.name);
        if p.component != Component::Experts {
            assert!(bytes_of(&a) == bytes_of(&b), "{} differs", p.name);
            continue;
        }
        let f = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (f(&a), f(&b));
        let mut moved = 0;
        for (ga, gb) in a.chunks(32).zip(b.chunks(32)) {
            let max = ga.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in ga.iter().zip(gb) {
                assert!(
                    (x - y).abs() <= max / 3.0 + 1e-6,
                    "{}: {x} read as {y}",
                    p.name
                );
                moved += usize::from(x != y);
            }
        }
        // 4-bit values: most of them moved.
        assert!(
            moved > a.len() / 2,
            "{}: only {moved} of {} values changed",
            p.name,
            a.len()
        );
    }
}
