//! The gated delta rule (`moeq::ops::delta_rule`): the chunked (UT-transform) form against the
//! token-by-token recurrence, outputs, final states and the gradients of every input, on
//! seeded random data; the recurrence itself against a hand computation in plain f32; and the
//! op of the CUDA kernels (`delta_rule_op::scan`, its CPU twin here: the kernels' loops) against
//! the recurrence, forward and every gradient, which proves its written-out backward; the same
//! for the chunkwise form (`chunkwise`, what trains: its carry op's CPU twin is the kernels'
//! loops).
//!
//! Tolerances, all relative to the largest magnitude of the reference: 1e-5 forward, 1e-4 for
//! gradients. Both forms compute in f32 but sum in different orders (a chunk's contributions
//! go through a triangular inverse and matmuls instead of T rank-1 updates), so they differ by
//! a few ulps per accumulated term; the backward passes chain ~T such steps, hence the looser
//! gradient bound.

use candle_core::{DType, Device, Tensor, Var};
use moeq::ops::delta_rule::{chunked, chunkwise, recurrent, CHUNK};
use moeq::ops::delta_rule_op::{scan, scan_by, Engine, CKPT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const FWD_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-4;
/// The op's twin against the recurrence: the same rank-1 updates in the same order forward; the
/// backward's equations against autograd's chain of the same steps (≈ 1e-6 measured).
const SCAN_TOL: f32 = 1e-5;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    let (diff, scale) = (
        diff.to_scalar::<f32>().unwrap(),
        scale.to_scalar::<f32>().unwrap(),
    );
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

/// One layer's inputs: q, k, v, g, beta (g and beta as `Qwen3NextGatedDeltaNet` makes them:
/// g = −exp(A_log)·softplus(a + dt_bias) ≤ 0, beta = sigmoid(b)) and an initial state.
struct Inputs {
    q: Var,
    k: Var,
    v: Var,
    g: Var,
    beta: Var,
    s0: Var,
}

fn inputs(seed: u64, b: usize, t: usize, h: usize, dk: usize, dv: usize) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let q = randn(&mut rng, &[b, t, h, dk]);
    let k = randn(&mut rng, &[b, t, h, dk]);
    let v = randn(&mut rng, &[b, t, h, dv]);
    // A in [0.02, 0.5] per head, dt_bias = 1: the decay across a 64-chunk spans several orders
    // of magnitude, yet the initial state still reaches the last outputs of T = 70.
    let a_log: Vec<f32> = (0..h)
        .map(|_| rng.random_range(0.02f32..0.5).ln())
        .collect();
    let a_log = Tensor::from_vec(a_log, h, &Device::Cpu).unwrap();
    let a = randn(&mut rng, &[b, t, h]);
    let softplus = ((a + 1.0).unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .log()
        .unwrap();
    let g = softplus
        .broadcast_mul(&a_log.exp().unwrap())
        .unwrap()
        .neg()
        .unwrap();
    let beta = candle_nn::ops::sigmoid(&randn(&mut rng, &[b, t, h])).unwrap();
    let s0 = randn(&mut rng, &[b, h, dk, dv]);
    let var = |x: Tensor| Var::from_tensor(&x).unwrap();
    Inputs {
        q: var(q),
        k: var(k),
        v: var(v),
        g: var(g),
        beta: var(beta),
        s0: var(s0),
    }
}

type Form<'a> = &'a dyn Fn(&Inputs, Option<&Tensor>) -> (Tensor, Tensor);

fn run_recurrent(x: &Inputs, s0: Option<&Tensor>) -> (Tensor, Tensor) {
    recurrent(
        x.q.as_tensor(),
        x.k.as_tensor(),
        x.v.as_tensor(),
        x.g.as_tensor(),
        x.beta.as_tensor(),
        s0,
    )
    .unwrap()
}

/// `chunked` or `chunkwise` (same arguments) on the inputs, in chunks of `chunk`.
type ChunkForm = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    usize,
) -> candle_core::Result<(Tensor, Tensor)>;

fn run_in_chunks(
    form: ChunkForm,
    x: &Inputs,
    s0: Option<&Tensor>,
    chunk: usize,
) -> (Tensor, Tensor) {
    fn t(v: &Var) -> &Tensor {
        v.as_tensor()
    }
    form(t(&x.q), t(&x.k), t(&x.v), t(&x.g), t(&x.beta), s0, chunk).unwrap()
}

