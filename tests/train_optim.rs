//! AdamW against a scalar transcription of `torch.optim.AdamW`'s update, on random data.

use candle_core::{Device, Tensor, Var};
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
    let state = opt.state();
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
    let saved: std::collections::HashMap<_, _> = a.state().into_iter().collect();
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
