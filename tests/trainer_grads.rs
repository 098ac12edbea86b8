//! The trainer's gradients on tiny models of every architecture, on the CPU in f32:
//! - every LoRA tensor (attention, dense MLP, shared expert, experts) gets a non-zero gradient;
//! - per-layer recompute gives the gradients of one full autograd graph;
//! - the gradients agree with central finite differences of the loss.

mod common;
use common::max_abs;

use candle_core::{DType, Device, Tensor, Var};
use moeq::arch::{Inputs, Model, ModelType};
use moeq::data::{Batch, IGNORE_INDEX};
use moeq::lora::{Adapters, LoraSettings};
use moeq::model_files::dense;
use moeq::model_files::frozen::{self, CpuQuantizer, SingleProcess};
use moeq::model_files::ModelDir;
use moeq::quant::QuantSettings;
use moeq::synth::{self, SynthOptions};
use moeq::train::step::{evaluate_inputs, forward_backward, inputs, Activations};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const ARCHS: [ModelType; 18] = [
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

struct Setup {
    _dir: tempfile::TempDir,
    model: Model,
    adapters: Adapters,
}

/// A tiny f32 checkpoint of `arch`, quantized to NF4, with adapters on every target and
/// random B (PEFT starts B at zero, which would leave A without a gradient).
fn setup(arch: ModelType) -> Setup {
    setup_with(arch, 0.0, false)
}

/// The same checkpoint and adapters over the unquantized base (`load_in_4bit: false`).
fn setup_16bit(arch: ModelType) -> Setup {
    setup_with(arch, 0.0, true)
}

fn setup_with(arch: ModelType, dropout: f64, sixteen_bit: bool) -> Setup {
    setup_targets(arch, dropout, sixteen_bit, true)
}

/// `setup_with`, the experts' adapters only with `experts`.
fn setup_targets(arch: ModelType, dropout: f64, sixteen_bit: bool, experts: bool) -> Setup {
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
        r: 4,
        alpha: 8.0,
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
fn batch(vocab: usize, seed: u64) -> Batch {
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

fn grads_of(s: &Setup, b: &Batch) -> BTreeMap<String, Tensor> {
    grads_with(s, b, None, Activations::Recompute)
}

fn grads_with(
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

#[test]
fn every_lora_tensor_gets_a_gradient() {
    for arch in ARCHS {
        let s = setup(arch);
        let b = batch(s.model.spec.vocab_size, 1);
        let grads = grads_of(&s, &b);
        let vars = s.adapters.vars();
        assert!(
            vars.len() >= 10,
            "{arch:?}: only {} adapter tensors",
            vars.len()
        );
        for (name, v) in &vars {
            let g = grads
                .get(name)
                .unwrap_or_else(|| panic!("{arch:?}: {name} got no gradient"));
            assert_eq!(g.dims(), v.dims(), "{name}");
            assert!(
                max_abs(g) > 0.0,
                "{arch:?}: {name} has an all-zero gradient"
            );
        }
        // Each kind of target is present for the architectures that have it.
        let has = |part: &str| vars.iter().any(|(n, _)| n.contains(part));
        assert!(
            (has("self_attn.q_proj") || has("self_attn.q_b_proj"))
                && has("self_attn.o_proj")
                && has(&format!("{}.experts", arch.moe_module())),
            "{arch:?}"
        );
        if s.model.spec.latent.is_some() {
            assert!(
                has("kv_a_proj_with_mqa") && has("kv_b_proj"),
                "{arch:?}: latent targets"
            );
        }
        if s.model.spec.linear_attn.is_some() {
            assert!(
                has("linear_attn.in_proj_") && has("linear_attn.out_proj"),
                "{arch:?}: Gated DeltaNet targets"
            );
        }
        // Summed shared experts (with a dense first layer), Hunyuan's unrouted MLP or Granite's
        // fused one.
        if let Some(shared) = s.model.spec.shared_expert.filter(|x| !x.gated) {
            let up = if shared.fused {
                "input_linear"
            } else {
                "up_proj"
            };
            // PEFT's names carry transformers' module names (Llama 4: `feed_forward`).
            let module = arch.transformers_name(shared.module);
            assert!(has(&format!("{module}.{up}")), "{arch:?}");
            let dense = s.model.spec.moe_layers.iter().any(|m| !m);
            assert!(
                !dense || has(&arch.transformers_name("mlp.gate_proj")),
                "{arch:?}"
            );
        }
        if arch == ModelType::Qwen2Moe {
            assert!(
                has("shared_expert.up_proj") && has("mlp.gate_proj"),
                "shared expert and dense MLP"
            );
        }
    }
}

/// Loss of the batch from one autograd graph through every layer (live LoRA, full logits).
fn full_graph_loss(s: &Setup, b: &Batch) -> Tensor {
    moeq::gpu_check::train_step::autograd_loss(&s.model, &s.adapters, b).unwrap()
}

/// Recompute reorders nothing but the graph: gradients equal the full graph's up to f32
/// summation order (chunked vs whole-vocabulary softmax): relative 1e-4 of the tensor's scale.
/// Over the 4-bit base and the unquantized one.
#[test]
fn recompute_matches_one_full_graph() {
    for (arch, s) in ARCHS
        .into_iter()
        .flat_map(|a| [(a, setup(a)), (a, setup_16bit(a))])
    {
        let b = batch(s.model.spec.vocab_size, 2);
        let grads = grads_of(&s, &b);
        let store = full_graph_loss(&s, &b).backward().unwrap();
        for (name, v) in s.adapters.vars() {
            let want = store.get(v.as_tensor()).unwrap();
            let got = &grads[&name];
            let err = max_abs(&(got - want).unwrap());
            let scale = max_abs(want);
            assert!(
                err <= 1e-4 * scale + 1e-9,
                "{arch:?} {name}: max error {err:e}, scale {scale:e}"
            );
        }
    }
}

/// Keeping every layer's graph (gradient_checkpointing: false) runs the same ops on the same
/// values as the recompute, so the gradients are equal bit for bit (tolerance 0) — with LoRA
/// dropout on, whose masks both ways draw from the same key.
#[test]
fn kept_activations_match_the_recompute_exactly() {
    for arch in ARCHS {
        let s = setup_with(arch, 0.1, false);
        let b = batch(s.model.spec.vocab_size, 3);
        let key = Some((7, 3));
        let recomputed = grads_with(&s, &b, key, Activations::Recompute);
        let kept = grads_with(&s, &b, key, Activations::Keep);
        let offloaded = grads_with(&s, &b, key, Activations::Offload);
        assert_eq!(
            recomputed.keys().collect::<Vec<_>>(),
            kept.keys().collect::<Vec<_>>(),
            "{arch:?}"
        );
        for (name, want) in &recomputed {
            assert!(max_abs(want) > 0.0, "{arch:?} {name}: zero gradient");
            for (how, got) in [("kept", &kept[name]), ("offloaded", &offloaded[name])] {
                let err = max_abs(&(got - want).unwrap());
                assert_eq!(
                    err, 0.0,
                    "{arch:?} {name}: {how} vs recomputed differ by {err:e}"
                );
            }
        }
    }
}

/// Without expert adapters, the recompute can form the experts' gate_up output in their
/// backward, a chunk of experts at a time (`MOEQ_EXPERT_CHUNKS`): the same gradients as the
/// separate passes and as kept activations, bit for bit. (The switch is process-wide; other
/// tests running meanwhile take the same bits either way.)
#[test]
fn expert_chunks_match_the_separate_passes_exactly() {
    use moeq::ops::expert_chunks::EXPERT_CHUNKS;
    for arch in ARCHS {
        let s = setup_targets(arch, 0.0, false, false);
        let b = batch(s.model.spec.vocab_size, 4);
        let separate = {
            let _off = EXPERT_CHUNKS.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let (chunked, kept) = {
            let _on = EXPERT_CHUNKS.scoped(true);
            let r = grads_with(&s, &b, None, Activations::Recompute);
            (r, grads_with(&s, &b, None, Activations::Keep))
        };
        assert_eq!(
            separate.keys().collect::<Vec<_>>(),
            chunked.keys().collect::<Vec<_>>()
        );
        assert!(
            !separate.keys().any(|k| k.contains(".mlp.experts.")),
            "{arch:?}: no expert adapters"
        );
        for (name, want) in &separate {
            assert!(max_abs(want) > 0.0, "{arch:?} {name}: zero gradient");
            for (how, got) in [("chunked", &chunked[name]), ("kept", &kept[name])] {
                let err = max_abs(&(got - want).unwrap());
                assert_eq!(
                    err, 0.0,
                    "{arch:?} {name}: {how} vs separate differ by {err:e}"
                );
            }
        }
    }
}

fn loss_of(s: &Setup, inp: &Inputs, b: &Batch) -> f64 {
    let e = evaluate_inputs(&s.model, &s.adapters, inp, b).unwrap();
    e.loss_sum / e.labelled as f64
}

/// Central differences along a random unit direction per tensor, in f32, at three step sizes.
/// Top-k routing is piecewise constant, and tiny random routers have near-ties, so the
/// routing of the unperturbed point is replayed at θ ± εd (what the trainer's recompute does
/// too); each step size must then agree with the gradient. Tolerance: 3% of |g·d| + 2e-3
/// (truncation error O(ε²) and the f32 rounding of the loss, ~1e-6, over 2ε). Over the 4-bit
/// base, and the unquantized one for Qwen2-MoE (dense MLP and shared expert too).
#[test]
fn gradients_match_finite_differences() {
    let sixteen = (ModelType::Qwen2Moe, setup_16bit(ModelType::Qwen2Moe));
    for (arch, s) in ARCHS.into_iter().map(|a| (a, setup(a))).chain([sixteen]) {
        let b = batch(s.model.spec.vocab_size, 3);
        let grads = grads_of(&s, &b);
        let inp = inputs(&s.model, &b).unwrap();
        loss_of(&s, &inp, &b); // records the routing
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let vars: Vec<(String, Var)> = s.adapters.vars();
        // Both adapter matrices of attention and MLP projections of layer 0 and both expert
        // targets of the first MoE layer.
        let first_moe = s.model.spec.moe_layers.iter().position(|m| *m).unwrap();
        // (Granite's MoE block is `block_sparse_moe` in PEFT's names.)
        let experts = format!("layers.{first_moe}.{}.experts", arch.moe_module());
        let picked: Vec<&(String, Var)> = vars
            .iter()
            .filter(|(n, _)| {
                (n.contains("layers.0.")
                    && [
                        "q_proj",
                        "v_proj",
                        "q_b_proj",
                        "kv_a_proj",
                        "kv_b_proj",
                        "down_proj",
                        // Gated DeltaNet (Qwen3-Next, Qwen3.5: layer 0 is linear attention).
                        "in_proj_",
                        "out_proj",
                    ]
                    .iter()
                    .any(|p| n.contains(p)))
                    || n.contains(&experts)
            })
            .collect();
        assert!(
            picked.len() >= 6,
            "{arch:?}: {} tensors picked",
            picked.len()
        );
        for (name, v) in picked {
            let orig = v.as_tensor().copy().unwrap();
            let d: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt();
            let d = (Tensor::from_vec(d, v.shape(), &Device::Cpu).unwrap() / norm as f64).unwrap();
            let analytic: f64 = (&grads[name] * &d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let mut agree = 0;
            let mut seen = Vec::new();
            for eps in [1e-2, 3e-3, 1e-3] {
                v.set(&(&orig + (&d * eps).unwrap()).unwrap()).unwrap();
                let plus = loss_of(&s, &inp, &b);
                v.set(&(&orig - (&d * eps).unwrap()).unwrap()).unwrap();
                let minus = loss_of(&s, &inp, &b);
                v.set(&orig).unwrap();
                let numeric = (plus - minus) / (2.0 * eps);
                seen.push(numeric);
                agree += usize::from((numeric - analytic).abs() <= 0.03 * analytic.abs() + 2e-3);
            }
            assert!(
                agree == 3,
                "{arch:?} {name}: finite differences {seen:?} vs gradient {analytic:.6}"
            );
        }
    }
}

/// The device-vs-CPU machinery of `moeq gpu-check` (ops and the whole training step), run on
/// the CPU: f32 must agree with itself and bf16 within the stated tolerances.
#[test]
fn gpu_check_machinery_on_the_cpu() {
    let mut results = moeq::gpu_check::train_step::run_all(&Device::Cpu).unwrap();
    results.extend(moeq::gpu_check::ops::run_all(&Device::Cpu).unwrap());
    assert!(results.len() >= 16 + 30);
    for r in &results {
        assert!(r.passed(), "{r}");
    }
}

/// The unquantized base is what the model multiplies by: its loss differs from the 4-bit
/// base's by the quantization error (not zero), and both are finite and close (NF4 of a tiny
/// random model moves the loss by a few percent at most).
#[test]
fn sixteen_bit_base_is_not_quantized() {
    for arch in [ModelType::Qwen3Moe, ModelType::Mixtral] {
        let (q, d) = (setup(arch), setup_16bit(arch));
        let b = batch(q.model.spec.vocab_size, 4);
        let loss = |s: &Setup| {
            let inp = inputs(&s.model, &b).unwrap();
            loss_of(s, &inp, &b)
        };
        let (lq, ld) = (loss(&q), loss(&d));
        assert!(lq.is_finite() && ld.is_finite(), "{arch:?}: {lq} {ld}");
        assert!(
            lq != ld,
            "{arch:?}: 4-bit and 16-bit losses are equal ({lq})"
        );
        assert!((lq - ld).abs() < 0.05 * ld.abs(), "{arch:?}: {lq} vs {ld}");
    }
}