fn run_chunked(x: &Inputs, s0: Option<&Tensor>, chunk: usize) -> (Tensor, Tensor) {
    run_in_chunks(chunked, x, s0, chunk)
}

fn run_chunkwise(x: &Inputs, s0: Option<&Tensor>, chunk: usize) -> (Tensor, Tensor) {
    run_in_chunks(chunkwise, x, s0, chunk)
}

#[test]
fn chunked_matches_recurrent_forward() {
    let (b, h, dk, dv) = (2, 3, 8, 12);
    for (seed, t) in [(1u64, 37usize), (2, 70), (3, 5)] {
        let x = inputs(seed, b, t, h, dk, dv);
        for with_state in [false, true] {
            let s0 = with_state.then(|| x.s0.as_tensor().clone());
            let (o_ref, s_ref) = run_recurrent(&x, s0.as_ref());
            if with_state {
                // The state reaches the outputs; its trace in the final state fades with T
                // (decay and the (I − β k kᵀ) projections), which the gradient test covers.
                let (o_zero, _) = run_recurrent(&x, None);
                let e = rel_err(&o_zero, &o_ref);
                assert!(e > 1e-2, "T={t}: the initial state barely changes o ({e})");
            }
            assert_eq!(o_ref.dims(), [b, t, h, dv]);
            assert_eq!(s_ref.dims(), [b, h, dk, dv]);
            for chunk in [16, CHUNK] {
                let (o, s) = run_chunked(&x, s0.as_ref(), chunk);
                let (eo, es) = (rel_err(&o, &o_ref), rel_err(&s, &s_ref));
                println!(
                    "T={t} chunk={chunk} state={with_state}: o {eo:.2e}, final state {es:.2e}"
                );
                assert!(
                    eo < FWD_TOL,
                    "T={t} chunk={chunk} state={with_state}: o rel err {eo}"
                );
                assert!(
                    es < FWD_TOL,
                    "T={t} chunk={chunk} state={with_state}: state rel err {es}"
                );
            }
        }
    }
}

/// o, the final state and the gradients of q, k, v, g, beta and the initial state of
/// loss = Σ o·up_o + Σ S_T·up_s through `form`: every output and the final state carry gradient.
fn with_grads(
    form: Form,
    x: &Inputs,
    up_o: &Tensor,
    up_s: &Tensor,
) -> (Tensor, Tensor, [Tensor; 6]) {
    let (o, s) = form(x, Some(x.s0.as_tensor()));
    let loss = ((&o * up_o).unwrap().sum_all().unwrap() + (&s * up_s).unwrap().sum_all().unwrap())
        .unwrap();
    let store = loss.backward().unwrap();
    let grads = [&x.q, &x.k, &x.v, &x.g, &x.beta, &x.s0].map(|v| {
        store
            .get(v.as_tensor())
            .expect("input has no gradient")
            .clone()
    });
    (o, s, grads)
}

/// Each gradient of `fast` within `tol` (relative) of `reference`'s.
fn assert_grads(label: &str, reference: &[Tensor; 6], fast: &[Tensor; 6], tol: f32) {
    let names = ["q", "k", "v", "g", "beta", "initial state"];
    for ((name, r), f) in names.iter().zip(reference).zip(fast) {
        let e = rel_err(f, r);
        println!("{label}: d{name} {e:.2e}");
        assert!(e < tol, "{label}: d{name} rel err {e}");
    }
}

#[test]
fn chunked_matches_recurrent_backward() {
    let (b, h, dk, dv) = (2, 3, 8, 12);
    for (seed, t, chunk) in [(11u64, 37usize, 16usize), (12, 70, CHUNK)] {
        let x = inputs(seed, b, t, h, dk, dv);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let up_o = randn(&mut rng, &[b, t, h, dv]);
        let up_s = randn(&mut rng, &[b, h, dk, dv]);
        let (_, _, reference) = with_grads(&run_recurrent, &x, &up_o, &up_s);
        let chunked = |x: &Inputs, s0: Option<&Tensor>| run_chunked(x, s0, chunk);
        let (_, _, fast) = with_grads(&chunked, &x, &up_o, &up_s);
        assert_grads(&format!("T={t} chunk={chunk}"), &reference, &fast, GRAD_TOL);
    }
}

