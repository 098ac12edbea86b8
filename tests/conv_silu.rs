//! The conv + SiLU op of Gated DeltaNet (`moeq::ops::conv_silu_op`, the CPU twin of
//! `kernels/conv_silu.cu`) against autograd through its reference
//! (`linear_attn_parts::causal_conv1d_silu`), on seeded random data: output, d x and d weight, in
//! f32 and bf16, and a weight that takes no gradient gets none.
//!
//! Tolerances, relative to the largest magnitude of the reference:
//! - forward 0: the twin sums the taps in the reference's order and rounds at the same points.
//! - f32 gradients 1e-6: the gradient of SiLU is written out (σ·(1 + v·(1 − σ))) where autograd
//!   builds it from candle ops, and d x / d weight add the same products in another order: ulps.
//! - bf16 gradients 2⁻⁷ (two bf16 ulps): the twin rounds d v and the sums once to bf16 where
//!   autograd's casts do, so an ulp-level f32 difference can tip a rounding either way, twice
//!   along the chain.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::rel;
use moeq::ops::conv_silu_op::apply;
use moeq::ops::linear_attn_parts::causal_conv1d_silu;

/// (y, dx, dw) for loss = Σ y·up, through `f`.
fn run(
    f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    up: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (vx, vw) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = f(vx.as_tensor(), vw.as_tensor()).unwrap();
    let loss = (y.to_dtype(DType::F32).unwrap() * up)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
    (y, g(&vx), g(&vw))
}

#[test]
fn op_equals_autograd_through_the_reference() {
    let cpu = &Device::Cpu;
    for (dtype, grad_tol) in [(DType::F32, 1e-6f32), (DType::BF16, 2.0 / 128.0)] {
        let (b, t, c, k) = (2usize, 37usize, 24usize, 4usize);
        let x = Tensor::randn(0f32, 1.0, (b, t, c), cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(0f32, 0.5, (c, k), cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let up = Tensor::randn(0f32, 1.0, (b, t, c), cpu).unwrap();
        let (y, dx, dw) = run(apply, &x, &w, &up);
        let (ry, rdx, rdw) = run(causal_conv1d_silu, &x, &w, &up);
        assert_eq!(y.dtype(), dtype);
        assert_eq!(dx.dtype(), dtype);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let fwd = rel(&f32(&y), &f32(&ry));
        assert!(fwd == 0.0, "{dtype:?} forward differs: {fwd:e}");
        for (name, got, want) in [("dx", &dx, &rdx), ("dw", &dw, &rdw)] {
            let e = rel(&f32(got), &f32(want));
            assert!(e <= grad_tol, "{dtype:?} {name}: {e:e} > {grad_tol:e}");
        }
    }
}

#[test]
fn frozen_weight_takes_no_gradient_and_bad_shapes_fail() {
    let cpu = &Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 9, 6), cpu).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1.0, (6, 3), cpu).unwrap();
    let y = apply(x.as_tensor(), &w).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
    let err = apply(
        x.as_tensor(),
        &Tensor::zeros((5, 3), DType::F32, cpu).unwrap(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("must be [B, T, C] and [C, K ≥ 1]"),
        "{err}"
    );
    let err = apply(x.as_tensor(), &w.to_dtype(DType::BF16).unwrap()).unwrap_err();
    assert!(err.to_string().contains("of one dtype"), "{err}");
}
