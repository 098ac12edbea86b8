//! q, k and v's adapters with their factor products joined (`MOEQ_JOINT_LORA`, off by
//! default, src/ops/lora_joint.rs) on tiny models of every architecture, on the CPU in f32. A
//! binary of its own: the switch is process-wide and changes the rounding, so the exact
//! comparisons of tests/trainer_grads.rs must not run beside it.

mod common;
mod grads_common;
use common::max_abs;
use grads_common::{batch, grads_with, setup_targets, setup_with, ARCHS};
use moeq::arch::ModelType;
use moeq::ops::lora_joint::{forwards, JOINT_LORA};
use moeq::train::step::Activations;

/// With the switch on, the gradients are the separate products' within f32 rounding (the same
/// sums in another order: 1e-4 of each tensor's largest gradient, which the tiny models' few
/// terms keep far above the differences), kept activations give the recompute's bits (the
/// plain forward and the recompute take the same path), and the joined path ran on every
/// architecture with q/k/v heads written out (not latent attention's projections, not the
/// gated attention candle's graph runs). One test: the switch is process-wide, and a second
/// test flipping it meanwhile would move this one's rounding.
#[test]
fn joined_q_k_v_adapters_give_the_separate_gradients() {
    dropout_keeps_the_products_apart();
    for arch in ARCHS {
        let s = setup_targets(arch, 0.0, false, true);
        let b = batch(s.model.spec.vocab_size, 8);
        let separate = {
            let _off = JOINT_LORA.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let before = forwards();
        let (joined, kept) = {
            let _on = JOINT_LORA.scoped(true);
            let r = grads_with(&s, &b, None, Activations::Recompute);
            (r, grads_with(&s, &b, None, Activations::Keep))
        };
        let ran = forwards() > before;
        // Latent attention's projections read different inputs; Qwen3-Next's and Qwen3.5's
        // full attention has an output gate and runs under candle's graph in the taped layer.
        let apart = matches!(
            arch,
            ModelType::Glm4MoeLite
                | ModelType::DeepseekV2
                | ModelType::DeepseekV3
                | ModelType::Qwen3Next
                | ModelType::Qwen35MoeText
        );
        assert_eq!(ran, !apart, "{arch:?}: the joined path ran: {ran}");
        assert_eq!(
            separate.keys().collect::<Vec<_>>(),
            joined.keys().collect::<Vec<_>>()
        );
        for (name, want) in &separate {
            let scale = max_abs(want);
            assert!(scale > 0.0, "{arch:?} {name}: zero gradient");
            let err = max_abs(&(&joined[name] - want).unwrap());
            assert!(
                err <= 1e-4 * scale,
                "{arch:?} {name}: joined vs separate differ by {err:e} (scale {scale:e})"
            );
            let exact = max_abs(&(&kept[name] - &joined[name]).unwrap());
            assert_eq!(exact, 0.0, "{arch:?} {name}: kept vs recomputed");
        }
    }
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
    let before = forwards();
    let on = {
        let _on = JOINT_LORA.scoped(true);
        grads_with(&s, &b, key, Activations::Recompute)
    };
    assert_eq!(forwards(), before, "with dropout the products stay apart");
    for (name, want) in &separate {
        assert!(max_abs(want) > 0.0, "{name}: zero gradient");
        assert_eq!(max_abs(&(&on[name] - want).unwrap()), 0.0, "{name}");
    }
}