/// Strong decays (A up to 16, as the layer's init draws A_log from log U(0.01, 16)) push the
/// cumulative log-decay of a 64-chunk far below f32's exp range; the masked-before-exp pairwise
/// decays must keep both forms finite and equal.
#[test]
fn strong_decay_stays_finite() {
    let (b, t, h, dk, dv) = (1, 70, 2, 8, 12);
    let x = inputs(21, b, t, h, dk, dv);
    let g = (x.g.as_tensor() * 40.0).unwrap();
    let run = |chunk: Option<usize>| {
        let (q, k, v, beta) = (
            x.q.as_tensor(),
            x.k.as_tensor(),
            x.v.as_tensor(),
            x.beta.as_tensor(),
        );
        let s0 = Some(x.s0.as_tensor());
        match chunk {
            None => recurrent(q, k, v, &g, beta, s0).unwrap(),
            Some(c) => chunked(q, k, v, &g, beta, s0, c).unwrap(),
        }
    };
    let whole = chunkwise(
        x.q.as_tensor(),
        x.k.as_tensor(),
        x.v.as_tensor(),
        &g,
        x.beta.as_tensor(),
        Some(x.s0.as_tensor()),
        CHUNK,
    )
    .unwrap();
    let min_cum = g
        .sum(1)
        .unwrap()
        .min_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        min_cum < -200.0,
        "decay not strong enough to test underflow: {min_cum}"
    );
    let (o_ref, s_ref) = run(None);
    let (o, s) = run(Some(CHUNK));
    let finite = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    };
    assert!(
        finite(&o) && finite(&s),
        "chunked form produced a non-finite value"
    );
    assert!(rel_err(&o, &o_ref) < FWD_TOL && rel_err(&s, &s_ref) < FWD_TOL);
    assert!(
        finite(&whole.0) && finite(&whole.1),
        "chunkwise form produced a non-finite value"
    );
    assert!(rel_err(&whole.0, &o_ref) < FWD_TOL && rel_err(&whole.1, &s_ref) < FWD_TOL);
}

/// The recurrence written out in plain f32 for B = H = 1, T = 2, Dk = 2, Dv = 3.
#[test]
fn recurrent_matches_hand_computation() {
    let (dk, dv) = (2usize, 3usize);
    let q = [[0.3f32, -1.2], [0.8, 0.5]];
    let k = [[1.5f32, 0.4], [-0.7, 0.9]];
    let v = [[0.2f32, -0.6, 1.1], [0.9, 0.3, -0.4]];
    let g = [-0.25f32, -0.8];
    let beta = [0.7f32, 0.35];
    let s0 = [[0.5f32, -0.1, 0.3], [0.2, 0.4, -0.6]];

    let unit = |x: &[f32; 2]| {
        let inv = 1.0 / (x[0] * x[0] + x[1] * x[1] + 1e-6).sqrt();
        [x[0] * inv, x[1] * inv]
    };
    let mut s = s0;
    let mut o = [[0f32; 3]; 2];
    for t in 0..2 {
        let qn = unit(&q[t]).map(|e| e / (dk as f32).sqrt());
        let kn = unit(&k[t]);
        let decay = g[t].exp();
        for row in s.iter_mut() {
            for e in row.iter_mut() {
                *e *= decay;
            }
        }
        for j in 0..dv {
            let kv_mem = s[0][j] * kn[0] + s[1][j] * kn[1];
            let delta = (v[t][j] - kv_mem) * beta[t];
            for i in 0..dk {
                s[i][j] += kn[i] * delta;
            }
        }
        for j in 0..dv {
            o[t][j] = s[0][j] * qn[0] + s[1][j] * qn[1];
        }
    }

    let cpu = &Device::Cpu;
    let flat = |x: &[f32]| x.to_vec();
    let qt = Tensor::from_vec(q.concat(), (1, 2, 1, dk), cpu).unwrap();
    let kt = Tensor::from_vec(k.concat(), (1, 2, 1, dk), cpu).unwrap();
    let vt = Tensor::from_vec(v.concat(), (1, 2, 1, dv), cpu).unwrap();
    let gt = Tensor::from_vec(flat(&g), (1, 2, 1), cpu).unwrap();
    let bt = Tensor::from_vec(flat(&beta), (1, 2, 1), cpu).unwrap();
    let st = Tensor::from_vec(s0.concat(), (1, 1, dk, dv), cpu).unwrap();
    let (o_t, s_t) = recurrent(&qt, &kt, &vt, &gt, &bt, Some(&st)).unwrap();
    let (o_c, s_c) = chunked(&qt, &kt, &vt, &gt, &bt, Some(&st), 4).unwrap();
    let o_t = o_t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let s_t = s_t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (got, want) in o_t.iter().zip(o.concat()).chain(s_t.iter().zip(s.concat())) {
        assert!((got - want).abs() < 1e-6, "recurrent {got} vs hand {want}");
    }
    let e = rel_err(
        &o_c.flatten_all().unwrap(),
        &Tensor::new(o.concat(), cpu).unwrap(),
    );
    assert!(e < FWD_TOL, "chunked o vs hand: {e}");
    let e = rel_err(
        &s_c.flatten_all().unwrap(),
        &Tensor::new(s.concat(), cpu).unwrap(),
    );
    assert!(e < FWD_TOL, "chunked state vs hand: {e}");
}

