//! gate_up's expert adapter inside the base product's K (`MOEQ_LORA_IN_K`, on by default,
//! src/ops/lora_in_k.rs) on tiny models of every architecture, on the CPU in f32. A binary of
//! its own: the switch is process-wide and changes the rounding, so the exact comparisons of
//! tests/trainer_grads.rs must not run beside it.

mod common;
mod grads_common;
use grads_common::{batch, grads_with, setup_rank, within_rounding, ARCHS};
use moeq::ops::lora_in_k::LORA_IN_K;
use moeq::train::step::Activations;

/// With the switch on, the gradients are the separate update's within f32 rounding (the same
/// sums in another order: 1e-4 of each tensor's largest gradient, which the tiny models' few
/// terms keep far above the differences), and kept activations give the recompute's bits.
/// Every architecture whose routed experts take the rows on one rank goes through it (all 18;
/// Llama 4's weighted rows keep the separate update).
#[test]
fn the_update_in_k_gives_the_separate_updates_gradients() {
    for arch in ARCHS {
        // Rank 8: the rank the thin kernels' shapes take (4 keeps the separate update).
        let s = setup_rank(arch, 0.0, false, true, 8);
        let b = batch(s.model.spec.vocab_size, 6);
        let separate = {
            let _off = LORA_IN_K.scoped(false);
            grads_with(&s, &b, None, Activations::Recompute)
        };
        let (in_k, kept) = {
            let _on = LORA_IN_K.scoped(true);
            let r = grads_with(&s, &b, None, Activations::Recompute);
            (r, grads_with(&s, &b, None, Activations::Keep))
        };
        assert!(
            separate.keys().any(|k| k.contains(".experts.")),
            "{arch:?}: expert adapters"
        );
        let moved = within_rounding(&format!("{arch:?} in K"), &separate, &in_k, &kept);
        // The switch took another path: some gradient's rounding moved (Llama 4 excepted).
        if arch != moeq::arch::ModelType::Llama4Text {
            assert!(moved, "{arch:?}: the switch changed nothing");
        }
    }
}
