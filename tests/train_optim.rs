//! AdamW against a scalar transcription of `torch.optim.AdamW`'s update, on random data.

mod common;
use common::max_abs;

use candle_core::{DType, Device, Tensor, Var};
use moeq::train::{AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

#[test]
fn adamw_matches_the_pytorch_update() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        eight_bit: false,
    };
    let p0 = randn(&mut rng, 64);
    let var = Var::from_vec(p0.clone(), 64, &Device::Cpu).unwrap();
    let frozen = Var::from_vec(randn(&mut rng, 8), 8, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![("b".into(), frozen.clone()), ("a".into(), var.clone())],
        cfg,
    )
    .unwrap();
    let (mut p, mut m, mut v) = (
        p0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        vec![0f64; 64],
        vec![0f64; 64],
    );
    for (t, lr) in [(1, 1e-2), (2, 5e-3), (3, 1e-3)] {
        let g = randn(&mut rng, 64);
        // A loss whose gradient w.r.t. `var` is exactly g: sum(var · g). `frozen` gets none.
        let loss = (var.as_tensor() * Tensor::new(g.as_slice(), &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, lr).unwrap();
        for i in 0..64 {
            let gi = g[i] as f64;
            p[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
            let denom = v[i].sqrt() / (1.0 - cfg.beta2.powi(t)).sqrt() + cfg.eps;
            p[i] -= lr / (1.0 - cfg.beta1.powi(t)) * m[i] / denom;
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..64 {
            // f32 state and arithmetic against an f64 transcription: a few f32 ulps.
            assert!(
                (got[i] as f64 - p[i]).abs() <= 1e-6 * (1.0 + p[i].abs()),
                "step {t} elem {i}: {} vs {}",
                got[i],
                p[i]
            );
        }
    }
    assert_eq!(opt.steps(), 3);
    // No gradient, no change (PyTorch skips such parameters).
    let state = opt.state().unwrap();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["a.exp_avg", "a.exp_avg_sq", "b.exp_avg", "b.exp_avg_sq"]
    );
    assert_eq!(
        state[2]
            .1
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn state_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let var = Var::from_vec(randn(&mut rng, 16), 16, &Device::Cpu).unwrap();
    let mut a = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
    let g = Tensor::new(randn(&mut rng, 16).as_slice(), &Device::Cpu).unwrap();
    let grads = (var.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    a.step(&grads, 1e-3).unwrap();
    let saved: std::collections::HashMap<_, _> = a.state().unwrap().into_iter().collect();
    let var2 = Var::from_tensor(var.as_tensor()).unwrap();
    let mut b = AdamW::new(vec![("w".into(), var2.clone())], AdamWConfig::default()).unwrap();
    b.load_state(a.steps(), &saved).unwrap();
    let grads2 = (var.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads2b = (var2.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    a.step(&grads2, 1e-3).unwrap();
    b.step(&grads2b, 1e-3).unwrap();
    assert_eq!(
        var.as_tensor().to_vec1::<f32>().unwrap(),
        var2.as_tensor().to_vec1::<f32>().unwrap()
    );
    let err = b
        .load_state(1, &std::collections::HashMap::new())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("optimizer state lacks 'w.exp_avg'"), "{err}");
}

#[test]
fn chunked_cross_entropy_matches_autograd_on_full_logits() {
    use moeq::train::loss::chunked_cross_entropy;
    let dev = Device::Cpu;
    let (n, h, v) = (23, 16, 37);
    let hidden = Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap();
    let head = Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let labels: Vec<i32> = (0..n)
        .map(|i| {
            if i % 4 == 0 {
                -100
            } else {
                rng.random_range(0..v as i32)
            }
        })
        .collect();
    for chunk in [1, 5, 23, 64] {
        let out = chunked_cross_entropy(&hidden, &head, &labels, chunk).unwrap();
        // Reference: full logits, log-softmax, mean NLL over labelled rows, autograd.
        let hv = Var::from_tensor(&hidden).unwrap();
        let logits = hv.as_tensor().matmul(&head.t().unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let rows: Vec<u32> = (0..n as u32)
            .filter(|&i| labels[i as usize] != -100)
            .collect();
        let tg: Vec<u32> = rows.iter().map(|&i| labels[i as usize] as u32).collect();
        let picked = logp
            .index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 0)
            .unwrap()
            .gather(
                &Tensor::new(tg.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
                1,
            )
            .unwrap();
        let loss = (picked.sum_all().unwrap().neg().unwrap() / rows.len() as f64).unwrap();
        let grads = loss.backward().unwrap();
        let want = loss.to_scalar::<f32>().unwrap();
        assert!(
            (out.loss - want).abs() <= 1e-5 * want.abs(),
            "chunk {chunk}: {} vs {want}",
            out.loss
        );
        assert_eq!(out.labelled, rows.len());
        let g_ref = grads.get(hv.as_tensor()).unwrap();
        let diff = (&out.grad_h - g_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // f32 softmax and matmul in a different association: a few ulps of O(1/n) values.
        assert!(diff <= 1e-6, "chunk {chunk}: grad diff {diff}");
        let ignored_row = out
            .grad_h
            .get(0)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(ignored_row, 0.0);
    }
    let err = chunked_cross_entropy(&hidden, &head, &vec![40; n], 8)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("label 40 outside the vocabulary of 37"),
        "{err}"
    );
}

/// The fused cross-entropy rows (one pass per row, used by the chunked loss) against the
/// primitive-op version: random logits with a wide range, ignored rows, f32 and bf16 inputs.
#[test]
fn cross_entropy_rows_match_the_primitive_op_reference() {
    use moeq::ops::cross_entropy::{cross_entropy_rows, cross_entropy_rows_reference};
    let cpu = &candle_core::Device::Cpu;
    let (rows, vocab) = (13, 517);
    let logits = (Tensor::randn(0f32, 1.0, (rows, vocab), cpu).unwrap() * 4.0).unwrap();
    let targets: Vec<u32> = (0..rows as u32)
        .map(|r| (r * 97 + 5) % vocab as u32)
        .collect();
    let weights: Vec<f32> = (0..rows)
        .map(|r| if r % 4 == 3 { 0.0 } else { 1.0 })
        .collect();
    let t = Tensor::new(targets, cpu).unwrap();
    let w = Tensor::new(weights, cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let x = logits.to_dtype(dtype).unwrap();
        let (dx, loss) = cross_entropy_rows(&x, &t, &w, 0.1).unwrap();
        let (dx_ref, loss_ref) = cross_entropy_rows_reference(&x, &t, &w, 0.1).unwrap();
        assert_eq!(dx.dtype(), dtype);
        // Both compute in f32 from the same inputs; sums of 517 exponentials in a different
        // order: a few f32 ulps of the loss (≈ 10) and of the gradients (≤ 0.1); bf16 outputs
        // may then round to neighbouring values (one bf16 step of 0.1 is 4e-4).
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-3 };
        assert!(
            max_abs(
                &(dx.to_dtype(DType::F32).unwrap() - dx_ref.to_dtype(DType::F32).unwrap()).unwrap()
            ) <= tol,
            "{dtype:?} dlogits"
        );
        assert!(
            max_abs(&(&loss - &loss_ref).unwrap()) <= 1e-4,
            "{dtype:?} loss"
        );
        let l: Vec<f32> = loss.to_vec1().unwrap();
        assert!(l
            .iter()
            .enumerate()
            .all(|(r, &v)| (r % 4 == 3) == (v == 0.0)));
    }
    // A target outside the vocabulary is refused on the CPU.
    let bad = Tensor::new(vec![vocab as u32; rows], cpu).unwrap();
    assert!(cross_entropy_rows(&logits, &bad, &w, 1.0).is_err());
}

/// Steps of `opt` on `var` with the gradients `gs` (one per step, a linear loss).
fn run_steps(opt: &mut AdamW, var: &Var, gs: &[Vec<f32>], lr: f64) {
    for g in gs {
        let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
        let grads = (var.as_tensor() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, lr).unwrap();
    }
}

#[test]
fn eight_bit_moments_follow_fp32_and_round_trip_exactly() {
    // 10,000 elements (40 blocks of 256, the last partial): above the 4,096-element floor, so
    // the moments are 8-bit. Gradients of mixed scales per element (¼ … 1), never zeros. (The
    // scheme has bitsandbytes' limit: within one 256-element block, a second moment under
    // ≈ 1.6e-7 of the block's largest rounds to zero, and its element's next update is then
    // m / √((1−β2)·g²) — large. Real gradients in one block do not span 10⁶ in g².)
    let n = 10_000;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let p0 = randn(&mut rng, n);
    let scales: Vec<f32> = (0..n).map(|i| 1.0 / (1 + i % 4) as f32).collect();
    let gs: Vec<Vec<f32>> = (0..8)
        .map(|_| {
            randn(&mut rng, n)
                .iter()
                .zip(&scales)
                .map(|(g, s)| g * s + 0.5 * s)
                .collect()
        })
        .collect();
    let lr = 1e-2;
    let run = |eight_bit: bool, gs: &[Vec<f32>]| {
        let var = Var::from_vec(p0.clone(), n, &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            eight_bit,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        run_steps(&mut opt, &var, gs, lr);
        (var, opt)
    };
    let (v32, o32) = run(false, &gs);
    let (v8, o8) = run(true, &gs);
    // The state: 2 bytes per element + 8 per block against 8 per element.
    assert_eq!(o32.state_bytes(), 8 * n);
    assert_eq!(o8.state_bytes(), 2 * n + 8 * n.div_ceil(256));
    // Updates: Adam's steps are ≈ lr per element; the 8-bit moments' rounding (a few % of a
    // block's largest value, relatively more for the small elements of a block) moves each by
    // a fraction of that. Measured: max 0.005 = 0.5 lr over 8 steps; bound 0.25 lr per step.
    let (a, b): (Vec<f32>, Vec<f32>) = (
        v32.as_tensor().to_vec1().unwrap(),
        v8.as_tensor().to_vec1().unwrap(),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst > 0.0, "8-bit moments changed nothing");
    assert!(
        (worst as f64) < 0.25 * lr * gs.len() as f64,
        "8-bit vs fp32 after {} steps: max |Δp| {worst}",
        gs.len()
    );
    // Saved after 5 steps (the moments as the f32 values their codes stand for) and restored
    // into a fresh optimizer, which quantizes them again: the next 3 steps are those of the
    // uninterrupted run, bit for bit.
    let (v5, o5) = run(true, &gs[..5]);
    let saved: std::collections::HashMap<_, _> = o5.state().unwrap().into_iter().collect();
    assert_eq!(saved["w.exp_avg"].dims(), &[n]);
    assert_eq!(saved["w.exp_avg_sq"].dtype(), candle_core::DType::F32);
    let var = Var::from_tensor(v5.as_tensor()).unwrap();
    let cfg = AdamWConfig {
        eight_bit: true,
        ..AdamWConfig::default()
    };
    let mut resumed = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
    resumed.load_state(o5.steps(), &saved).unwrap();
    let again: std::collections::HashMap<_, _> = resumed.state().unwrap().into_iter().collect();
    for key in ["w.exp_avg", "w.exp_avg_sq"] {
        assert_eq!(
            again[key].to_vec1::<f32>().unwrap(),
            saved[key].to_vec1::<f32>().unwrap(),
            "{key} after a round trip"
        );
    }
    run_steps(&mut resumed, &var, &gs[5..], lr);
    assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), b);
    // Gradients of the other sign: blocks whose largest first moment is negative (the signed
    // map's most negative code is above −1) round-trip as exactly.
    let neg: Vec<Vec<f32>> = gs.iter().map(|g| g.iter().map(|x| -x).collect()).collect();
    let (_, on) = run(true, &neg[..5]);
    let saved_neg: std::collections::HashMap<_, _> = on.state().unwrap().into_iter().collect();
    let var_n = Var::from_vec(p0.clone(), n, &Device::Cpu).unwrap();
    let mut back = AdamW::new(vec![("w".into(), var_n)], cfg).unwrap();
    back.load_state(on.steps(), &saved_neg).unwrap();
    let again: std::collections::HashMap<_, _> = back.state().unwrap().into_iter().collect();
    assert_eq!(
        again["w.exp_avg"].to_vec1::<f32>().unwrap(),
        saved_neg["w.exp_avg"].to_vec1::<f32>().unwrap(),
        "negative first moments after a round trip"
    );
    // The same format either way: fp32 moments load into 8-bit ones (quantized).
    let fp32: std::collections::HashMap<_, _> = o32.state().unwrap().into_iter().collect();
    resumed.load_state(8, &fp32).unwrap();
    let wrong: std::collections::HashMap<_, _> = [(
        "w.exp_avg".to_string(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    let err = resumed.load_state(8, &wrong).err().unwrap().to_string();
    assert!(err.contains("'w.exp_avg' is [3]"), "{err}");
}
