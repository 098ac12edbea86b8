//! The trainer's gradients on tiny models of every architecture, on the CPU in f32:
//! - every LoRA tensor (attention, dense MLP, shared expert, experts) gets a non-zero gradient;
//! - per-layer recompute gives the gradients of one full autograd graph;
//! - the gradients agree with central finite differences of the loss.

mod common;
mod grads_common;
use common::max_abs;
use grads_common::{
    batch, grads_of, grads_with, setup, setup_16bit, setup_targets, setup_with, Setup, ARCHS,
};

use candle_core::{Device, Tensor, Var};
use moeq::arch::{Inputs, ModelType};
use moeq::data::Batch;
use moeq::train::step::{evaluate_inputs, inputs, Activations};
use rand::{Rng, SeedableRng};

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
/// separate passes and as kept activations, bit for bit. Each chunk gathers its own rows in
/// the backward (`ChunkRows::ByToken`) except where the routing weights scale the rows (Llama
/// 4: gathered whole); post-normed blocks (FlexOlmo) and expert biases (gpt-oss) take no
/// chunks. (The switch is process-wide; other tests running meanwhile take the same bits
/// either way.)
#[test]
fn expert_chunks_match_the_separate_passes_exactly() {
    use moeq::ops::expert_chunks::{by_token_runs, EXPERT_CHUNKS};
    for arch in ARCHS {
        let s = setup_targets(arch, 0.0, false, false);
        let b = batch(s.model.spec.vocab_size, 4);
        let separate = {
            let _off = EXPERT_CHUNKS.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let (chunked, kept) = {
            let _on = EXPERT_CHUNKS.scoped(true);
            let before = by_token_runs();
            let r = grads_with(&s, &b, None, Activations::Recompute);
            let by_token = by_token_runs() > before;
            // Gathered whole where the weights scale the rows, and no chunks where a post-norm
            // block's backward reads the experts' output or gate_up has a bias (FlexOlmo's,
            // gpt-oss's).
            let spec = &s.model.spec;
            let whole = spec.router.weights_input || spec.post_norms || spec.expert_bias;
            assert!(
                by_token || whole,
                "{arch:?}: the recompute gathered its rows whole"
            );
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
