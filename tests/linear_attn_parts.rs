//! The conv and gated norm of Qwen3-Next's Gated DeltaNet (`moeq::ops::linear_attn_parts`):
//! forward against plain-loop hand computations, backward against central finite differences,
//! on seeded random data.
//!
//! Tolerances, relative to the largest magnitude of the reference:
//! - f32 forward 1e-6: the conv loop sums the taps in the same order as the op, so only SiLU's
//!   exp can differ (an ulp); the norm's hand version runs in f64, the op in f32 over D = 16
//!   terms, a few ulps (≈ 1e-7).
//! - bf16 norm 2⁻⁸ (one bf16 ulp): the hand version rounds at the same three points; only the
//!   f32 `1/sqrt` may tip a rounding the other way.
//! - gradients 1e-6, in f64 (the norm through `gated_rms_norm_in(.., F64)`): central
//!   differences with h = 1e-5 carry O(h²) ≈ 1e-10 truncation and ≈ 1e-16/h ≈ 1e-11 rounding.

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use moeq::ops::linear_attn_parts::{causal_conv1d_silu, gated_rms_norm, gated_rms_norm_in};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const F32_TOL: f64 = 1e-6;
const BF16_TOL: f64 = 1.0 / 256.0;
const GRAD_TOL: f64 = 1e-6;
const FD_H: f64 = 1e-5;
const EPS: f64 = 1e-6;

fn randn_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

fn tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f64, |m, y| m.max(y.abs()));
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

