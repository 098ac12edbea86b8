//! The grouped expert ops against their references on random data (CPU; `moeq gpu-check`
//! compares the CUDA versions with these): `grouped_gemm` against a float64 triple loop for
//! every transpose combination, with empty groups, gaps in the output and zero-length sums;
//! `grouped_nf4` (chunked) and `grouped_lora` (explicit backward) against per-expert loops with
//! candle's autograd, forward and every gradient.

use candle_core::{DType, Device, Result, Tensor, Var};
use moeq::ops::experts::{
    grouped_lora, grouped_lora_reference, grouped_nf4_chunked, grouped_nf4_reference, ExpertWeights,
};
use moeq::ops::grouped_gemm::{grouped_gemm, Gemm, Product};
use moeq::ops::nf4_linear::Nf4Weight;
use moeq::quant::{QuantSettings, QuantizedParam};
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Largest |a − b| over the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "reference is all zeros");
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff.is_finite());
    diff / scale
}

#[test]
fn grouped_gemm_matches_a_float64_loop_for_every_layout() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        // Five products of different shapes, one with k = 0 (its output must read zero) and
        // one with m = 0; outputs placed out of order with gaps between them.
        let shapes = [(3, 5, 7), (0, 4, 2), (6, 2, 9), (4, 3, 0), (1, 8, 5)];
        let (mut a_len, mut b_len) = (0, 0);
        let mut products = Vec::new();
        let mut c_at = [40usize, 0, 60, 20, 100];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            products.push(Product {
                a: a_len,
                b: b_len,
                c: c_at[i],
                m,
                n,
                k,
            });
            a_len += m * k + 3;
            b_len += k * n + 1;
        }
        c_at.sort_unstable();
        let c_len = 120;
        let a = rand_vec(&mut rng, a_len);
        let b = rand_vec(&mut rng, b_len);
        let alpha = 1.5;
        let gemm = Gemm {
            trans_a,
            trans_b,
            alpha,
        };
        let got = grouped_gemm(
            &Tensor::new(a.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(b.as_slice(), &Device::Cpu).unwrap(),
            c_len,
            &products,
            gemm,
        )
        .unwrap();
        let mut want = vec![0f64; c_len];
        for p in &products {
            for i in 0..p.m {
                for j in 0..p.n {
                    let mut s = 0f64;
                    for l in 0..p.k {
                        let av = if trans_a {
                            a[p.a + l * p.m + i]
                        } else {
                            a[p.a + i * p.k + l]
                        };
                        let bv = if trans_b {
                            b[p.b + j * p.k + l]
                        } else {
                            b[p.b + l * p.n + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    want[p.c + i * p.n + j] = alpha * s;
                }
            }
        }
        let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
        let err = rel_err(&got, &Tensor::new(want.as_slice(), &Device::Cpu).unwrap());
        // f32 sums of at most 9 products against f64: a few f32 ulps.
        assert!(err < 1e-6, "({trans_a}, {trans_b}): {err}");
    }
}

#[test]
fn grouped_gemm_refuses_overlaps_and_out_of_bounds_blocks() {
    let a = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
    let p = |c, m| Product {
        a: 0,
        b: 0,
        c,
        m,
        n: 2,
        k: 2,
    };
    let err = |ps: &[Product], c_len| {
        grouped_gemm(&a, &a, c_len, ps, Gemm::nn(1.0))
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[p(0, 2), p(2, 1)], 8).contains("overlapping"));
    assert!(err(&[p(6, 2)], 8).contains("outside"));
    let wide = Product {
        a: 10,
        b: 0,
        c: 0,
        m: 2,
        n: 2,
        k: 4,
    };
    assert!(err(&[wide], 8).contains("outside"));
}

fn quantized_experts(rng: &mut impl Rng, n: usize, out: usize, inp: usize) -> ExpertWeights {
    let ws: Vec<Nf4Weight> = (0..n)
        .map(|_| {
            let w: Vec<f32> = rand_vec(rng, out * inp).iter().map(|v| v * 0.1).collect();
            let q = QuantizedParam::quantize(&w, &[out, inp], QuantSettings::default()).unwrap();
            Nf4Weight::from_param(&q, &Device::Cpu).unwrap()
        })
        .collect();
    ExpertWeights::stack(&ws).unwrap()
}

/// Output and gradients of `sum(f(inputs) · upstream)` for each input.
fn run(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    // A fixed upstream gradient, the same on both sides.
    let n = y.elem_count();
    let up: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let up = Tensor::from_vec(up, y.shape(), &Device::Cpu).unwrap();
    let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("no gradient").clone())
        .collect();
    (y, gs)
}