#[test]
fn mismatched_shapes_are_named() {
    let x = inputs(31, 1, 4, 2, 8, 12);
    let bad_g = Tensor::zeros((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let err = recurrent(
        x.q.as_tensor(),
        x.k.as_tensor(),
        x.v.as_tensor(),
        &bad_g,
        x.beta.as_tensor(),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("g [1, 4, 3]"), "{err}");
}

/// The op's CPU twin (the CUDA kernels' loops, checkpoints every CKPT tokens and chunks
/// recomputed in the backward) against autograd through `recurrent`: o, the final state and the
/// gradients of q, k, v, g, beta and the initial state, with T one chunk, several chunks with
/// a short last one, and Dk ≠ Dv.
#[test]
fn scan_matches_recurrent_forward_and_backward() {
    let (b, h, dk, dv) = (2, 3, 8, 12);
    for (seed, t) in [(41u64, 37usize), (42, 2 * CKPT + 22), (43, CKPT)] {
        let x = inputs(seed, b, t, h, dk, dv);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let up_o = randn(&mut rng, &[b, t, h, dv]);
        let up_s = randn(&mut rng, &[b, h, dk, dv]);
        let (o_ref, s_ref, reference) = with_grads(&run_recurrent, &x, &up_o, &up_s);
        let op = |x: &Inputs, s0: Option<&Tensor>| {
            scan(
                x.q.as_tensor(),
                x.k.as_tensor(),
                x.v.as_tensor(),
                x.g.as_tensor(),
                x.beta.as_tensor(),
                s0,
            )
            .unwrap()
        };
        let (o, s, fast) = with_grads(&op, &x, &up_o, &up_s);
        let (eo, es) = (rel_err(&o, &o_ref), rel_err(&s, &s_ref));
        println!("scan T={t}: o {eo:.2e}, final state {es:.2e}");
        assert!(eo < SCAN_TOL && es < SCAN_TOL, "T={t}: o {eo}, state {es}");
        assert_grads(&format!("scan T={t}"), &reference, &fast, SCAN_TOL);
    }
}

/// Without an initial state and without a graph (the inference path), the op equals the
/// recurrence too.
#[test]
fn scan_without_state_or_graph() {
    let x = inputs(51, 1, 70, 2, 8, 8);
    let t = |v: &Var| v.as_tensor().detach();
    let (q, k, v, g, beta) = (t(&x.q), t(&x.k), t(&x.v), t(&x.g), t(&x.beta));
    let (o_ref, s_ref) = recurrent(&q, &k, &v, &g, &beta, None).unwrap();
    let (o, s) = scan(&q, &k, &v, &g, &beta, None).unwrap();
    assert!(rel_err(&o, &o_ref) < SCAN_TOL && rel_err(&s, &s_ref) < SCAN_TOL);
}

/// The chunkwise form (every chunk's terms batched, the inverse by doubling, the states carried
/// by `delta_carry_op` — here its CPU twin, the kernels' loops — with its written-out backward)
/// against autograd through `recurrent`: o, the final state and every gradient, with T one
/// chunk, a short T as its own chunk, several chunks with a short last one, and Dk ≠ Dv.
#[test]
fn chunkwise_matches_recurrent_forward_and_backward() {
    let (b, h, dk, dv) = (2, 3, 8, 12);
    for (seed, t, chunk) in [
        (61u64, 37usize, 16usize),
        (62, 70, CHUNK),
        (63, 5, 5),
        (64, CHUNK, CHUNK),
    ] {
        let x = inputs(seed, b, t, h, dk, dv);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let up_o = randn(&mut rng, &[b, t, h, dv]);
        let up_s = randn(&mut rng, &[b, h, dk, dv]);
        let (o_ref, s_ref, reference) = with_grads(&run_recurrent, &x, &up_o, &up_s);
        let form = |x: &Inputs, s0: Option<&Tensor>| run_chunkwise(x, s0, chunk);
        let (o, s, fast) = with_grads(&form, &x, &up_o, &up_s);
        let (eo, es) = (rel_err(&o, &o_ref), rel_err(&s, &s_ref));
        println!("chunkwise T={t} chunk={chunk}: o {eo:.2e}, final state {es:.2e}");
        assert!(eo < FWD_TOL && es < FWD_TOL, "T={t}: o {eo}, state {es}");
        assert_grads(
            &format!("chunkwise T={t} chunk={chunk}"),
            &reference,
            &fast,
            GRAD_TOL,
        );
        // Without a graph (inference) and without an initial state, the same outputs.
        let plain = |v: &Var| v.as_tensor().detach();
        let (q, k, v, g, beta) = (
            plain(&x.q),
            plain(&x.k),
            plain(&x.v),
            plain(&x.g),
            plain(&x.beta),
        );
        let (o_ref, s_ref) = recurrent(&q, &k, &v, &g, &beta, None).unwrap();
        let (o, s) = chunkwise(&q, &k, &v, &g, &beta, None, chunk).unwrap();
        assert!(rel_err(&o, &o_ref) < FWD_TOL && rel_err(&s, &s_ref) < FWD_TOL);
    }
}

/// The chunked op (`delta_rule_op::scan_by` with `Engine::Chunks`: its CPU twin here, each
/// kernel block's loops, and the carry op's twin) against autograd through `recurrent`: o, the
/// final state and every gradient — which proves the op's written-out backward — with T one
/// chunk, a short T as its own chunk, several chunks with a short last one, and Dk ≠ Dv; then
/// without a graph and without an initial state.
#[test]
fn chunk_op_matches_recurrent_forward_and_backward() {
    let (b, h, dk, dv) = (2, 3, 8, 12);
    for (seed, t, chunk) in [
        (71u64, 37usize, 16usize),
        (72, 70, CHUNK),
        (73, 5, 5),
        (74, 48, 16),
    ] {
        let x = inputs(seed, b, t, h, dk, dv);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let up_o = randn(&mut rng, &[b, t, h, dv]);
        let up_s = randn(&mut rng, &[b, h, dk, dv]);
        let (o_ref, s_ref, reference) = with_grads(&run_recurrent, &x, &up_o, &up_s);
        let engine = Engine::Chunks(chunk);
        let op = |x: &Inputs, s0: Option<&Tensor>| {
            let [q, k, v, g, beta] = [&x.q, &x.k, &x.v, &x.g, &x.beta].map(|v| v.as_tensor());
            scan_by(engine, q, k, v, g, beta, s0).unwrap()
        };
        let (o, s, fast) = with_grads(&op, &x, &up_o, &up_s);
        let (eo, es) = (rel_err(&o, &o_ref), rel_err(&s, &s_ref));
        println!("chunk op T={t} chunk={chunk}: o {eo:.2e}, final state {es:.2e}");
        assert!(eo < FWD_TOL && es < FWD_TOL, "T={t}: o {eo}, state {es}");
        assert_grads(
            &format!("chunk op T={t} chunk={chunk}"),
            &reference,
            &fast,
            GRAD_TOL,
        );
        let plain = |v: &Var| v.as_tensor().detach();
        let [q, k, v, g, beta] = [&x.q, &x.k, &x.v, &x.g, &x.beta].map(plain);
        let (o_ref, s_ref) = recurrent(&q, &k, &v, &g, &beta, None).unwrap();
        let (o, s) = scan_by(engine, &q, &k, &v, &g, &beta, None).unwrap();
        assert!(rel_err(&o, &o_ref) < FWD_TOL && rel_err(&s, &s_ref) < FWD_TOL);
    }
}
