//! The adapters of projections of one input — q, k and v; a dense MLP's or a shared expert's
//! gate and up — with their factor products joined (`MOEQ_JOINT_LORA`, on by default,
//! src/ops/lora_joint.rs) on tiny models of every architecture, on the CPU in f32. A
//! binary of its own: the switch is process-wide and changes the rounding, so the exact
//! comparisons of tests/trainer_grads.rs must not run beside it.

mod common;
mod grads_common;
use common::max_abs;
use grads_common::{
    batch, grads_with, setup_rank, setup_targets, setup_with, within_rounding, ARCHS,
};
use moeq::arch::ModelType;
use moeq::ops::lora_joint::{forwards, wide_forwards, JOINT_IN_K, JOINT_LORA};
use moeq::train::step::Activations;

/// With the switch on, the gradients are the separate products' within f32 rounding (the same
/// sums in another order: 1e-4 of each tensor's largest gradient, which the tiny models' few
/// terms keep far above the differences), kept activations give the recompute's bits (the
/// plain forward and the recompute take the same path), and q/k/v's joined path ran on every
/// architecture with q/k/v heads written out (not latent attention's projections, not the
/// gated attention candle's graph runs), gate/up's on those with a dense MLP or a split shared
/// expert. One test: the switch is process-wide, and a second test flipping it meanwhile
/// would move this one's rounding.
#[test]
fn joined_q_k_v_adapters_give_the_separate_gradients() {
    dropout_keeps_the_products_apart();
    updates_in_k_give_the_separate_gradients();
    let mut gate_up = Vec::new();
    for arch in ARCHS {
        let s = setup_targets(arch, 0.0, false, true);
        let b = batch(s.model.spec.vocab_size, 8);
        let separate = {
            let _off = JOINT_LORA.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let before = (forwards(3), forwards(2));
        let (joined, kept) = {
            let _on = JOINT_LORA.scoped(true);
            let r = grads_with(&s, &b, None, Activations::Recompute);
            (r, grads_with(&s, &b, None, Activations::Keep))
        };
        let ran = (forwards(3) > before.0, forwards(2) > before.1);
        // Latent attention's projections read different inputs; Qwen3-Next's and Qwen3.5's
        // full attention has an output gate and runs under candle's graph in the taped layer.
        let qkv_apart = matches!(
            arch,
            ModelType::Glm4MoeLite
                | ModelType::DeepseekV2
                | ModelType::DeepseekV3
                | ModelType::Qwen3Next
                | ModelType::Qwen35MoeText
        );
        assert_eq!(ran.0, !qkv_apart, "{arch:?}: q/k/v joined");
        gate_up.extend(ran.1.then_some(arch));
        within_rounding(&format!("{arch:?} joined"), &separate, &joined, &kept);
    }
    // Dense MLP layers or a shared expert with separate gate and up (Granite's shared MLP has
    // them fused: one projection).
    use ModelType::*;
    let want = [
        Qwen2Moe,
        Glm4Moe,
        Glm4MoeLite,
        DeepseekV2,
        DeepseekV3,
        Ernie45Moe,
        HunyuanV1Moe,
        Llama4Text,
        Qwen3Next,
        Qwen35MoeText,
    ];
    assert_eq!(gate_up, want, "the architectures whose gate and up joined");
}

/// With LoRA dropout each projection draws its own mask, so q, k and v keep their separate
/// products: the switch changes nothing, bit for bit.
fn dropout_keeps_the_products_apart() {
    let arch = ModelType::Qwen3Moe;
    let s = setup_with(arch, 0.1, false);
    let b = batch(s.model.spec.vocab_size, 9);
    let key = Some((7, 3));
    let separate = {
        let _off = JOINT_LORA.scoped(false);
        grads_with(&s, &b, key, Activations::Recompute)
    };
    let before = forwards(3) + forwards(2);
    let on = {
        let _on = JOINT_LORA.scoped(true);
        grads_with(&s, &b, key, Activations::Recompute)
    };
    assert_eq!(
        forwards(3) + forwards(2),
        before,
        "with dropout the products stay apart"
    );
    for (name, want) in &separate {
        assert!(max_abs(want) > 0.0, "{name}: zero gradient");
        assert_eq!(max_abs(&(&on[name] - want).unwrap()), 0.0, "{name}");
    }
}

/// With the updates inside the base products' K too (`MOEQ_JOINT_IN_K`; rank 8, so the
/// hiddens take 24 columns, whole packs): the separate products' gradients within f32 rounding
/// (as above), kept = recomputed bit for bit, and the wide rows used on every architecture
/// whose joined q, k and v have no bias and sit behind a pre-norm.
fn updates_in_k_give_the_separate_gradients() {
    let mut wide = Vec::new();
    for arch in ARCHS {
        let s = setup_rank(arch, 0.0, false, true, 8);
        let b = batch(s.model.spec.vocab_size, 10);
        let separate = {
            let _off = JOINT_LORA.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let before = wide_forwards();
        let (in_k, kept) = {
            let (_on, _in_k) = (JOINT_LORA.scoped(true), JOINT_IN_K.scoped(true));
            let r = grads_with(&s, &b, None, Activations::Recompute);
            (r, grads_with(&s, &b, None, Activations::Keep))
        };
        if wide_forwards() > before {
            wide.push(arch);
        }
        within_rounding(&format!("{arch:?} in K"), &separate, &in_k, &kept);
    }
    // Apart from those: q/k/v biases (Qwen2-MoE, GLM-4.5, gpt-oss), the post-norm (FlexOlmo),
    // latent attention and the gated attention (as in the test above).
    use ModelType::*;
    let want = [
        Qwen3Moe,
        Mixtral,
        Olmoe,
        MinimaxM2,
        Ernie45Moe,
        GraniteMoe,
        HunyuanV1Moe,
        GraniteMoeShared,
        Llama4Text,
    ];
    assert_eq!(wide, want, "the architectures in K");
    // A 16-bit base keeps its products reading the weights in place: joined, not in K.
    let s = setup_rank(Qwen3Moe, 0.0, true, true, 8);
    let b = batch(s.model.spec.vocab_size, 11);
    let before = (wide_forwards(), forwards(3));
    let _on = (JOINT_LORA.scoped(true), JOINT_IN_K.scoped(true));
    let grads = grads_with(&s, &b, None, Activations::Recompute);
    assert!(grads.values().all(|g| max_abs(g) > 0.0));
    assert_eq!(wide_forwards(), before.0, "a 16-bit base in K");
    assert!(forwards(3) > before.1, "a 16-bit base's q/k/v joined");
}