#[test]
fn grouped_nf4_in_chunks_matches_the_per_expert_reference() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (out, inp) = (48, 64);
    let w = quantized_experts(&mut rng, 7, out, inp);
    let counts = [5usize, 0, 9, 1, 0, 12, 3];
    let m: usize = counts.iter().sum();
    let x = Tensor::from_vec(rand_vec(&mut rng, m * inp), (m, inp), &Device::Cpu).unwrap();
    let (y_ref, g_ref) = run(std::slice::from_ref(&x), |t| {
        grouped_nf4_reference(&t[0], &w, &counts)
    });
    // One expert's f32 weights are 12 KB: chunks of 1, 2 and 3 experts, and all at once.
    for chunk_bytes in [1, 2 * 12288, 3 * 12288, 1 << 30] {
        let (y, g) = run(std::slice::from_ref(&x), |t| {
            grouped_nf4_chunked(&t[0], &w, &counts, chunk_bytes)
        });
        // Same f32 products, possibly another summation order in the matmul: 1e-6 of scale.
        assert!(rel_err(&y, &y_ref) < 1e-6, "forward, chunk {chunk_bytes}");
        assert!(rel_err(&g[0], &g_ref[0]) < 1e-6, "d_x, chunk {chunk_bytes}");
    }
}

#[test]
fn grouped_lora_matches_the_autograd_reference() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let (out, inp, r, num_experts) = (40, 24, 4, 9);
    // Local experts 2..8 of 9 (a rank's slice), two of them without rows.
    let (first, counts) = (2, [4usize, 0, 7, 2, 0, 11]);
    let m: usize = counts.iter().sum();
    let x = Tensor::from_vec(rand_vec(&mut rng, m * inp), (m, inp), &Device::Cpu).unwrap();
    let a = Tensor::from_vec(
        rand_vec(&mut rng, r * num_experts * inp),
        (r * num_experts, inp),
        &Device::Cpu,
    )
    .unwrap();
    let b = Tensor::from_vec(
        rand_vec(&mut rng, out * r * num_experts),
        (out, r * num_experts),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = [x, a, b];
    let (y, g) = run(&inputs, |t| {
        grouped_lora(&t[0], &t[1], &t[2], &counts, first, r, 2.0)
    });
    let (y_ref, g_ref) = run(&inputs, |t| {
        grouped_lora_reference(&t[0], &t[1], &t[2], &counts, first, r, 2.0)
    });
    // f32 with other association of the same sums (explicit formulas vs autograd): 1e-5.
    assert!(rel_err(&y, &y_ref) < 1e-5);
    for (i, name) in ["d_x", "d_A", "d_B"].iter().enumerate() {
        let e = rel_err(&g[i], &g_ref[i]);
        assert!(e < 1e-5, "{name}: {e}");
    }
    // Experts outside the slice and experts without rows get exactly zero.
    let da: Vec<Vec<f32>> = g[1].to_vec2().unwrap();
    for e in [0, 1, 3, 6, 8] {
        assert!(da[e * r..(e + 1) * r].iter().flatten().all(|v| *v == 0.0));
    }
}

