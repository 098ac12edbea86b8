//! The tiny models, batches and gradients the trainer's gradient tests share
//! (tests/trainer_grads.rs, tests/lora_in_k.rs): every architecture as a small f32
//! checkpoint quantized to NF4, adapters on every target with random B.

use candle_core::{DType, Device, Tensor};
use moeq::arch::{Model, ModelType};
use moeq::data::{Batch, IGNORE_INDEX};
use moeq::lora::{Adapters, LoraSettings};
use moeq::model_files::dense;
use moeq::model_files::frozen::{self, CpuQuantizer, SingleProcess};
use moeq::model_files::ModelDir;
use moeq::quant::QuantSettings;
use moeq::synth::{self, SynthOptions};
use moeq::train::step::{forward_backward, Activations};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

pub const ARCHS: [ModelType; 18] = [
    ModelType::Qwen3Moe,
    ModelType::Qwen2Moe,
    ModelType::Mixtral,
    ModelType::Olmoe,
    ModelType::Glm4Moe,
    ModelType::Glm4MoeLite,
    ModelType::DeepseekV2,
    ModelType::DeepseekV3,
    ModelType::FlexOlmo,
    ModelType::MinimaxM2,
    ModelType::Ernie45Moe,
    ModelType::GraniteMoe,
    ModelType::HunyuanV1Moe,
    ModelType::GptOss,
    ModelType::GraniteMoeShared,
    ModelType::Llama4Text,
    ModelType::Qwen3Next,
    ModelType::Qwen35MoeText,
];

pub struct Setup {
    _dir: tempfile::TempDir,
    pub model: Model,
    pub adapters: Adapters,
}

/// A tiny f32 checkpoint of `arch`, quantized to NF4, with adapters on every target and
/// random B (PEFT starts B at zero, which would leave A without a gradient).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn setup(arch: ModelType) -> Setup {
    setup_with(arch, 0.0, false)
}

/// The same checkpoint and adapters over the unquantized base (`load_in_4bit: false`).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn setup_16bit(arch: ModelType) -> Setup {
    setup_with(arch, 0.0, true)
}

#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn setup_with(arch: ModelType, dropout: f64, sixteen_bit: bool) -> Setup {
    setup_targets(arch, dropout, sixteen_bit, true)
}

/// `setup_with`, the experts' adapters only with `experts`.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn setup_targets(arch: ModelType, dropout: f64, sixteen_bit: bool, experts: bool) -> Setup {
    setup_rank(arch, dropout, sixteen_bit, experts, 4)
}

/// `setup_targets` at LoRA rank `r` (alpha 2r).
pub fn setup_rank(
    arch: ModelType,
    dropout: f64,
    sixteen_bit: bool,
    experts: bool,
    r: usize,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        model_type: arch,
        seed: 11,
        dtype: "float32".into(),
        ..SynthOptions::default()
    };
    synth::write(&opts, dir.path()).unwrap();
    let md = ModelDir::open(dir.path()).unwrap();
    let base = match sixteen_bit {
        true => dense::load(&md, None, &Device::Cpu, DType::F32),
        false => frozen::load(
            &md,
            QuantSettings::default(),
            None,
            &mut CpuQuantizer,
            &mut SingleProcess,
        ),
    }
    .unwrap();
    let model = Model::new(&md.spec, &base, DType::F32, &Device::Cpu, 64).unwrap();
    let settings = LoraSettings {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        use_rslora: false,
        target_modules: vec!["all-linear".into()],
        target_parameters: match experts {
            true => vec![
                "mlp.experts.gate_up_proj".into(),
                "mlp.experts.down_proj".into(),
            ],
            false => Vec::new(),
        },
    };
    let adapters = Adapters::new(&md.spec, settings, 5, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for (name, v) in adapters.vars() {
        if name.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    Setup {
        _dir: dir,
        model,
        adapters,
    }
}

/// Two rows of 16 tokens; the first packs two samples (10 + 6), the second is one sample of
/// 13 tokens and 3 of padding. Random tokens and labels, some ignored.
pub fn batch(vocab: usize, seed: u64) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let seq_lens = vec![vec![10, 6], vec![13]];
    let (b, s) = (2, 16);
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    let mut position_ids = Vec::new();
    for lens in &seq_lens {
        let mut used = 0;
        for &len in lens {
            for p in 0..len {
                input_ids.push(rng.random_range(0..vocab as u32));
                position_ids.push(p as u32);
                let last = p + 1 == len;
                labels.push(if last || rng.random_bool(0.2) {
                    IGNORE_INDEX
                } else {
                    rng.random_range(0..vocab as i32)
                });
            }
            used += len;
        }
        for p in 0..s - used {
            input_ids.push(0);
            position_ids.push(p as u32);
            labels.push(IGNORE_INDEX);
        }
    }
    Batch {
        input_ids,
        labels,
        position_ids,
        seq_lens,
        batch_size: b,
        seq_len: s,
    }
}

#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn grads_of(s: &Setup, b: &Batch) -> BTreeMap<String, Tensor> {
    grads_with(s, b, None, Activations::Recompute)
}

pub fn grads_with(
    s: &Setup,
    b: &Batch,
    key: Option<(u64, u64)>,
    activations: Activations,
) -> BTreeMap<String, Tensor> {
    let mut grads = BTreeMap::new();
    forward_backward(
        &s.model,
        &s.adapters,
        b,
        b.num_targets(),
        key,
        activations,
        &mut grads,
    )
    .unwrap();
    grads
}

/// A switch's gradients `got` against the path without it (`separate`): the same tensors,
/// each within 1e-4 of its separate gradient's largest element (the same sums in another
/// order, which the tiny models' few terms keep far above the differences; every separate
/// gradient non-zero), and the kept activations' gradients `kept` equal to `got` bit for bit.
/// Whether any gradient moved at all (the switch took another path). Needs the binary's
/// `mod common`.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn within_rounding(
    what: &str,
    separate: &BTreeMap<String, Tensor>,
    got: &BTreeMap<String, Tensor>,
    kept: &BTreeMap<String, Tensor>,
) -> bool {
    assert_eq!(
        separate.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut moved = false;
    for (name, want) in separate {
        let scale = crate::common::max_abs(want);
        assert!(scale > 0.0, "{what} {name}: zero gradient");
        let err = crate::common::max_abs(&(&got[name] - want).unwrap());
        assert!(
            err <= 1e-4 * scale,
            "{what} {name}: against the separate path off by {err:e} (scale {scale:e})"
        );
        moved |= err > 0.0;
        let exact = crate::common::max_abs(&(&kept[name] - &got[name]).unwrap());
        assert_eq!(exact, 0.0, "{what} {name}: kept vs recomputed");
    }
    moved
}
