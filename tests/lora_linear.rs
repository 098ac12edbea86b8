//! The fused 4-bit projection + LoRA op against the same function from primitive candle ops
//! (nf4_linear, bias, two matmuls, scale, add), values and gradients for x, A and B, with and
//! without a bias and a dropout mask, on random data.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::max_abs;
use moeq::ops::lora_linear::lora_linear;
use moeq::ops::nf4_linear::{nf4_linear, Nf4Weight};
use moeq::quant::{QuantSettings, QuantizedParam};

type Run = (Tensor, Tensor, Tensor, Tensor);

/// f32: both sides run the same products on the same values, and the gradients differ only
/// in summation order (x's two paths; ≤ 1e-5 on values of size ~1–10). bf16: each side rounds
/// its own intermediate products (the reference rounds the gradients of its primitive nodes
/// separately), so they differ by a few bf16 ulps of the largest value: ≤ 4 ulps = v/32.
#[test]
fn fused_lora_projection_matches_primitive_ops() {
    let dev = Device::Cpu;
    let (n, in_f, out_f, r) = (37, 128, 96, 8);
    let w: Vec<f32> = Tensor::randn(0f32, 0.05, out_f * in_f, &dev)
        .unwrap()
        .to_vec1()
        .unwrap();
    let q = QuantizedParam::quantize(&w, &[out_f, in_f], QuantSettings::default()).unwrap();
    let weight = Nf4Weight::from_param(&q, &dev).unwrap().into();
    let x0 = Tensor::randn(0f32, 1.0, (n, in_f), &dev).unwrap();
    let a0 = Tensor::randn(0f32, 0.3, (r, in_f), &dev).unwrap();
    let b0 = Tensor::randn(0f32, 0.3, (out_f, r), &dev).unwrap();
    let bias0 = Tensor::randn(0f32, 1.0, out_f, &dev).unwrap();
    let keep: Vec<f32> = (0..n * in_f)
        .map(|i| if (i * 7919) % 10 < 2 { 0.0 } else { 1.25 })
        .collect();
    let mask0 = Tensor::from_vec(keep, (n, in_f), &dev).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (n, out_f), &dev).unwrap();
    let scaling = 2.0;
    for dtype in [DType::F32, DType::BF16] {
        for (with_bias, with_mask) in [(false, false), (true, true)] {
            let bias = with_bias.then(|| bias0.to_dtype(dtype).unwrap());
            let mask = with_mask.then(|| mask0.to_dtype(dtype).unwrap());
            let run = |fused: bool| -> Run {
                let v = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
                let (x, a, b) = (v(&x0), v(&a0), v(&b0));
                let y = if fused {
                    lora_linear(
                        x.as_tensor(),
                        &weight,
                        bias.as_ref(),
                        a.as_tensor(),
                        b.as_tensor(),
                        scaling,
                        mask.as_ref(),
                    )
                    .unwrap()
                } else {
                    let mut y = nf4_linear(x.as_tensor(), &weight).unwrap();
                    if let Some(bias) = &bias {
                        y = y.broadcast_add(bias).unwrap();
                    }
                    let xin = match &mask {
                        Some(m) => (x.as_tensor() * m).unwrap(),
                        None => x.as_tensor().clone(),
                    };
                    let delta = xin
                        .matmul(&a.as_tensor().t().unwrap())
                        .unwrap()
                        .matmul(&b.as_tensor().t().unwrap())
                        .unwrap();
                    (y + (delta * scaling).unwrap()).unwrap()
                };
                let g = (y.to_dtype(DType::F32).unwrap() * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                (
                    y.to_dtype(DType::F32).unwrap(),
                    grad(&x),
                    grad(&a),
                    grad(&b),
                )
            };
            let (got, want) = (run(true), run(false));
            for (what, g, w) in [
                ("y", &got.0, &want.0),
                ("dx", &got.1, &want.1),
                ("da", &got.2, &want.2),
                ("db", &got.3, &want.3),
            ] {
                let tol = if dtype == DType::F32 {
                    1e-5 * max_abs(w).max(1.0)
                } else {
                    max_abs(w) / 32.0
                };
                let d = max_abs(&(g - w).unwrap());
                assert!(
                    d <= tol,
                    "{dtype:?} bias {with_bias} mask {with_mask} {what}: {d} > {tol}"
                );
                assert!(max_abs(w) > 0.1, "{what} is not exercised");
            }
        }
    }
}