/// A random top-k routing of `n` tokens over `e` experts, rows sorted by expert then token.
fn random_order(rng: &mut impl Rng, n: usize, e: usize, k: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rows: Vec<(u32, u32, u32)> = Vec::new(); // (expert, token, slot)
    for t in 0..n {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k {
            let c = rng.random_range(0..e as u32);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        for (j, &c) in chosen.iter().enumerate() {
            rows.push((c, t as u32, (t * k + j) as u32));
        }
    }
    rows.sort_unstable();
    (
        rows.iter().map(|r| r.1).collect(),
        rows.iter().map(|r| r.2).collect(),
    )
}

#[test]
fn routing_gathers_match_index_select_and_index_add_with_autograd() {
    use moeq::ops::routing::{combine_rows, gather_rows, RowOrder};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (n, h, e, k) = (37, 24, 6, 3);
    let (tokens, slots) = random_order(&mut rng, n, e, k);
    let order = RowOrder::new(tokens.clone(), slots.clone(), k, &Device::Cpu).unwrap();
    let cpu = &Device::Cpu;
    let x = Tensor::from_vec(rand_vec(&mut rng, n * h), (n, h), cpu).unwrap();
    let w = Tensor::from_vec(rand_vec(&mut rng, n * k), (n, k), cpu).unwrap();
    let tok = Tensor::new(tokens.as_slice(), cpu).unwrap();
    let slot = Tensor::new(slots.as_slice(), cpu).unwrap();
    // Gather, an elementwise map standing in for the experts, then combine: forward and the
    // gradients of x and w through both ops.
    let pipeline = |t: &[Tensor], ours: bool| -> Result<Tensor> {
        let xs = if ours {
            gather_rows(&t[0], &order)?
        } else {
            t[0].index_select(&tok, 0)?
        };
        let y = (xs.sin()? * 2.0)?;
        if ours {
            combine_rows(&y, &t[1], &order)
        } else {
            let wr = t[1].flatten_all()?.index_select(&slot, 0)?;
            Tensor::zeros((n, h), DType::F32, cpu)?.index_add(
                &tok,
                &y.broadcast_mul(&wr.unsqueeze(1)?)?,
                0,
            )
        }
    };
    let inputs = [x, w];
    let (y, g) = run(&inputs, |t| pipeline(t, true));
    let (y_ref, g_ref) = run(&inputs, |t| pipeline(t, false));
    // f32 sums of k = 3 terms in another order: a few ulps.
    assert!(rel_err(&y, &y_ref) < 1e-6);
    assert!(rel_err(&g[0], &g_ref[0]) < 1e-6, "d_x");
    assert!(rel_err(&g[1], &g_ref[1]) < 1e-6, "d_w");
    // A routing that drops a slot is refused.
    let err = RowOrder::new(vec![0, 1], vec![0, 0], 2, cpu).err().unwrap();
    assert!(err.to_string().contains("repeated"), "{err}");
}

#[test]
fn packed_swiglu_matches_the_primitive_op_reference() {
    use moeq::ops::swiglu::{swiglu_packed, swiglu_packed_reference};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let (rows, half) = (23, 40);
    // Gate values over silu's curved region and tails.
    let gu: Vec<f32> = rand_vec(&mut rng, rows * 2 * half)
        .iter()
        .map(|v| v * 6.0)
        .collect();
    let gu = Tensor::from_vec(gu, (rows, 2 * half), &Device::Cpu).unwrap();
    let (y, g) = run(std::slice::from_ref(&gu), |t| swiglu_packed(&t[0]));
    let (y_ref, g_ref) = run(std::slice::from_ref(&gu), |t| {
        swiglu_packed_reference(&t[0])
    });
    assert_eq!(y.dims(), &[rows, half]);
    // f32, the same formula in another arrangement: a few ulps of the largest value.
    assert!(rel_err(&y, &y_ref) < 1e-6);
    assert!(rel_err(&g[0], &g_ref[0]) < 1e-6);
}

/// gpt-oss's clamped GLU over interleaved (gate, up) pairs against its primitive-op reference,
/// forward and both gradients: values spread to ±12 so about a fifth of the gates and up values
/// sit beyond the limit 7 (their gradient is zero) and the rest over the sigmoid's curve. f32,
/// the same formula in another arrangement: a few ulps of the largest value.
#[test]
fn clamped_glu_matches_the_primitive_op_reference() {
    use moeq::ops::swiglu::{clamped_glu_reference, glu_packed, Glu};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    let (rows, half) = (19, 24);
    let gu: Vec<f32> = rand_vec(&mut rng, rows * 2 * half)
        .iter()
        .map(|v| v * 12.0)
        .collect();
    let clamped = gu.iter().filter(|v| v.abs() > 7.0).count();
    assert!(
        clamped > gu.len() / 10,
        "{clamped} of {} beyond the limit",
        gu.len()
    );
    let gu = Tensor::from_vec(gu, (rows, 2 * half), &Device::Cpu).unwrap();
    let glu = Glu::Clamped {
        alpha: 1.702,
        limit: 7.0,
    };
    let (y, g) = run(std::slice::from_ref(&gu), |t| glu_packed(&t[0], glu));
    let (y_ref, g_ref) = run(std::slice::from_ref(&gu), |t| {
        clamped_glu_reference(&t[0], 1.702, 7.0)
    });
    assert_eq!(y.dims(), &[rows, half]);
    assert!(rel_err(&y, &y_ref) < 1e-6);
    assert!(rel_err(&g[0], &g_ref[0]) < 1e-6);
    let zeros = g[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .filter(|v| **v == 0.0)
        .count();
    assert!(
        zeros >= clamped / 2,
        "{zeros} zero gradients for {clamped} clamped inputs"
    );
}

/// The fused routed-experts op (gather, gate_up, SwiGLU, down, combine in one node) against the
/// same five ops in sequence, forward and the gradients of x and the routing weights, f32 and
/// bf16, with an expert no row chose. It calls the same functions in the same order, and a
/// gradient's first contribution is added to zeros (exact), so the results are bit for bit
/// equal (tolerance 0).
/// Random top-k routing of `n` tokens over experts `0..e-1` (expert `e - 1` is never chosen: an
/// empty group): the row order by expert and the rows per expert.
fn random_routing(
    rng: &mut impl Rng,
    n: usize,
    e: usize,
    k: usize,
) -> (moeq::ops::routing::RowOrder, Vec<usize>) {
    let mut rows: Vec<(usize, u32, u32)> = Vec::new(); // (expert, token, slot)
    for t in 0..n {
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < k {
            let c = rng.random_range(0..e - 1);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        for (j, &c) in chosen.iter().enumerate() {
            rows.push((c, t as u32, (t * k + j) as u32));
        }
    }
    rows.sort_unstable();
    let mut counts = vec![0usize; e];
    for r in &rows {
        counts[r.0] += 1;
    }
    let order = moeq::ops::routing::RowOrder::new(
        rows.iter().map(|r| r.1).collect(),
        rows.iter().map(|r| r.2).collect(),
        k,
        &Device::Cpu,
    )
    .unwrap();
    (order, counts)
}

#[test]
fn routed_experts_op_equals_the_separate_ops() {
    use moeq::ops::experts::grouped_nf4;
    use moeq::ops::routed_experts::{routed_experts, Weights};
    use moeq::ops::routing::{combine_rows, gather_rows};
    use moeq::ops::swiglu::swiglu_packed;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    let (n, h, i, e, k) = (29, 64, 32, 6, 2);
    let (order, counts) = random_routing(&mut rng, n, e, k);
    let cpu = &Device::Cpu;
    let gate_up = quantized_experts(&mut rng, e, 2 * i, h);
    let down = quantized_experts(&mut rng, e, h, i);
    let x = Tensor::from_vec(rand_vec(&mut rng, n * h), (n, h), cpu).unwrap();
    let w = Tensor::from_vec(rand_vec(&mut rng, n * k), (n, k), cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let inputs = [x.to_dtype(dtype).unwrap(), w.clone()];
        let (y, g) = run(&inputs, |t| {
            routed_experts(
                &t[0],
                Weights::Output(&t[1]),
                &order,
                &gate_up,
                &down,
                &counts,
                None,
            )?
            .to_dtype(DType::F32)
        });
        let (y_ref, g_ref) = run(&inputs, |t| {
            let xs = gather_rows(&t[0], &order)?;
            let gu = grouped_nf4(&xs, &gate_up, &counts)?;
            let act = swiglu_packed(&gu)?;
            let ys = grouped_nf4(&act, &down, &counts)?;
            combine_rows(&ys, &t[1], &order)?.to_dtype(DType::F32)
        });
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(rel_err(&f(&y), &f(&y_ref)), 0.0, "{dtype:?} forward");
        assert_eq!(rel_err(&f(&g[0]), &f(&g_ref[0])), 0.0, "{dtype:?} d_x");
        assert_eq!(rel_err(&f(&g[1]), &f(&g_ref[1])), 0.0, "{dtype:?} d_w");
    }
}

/// With expert adapters on gate_up, down or both, the one op equals gather → grouped_nf4 +
/// grouped_lora → SwiGLU → grouped_nf4 + grouped_lora → combine with candle's autograd, bit
/// for bit (the same functions in the same order; the adapters' gradients leave the op as
/// one flat tensor and are cut back apart), for every input and factor.
#[test]
fn routed_experts_op_with_adapters_equals_the_separate_ops() {
    use moeq::ops::experts::{grouped_lora, grouped_nf4};
    use moeq::ops::routed_experts::{routed_experts, ExpertLora, Weights};
    use moeq::ops::routing::{combine_rows, gather_rows};
    use moeq::ops::swiglu::swiglu_packed;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(29);
    let (n, h, i, e, k, r) = (23, 64, 32, 5, 2, 4);
    let (order, counts) = random_routing(&mut rng, n, e, k);
    let cpu = &Device::Cpu;
    let gate_up = quantized_experts(&mut rng, e, 2 * i, h);
    let down = quantized_experts(&mut rng, e, h, i);
    let mut t = |rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = rand_vec(&mut rng, rows * cols)
            .iter()
            .map(|x| x * scale)
            .collect();
        Tensor::from_vec(v, (rows, cols), cpu).unwrap()
    };
    let x = t(n, h, 1.0);
    let w = t(n, k, 1.0);
    let factors = [
        t(r * e, h, 0.1),
        t(2 * i, r * e, 0.1),
        t(r * e, i, 0.1),
        t(h, r * e, 0.1),
    ];
    let s = 2.0;
    for (on_gate_up, on_down) in [(true, true), (true, false), (false, true)] {
        for dtype in [DType::F32, DType::BF16] {
            // Inputs: x, w, then the factors of the adapted projections (gate_up's first).
            let mut inputs = vec![x.to_dtype(dtype).unwrap(), w.clone()];
            if on_gate_up {
                inputs.extend(factors[..2].iter().cloned());
            }
            if on_down {
                inputs.extend(factors[2..].iter().cloned());
            }
            let down_at = if on_gate_up { 4 } else { 2 };
            let pair =
                |t: &[Tensor], at: usize, on: bool| on.then(|| (t[at].clone(), t[at + 1].clone()));
            let (y, g) = run(&inputs, |t| {
                let l = ExpertLora {
                    gate_up: pair(t, 2, on_gate_up),
                    down: pair(t, down_at, on_down),
                    r,
                    scaling: s,
                };
                routed_experts(
                    &t[0],
                    Weights::Output(&t[1]),
                    &order,
                    &gate_up,
                    &down,
                    &counts,
                    Some(&l),
                )?
                .to_dtype(DType::F32)
            });
            let (y_ref, g_ref) = run(&inputs, |t| {
                let xs = gather_rows(&t[0], &order)?;
                let mut gu = grouped_nf4(&xs, &gate_up, &counts)?;
                if on_gate_up {
                    gu = (gu + grouped_lora(&xs, &t[2], &t[3], &counts, 0, r, s)?)?;
                }
                let act = swiglu_packed(&gu)?;
                let mut ys = grouped_nf4(&act, &down, &counts)?;
                if on_down {
                    let (a, b) = (&t[down_at], &t[down_at + 1]);
                    ys = (ys + grouped_lora(&act, a, b, &counts, 0, r, s)?)?;
                }
                combine_rows(&ys, &t[1], &order)?.to_dtype(DType::F32)
            });
            let what = format!("{dtype:?} gate_up {on_gate_up} down {on_down}");
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert_eq!(rel_err(&f(&y), &f(&y_ref)), 0.0, "{what} forward");
            assert_eq!(g.len(), inputs.len());
            for (j, (got, want)) in g.iter().zip(&g_ref).enumerate() {
                assert_eq!(rel_err(&f(got), &f(want)), 0.0, "{what} d_input{j}");
            }
        }
    }
}
