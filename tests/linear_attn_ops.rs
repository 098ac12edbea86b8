//! The linear-attention layer's fused ops, CPU twins of their kernels, against autograd through
//! the candle ops they replace, on seeded random data in f32 and bf16:
//! - `ops::delta_prep_op` (the conv output's heads → packed, repeated, L2-normalised q | k | v)
//!   against `delta_prep_op::reference`;
//! - `ops::gated_norm_op` (the gated RMSNorm, frozen weight) against
//!   `linear_attn_parts::gated_rms_norm`.
//!
//! Tolerances, relative to the largest magnitude of the reference:
//! - f32: 1e-6 forward and 1e-5 backward — the same equations, sums over ≤ 16 terms in another
//!   order, and the norms' backward written out where autograd composes it from ops (ulps).
//! - bf16 forward: the prep's output is f32 from bf16 inputs (1e-6, as f32); the norm rounds to
//!   bf16 at the reference's three points, so an ulp of f32 can tip one rounding: 2⁻⁸.
//! - bf16 backward: the twins round once at the end where autograd rounds every gradient that
//!   passes a bf16 tensor (the norm's p and n; the prep's per-head casts, then their sum in
//!   bf16): up to two bf16 steps of the largest value, 2⁻⁶ of it.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::rel;
use moeq::ops::delta_prep_op::{self, Heads};
use moeq::ops::gated_norm_op;
use moeq::ops::linear_attn_parts::gated_rms_norm;

fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

#[test]
fn delta_prep_equals_autograd_through_the_reference() {
    let cpu = &Device::Cpu;
    let shapes = [
        // Qwen3.5's grouping (two value heads per key head), and one value head per key head.
        Heads {
            key_heads: 2,
            value_heads: 4,
            dk: 8,
            dv: 6,
        },
        Heads {
            key_heads: 3,
            value_heads: 3,
            dk: 16,
            dv: 16,
        },
    ];
    for h in shapes {
        for (dtype, fwd_tol, bwd_tol) in [
            (DType::F32, 1e-6f32, 1e-5f32),
            (DType::BF16, 1e-6, 2.0 / 128.0),
        ] {
            let (b, t) = (2usize, 5usize);
            let c = 2 * h.key_heads * h.dk + h.value_heads * h.dv;
            let conv = Tensor::randn(0f32, 1.0, (b, t, c), cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let up = Tensor::randn(0f32, 1.0, (b, t, h.value_heads, 2 * h.dk + h.dv), cpu).unwrap();
            let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
                let v = Var::from_tensor(&conv).unwrap();
                let y = f(v.as_tensor()).unwrap();
                let grads = (y.clone() * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, grads.get(v.as_tensor()).expect("a gradient").clone())
            };
            let (y, dx) = run(&|x| delta_prep_op::apply(x, h));
            let (ry, rdx) = run(&|x| delta_prep_op::reference(x, h));
            assert_eq!((y.dtype(), dx.dtype()), (DType::F32, dtype));
            let (fwd, bwd) = (rel(&y, &ry), rel(&f32(&dx), &f32(&rdx)));
            assert!(
                fwd <= fwd_tol,
                "{h:?} {dtype:?} forward {fwd:e} > {fwd_tol:e}"
            );
            assert!(
                bwd <= bwd_tol,
                "{h:?} {dtype:?} d conv {bwd:e} > {bwd_tol:e}"
            );
        }
    }
}

#[test]
fn gated_norm_equals_autograd_through_the_reference() {
    let cpu = &Device::Cpu;
    let eps = 1e-6;
    for (dtype, fwd_tol, bwd_tol) in [
        (DType::F32, 1e-6f32, 1e-5f32),
        (DType::BF16, 1.0 / 256.0, 2.0 / 128.0),
    ] {
        let shape = (2usize, 7usize, 16usize);
        let rand = |s: f32| {
            Tensor::randn(0f32, s, shape, cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (x, gate) = (rand(1.0), rand(2.0));
        let w = (Tensor::randn(0f32, 0.3, 16, cpu).unwrap() + 1.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let up = Tensor::randn(0f32, 1.0, shape, cpu).unwrap();
        type Norm = fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>;
        let run = |f: Norm| {
            let (vx, vg) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&gate).unwrap(),
            );
            let y = f(vx.as_tensor(), vg.as_tensor(), &w, eps).unwrap();
            let grads = (f32(&y) * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
            (y, g(&vx), g(&vg))
        };
        let (y, dx, dg) = run(gated_norm_op::apply);
        let (ry, rdx, rdg) = run(gated_rms_norm);
        assert_eq!((y.dtype(), dx.dtype(), dg.dtype()), (dtype, dtype, dtype));
        let fwd = rel(&f32(&y), &f32(&ry));
        assert!(fwd <= fwd_tol, "{dtype:?} forward {fwd:e} > {fwd_tol:e}");
        for (name, got, want) in [("dx", &dx, &rdx), ("dgate", &dg, &rdg)] {
            let e = rel(&f32(got), &f32(want));
            assert!(e <= bwd_tol, "{dtype:?} {name} {e:e} > {bwd_tol:e}");
        }
    }
}

#[test]
fn a_trained_weight_is_refused_by_the_op() {
    // The op's backward gives the weight no gradient, so it refuses one that trains (the
    // layer's dispatcher sends that case to the reference ops).
    let cpu = &Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 8), cpu).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, 8, cpu).unwrap()).unwrap();
    let err = gated_norm_op::apply(&x, &x, w.as_tensor(), 1e-6)
        .unwrap_err()
        .to_string();
    assert!(err.contains("frozen"), "{err}");
    let frozen = w.as_tensor().detach();
    assert!(gated_norm_op::apply(&x, &x, &frozen, 1e-6).is_ok());
}