fn silu32(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn silu64(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The conv as a plain loop in f32, taps in order: y[b, t, c] = silu(Σ_k w[c, k]·x[b, t+k−(K−1), c]).
fn conv_by_hand(x: &[f32], w: &[f32], b: usize, t: usize, c: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; b * t * c];
    for bi in 0..b {
        for ti in 0..t {
            for ci in 0..c {
                let mut acc = 0f32;
                for tap in 0..k {
                    let Some(src) = (ti + tap).checked_sub(k - 1) else {
                        continue;
                    };
                    acc += w[ci * k + tap] * x[(bi * t + src) * c + ci];
                }
                y[(bi * t + ti) * c + ci] = silu32(acc) as f64;
            }
        }
    }
    y
}

#[test]
fn conv_matches_hand_loop() {
    let (b, t, c, k) = (2, 9, 5, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = randn_vec(&mut rng, b * t * c);
    let w = randn_vec(&mut rng, c * k);
    let y = causal_conv1d_silu(&tensor(&x, &[b, t, c]), &tensor(&w, &[c, k])).unwrap();
    assert_eq!(y.dims(), [b, t, c]);
    assert_eq!(y.dtype(), DType::F32);
    let got = flat(&y);
    let want = conv_by_hand(&x, &w, b, t, c, k);
    let err = rel_err(&got, &want);
    assert!(err < F32_TOL, "conv vs hand loop: rel err {err:e}");
    // The first K−1 positions see zeros before 0: position 0 is silu(w[c, K−1]·x[0, c]).
    for bi in 0..b {
        for ci in 0..c {
            let first = silu32(w[ci * k + k - 1] * x[bi * t * c + ci]) as f64;
            let at = got[bi * t * c + ci];
            assert!(
                (at - first).abs() <= 1e-6 * first.abs().max(1.0),
                "b{bi} c{ci}: {at} vs {first}"
            );
        }
    }
}

#[test]
fn conv_of_kernel_one_is_pointwise() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (b, t, c) = (1, 6, 3);
    let x = randn_vec(&mut rng, b * t * c);
    let w = randn_vec(&mut rng, c);
    let y = causal_conv1d_silu(&tensor(&x, &[b, t, c]), &tensor(&w, &[c, 1])).unwrap();
    let err = rel_err(&flat(&y), &conv_by_hand(&x, &w, b, t, c, 1));
    assert!(err < F32_TOL, "K = 1: rel err {err:e}");
}

/// Autograd gradients of Σ f(inputs)·up against central differences, every element, in f64.
fn check_grads(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let out_shape = f(inputs).dims().to_vec();
    let n_out: usize = out_shape.iter().product();
    let up = tensor(&randn_vec(&mut rng, n_out), &out_shape)
        .to_dtype(DType::F64)
        .unwrap();
    let loss = |ins: &[Tensor]| -> f64 {
        (f(ins) * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let var_ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&var_ts) * &up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let got = flat(grads.get(v).expect("input has a gradient"));
        let base = flat(&inputs[i]);
        let mut want = vec![0f64; base.len()];
        for (j, w) in want.iter_mut().enumerate() {
            let shifted = |delta: f64| {
                let mut data = base.clone();
                data[j] += delta;
                let mut ins = inputs.to_vec();
                ins[i] = Tensor::from_vec(data, inputs[i].dims(), &Device::Cpu).unwrap();
                loss(&ins)
            };
            *w = (shifted(FD_H) - shifted(-FD_H)) / (2.0 * FD_H);
        }
        let err = rel_err(&got, &want);
        assert!(
            err < GRAD_TOL,
            "{name}: gradient of input {i}: rel err {err:e}"
        );
    }
}

fn randn64(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    tensor(&randn_vec(rng, n), shape)
        .to_dtype(DType::F64)
        .unwrap()
}

#[test]
fn conv_gradients_match_finite_differences() {
    let (b, t, c, k) = (2, 9, 5, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let x = randn64(&mut rng, &[b, t, c]);
    let w = randn64(&mut rng, &[c, k]);
    let f = |ins: &[Tensor]| causal_conv1d_silu(&ins[0], &ins[1]).unwrap();
    check_grads("causal_conv1d_silu", &[x, w], &f, 14);
}

/// `Qwen3NextRMSNormGated` by hand in f64: x·rsqrt(mean(x²)+eps)·w·silu(gate).
fn gated_norm_by_hand(x: &[f32], gate: &[f32], w: &[f32]) -> Vec<f64> {
    let d = w.len();
    let mut y = Vec::with_capacity(x.len());
    for (xr, gr) in x.chunks(d).zip(gate.chunks(d)) {
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + EPS).sqrt();
        for i in 0..d {
            y.push(xr[i] as f64 * inv * w[i] as f64 * silu64(gr[i] as f64));
        }
    }
    y
}

#[test]
fn gated_norm_matches_hand_computation() {
    let (rows, heads, d) = (3, 2, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let x = randn_vec(&mut rng, rows * heads * d);
    let gate = randn_vec(&mut rng, rows * heads * d);
    // A trained-looking weight around 1, never the ones it is initialised to.
    let w: Vec<f32> = randn_vec(&mut rng, d)
        .iter()
        .map(|v| 1.0 + 0.3 * v)
        .collect();
    let shape = [rows, heads, d];
    let y = gated_rms_norm(
        &tensor(&x, &shape),
        &tensor(&gate, &shape),
        &tensor(&w, &[d]),
        EPS,
    )
    .unwrap();
    assert_eq!(y.dims(), shape);
    assert_eq!(y.dtype(), DType::F32);
    let err = rel_err(&flat(&y), &gated_norm_by_hand(&x, &gate, &w));
    assert!(err < F32_TOL, "gated norm vs hand: rel err {err:e}");
}

/// In bf16 the class rounds three times: the normed x to bf16, weight·n in bf16, and the
/// f32 product with silu(gate.f32) back to bf16.
#[test]
fn gated_norm_rounds_where_the_class_does_in_bf16() {
    let (rows, d) = (4, 32);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let r = |v: f32| bf16::from_f32(v).to_f32();
    let x: Vec<f32> = randn_vec(&mut rng, rows * d).into_iter().map(r).collect();
    let gate: Vec<f32> = randn_vec(&mut rng, rows * d).into_iter().map(r).collect();
    let w: Vec<f32> = randn_vec(&mut rng, d)
        .iter()
        .map(|v| r(1.0 + 0.3 * v))
        .collect();
    let mut want = Vec::with_capacity(x.len());
    for (xr, gr) in x.chunks(d).zip(gate.chunks(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + EPS as f32).sqrt();
        for i in 0..d {
            let n = r(xr[i] * inv);
            let p = r(w[i] * n);
            want.push(r(p * silu32(gr[i])) as f64);
        }
    }
    let b = |v: &[f32], s: &[usize]| tensor(v, s).to_dtype(DType::BF16).unwrap();
    let y = gated_rms_norm(&b(&x, &[rows, d]), &b(&gate, &[rows, d]), &b(&w, &[d]), EPS).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let err = rel_err(&flat(&y), &want);
    assert!(err < BF16_TOL, "bf16 gated norm vs hand: rel err {err:e}");
}

#[test]
fn gated_norm_gradients_match_finite_differences() {
    let (rows, d) = (3, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let x = randn64(&mut rng, &[rows, d]);
    let gate = randn64(&mut rng, &[rows, d]);
    let w = randn64(&mut rng, &[d]).affine(0.3, 1.0).unwrap();
    let f = |ins: &[Tensor]| gated_rms_norm_in(&ins[0], &ins[1], &ins[2], EPS, DType::F64).unwrap();
    check_grads("gated_rms_norm", &[x, gate, w], &f, 24);
}

#[test]
fn mismatched_shapes_are_named() {
    let x = Tensor::ones((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    let err = causal_conv1d_silu(&x, &w).unwrap_err().to_string();
    assert!(
        err.contains("causal_conv1d_silu") && err.contains("[C, K]"),
        "{err}"
    );
    let g = Tensor::ones((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let nw = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let err = gated_rms_norm(&x, &g, &nw, EPS).unwrap_err().to_string();
    assert!(
        err.contains("gated_rms_norm") && err.contains("gate"),
        "{err}"
    );
}
