//! Fused attention-path ops against their primitive-op versions with candle's autograd: the
//! masked softmax of attention scores (additive −∞ mask, f32 softmax) on random scores with
//! packed sequences and padding, and RMSNorm with a frozen weight.

mod common;
use common::max_abs;

use candle_core::{DType, Device, Tensor, Var};

/// The gradients of `sum(y · upstream)`.
fn backward_of(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
    (y * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}
use moeq::ops::attention::WindowSinks;
use moeq::ops::attn_softmax::{masked_softmax, masked_softmax_reference};

#[test]
fn masked_softmax_matches_the_additive_mask_reference() {
    let cpu = &Device::Cpu;
    let (b, h, s) = (2, 3, 19);
    // Batch 0: samples of 5, 9 and 3 tokens and 2 padding positions; batch 1: one sample.
    let seg0: Vec<u32> = [0u32; 5]
        .iter()
        .chain(&[1; 9])
        .chain(&[2; 3])
        .chain(&[3; 2])
        .copied()
        .collect();
    let segments = vec![seg0, vec![0u32; s]];
    let flat: Vec<u32> = segments.concat();
    let seg_t = Tensor::from_vec(flat, (b, s), cpu).unwrap();
    let scores = (Tensor::randn(0f32, 1.0, (b, h, s, s), cpu).unwrap() * 4.0).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (b, h, s, s), cpu).unwrap();
    let scale = 0.3;
    let plain = WindowSinks::default();

    let run = |ours: bool| {
        let v = Var::from_tensor(&scores).unwrap();
        let p = if ours {
            masked_softmax(v.as_tensor(), &seg_t, scale, &plain).unwrap()
        } else {
            masked_softmax_reference(v.as_tensor(), &segments, scale, &plain).unwrap()
        };
        let g = backward_of(&p, &upstream);
        (p, g.get(v.as_tensor()).unwrap().clone())
    };
    let (p, g) = run(true);
    let (p_ref, g_ref) = run(false);
    // Probabilities ≤ 1 and their gradients O(1): f32 rounding of sums of ≤ 19 terms.
    assert!(max_abs(&(&p - &p_ref).unwrap()) < 1e-6, "forward");
    assert!(max_abs(&(&g - &g_ref).unwrap()) < 1e-5, "backward");
    // Rows sum to one, and nothing leaks across samples or from the future.
    let rows: Vec<f32> = p.sum(3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-5));
    let p4: Vec<Vec<Vec<Vec<f32>>>> = (0..b)
        .map(|bi| {
            (0..h)
                .map(|hi| p.get(bi).unwrap().get(hi).unwrap().to_vec2().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        p4[0][1][6][4], 0.0,
        "token 6 (sample 1) sees token 4 (sample 0)"
    );
    assert_eq!(p4[1][2][3][4], 0.0, "token 3 sees the future");
    assert!(p4[1][2][3][0] > 0.0);
    assert_eq!(p.dtype(), DType::F32);
}

#[test]
fn rms_norm_matches_the_primitive_op_reference() {
    use moeq::ops::norm::{rms_norm, rms_norm_reference};
    let cpu = &Device::Cpu;
    let x = (Tensor::randn(0f32, 1.0, (2, 7, 96), cpu).unwrap() * 3.0).unwrap();
    let w = (Tensor::randn(0f32, 0.2, 96, cpu).unwrap() + 1.0).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (2, 7, 96), cpu).unwrap();
    let run = |ours: bool| {
        let v = Var::from_tensor(&x).unwrap();
        let y = if ours {
            rms_norm(v.as_tensor(), &w, 1e-6).unwrap()
        } else {
            rms_norm_reference(v.as_tensor(), &w, 1e-6).unwrap()
        };
        let g = backward_of(&y, &upstream);
        (y, g.get(v.as_tensor()).unwrap().clone())
    };
    let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
    // f32 throughout; the backward is the closed form vs autograd's chain: a few ulps of scale.
    assert!(max_abs(&(&y - &y_ref).unwrap()) <= 1e-6 * max_abs(&y_ref));
    assert!(max_abs(&(&g - &g_ref).unwrap()) <= 1e-5 * max_abs(&g_ref));
}

/// Two rows of 37 positions: row 0 packs samples of 11, 20 and 4 tokens and 2 padding
/// positions, row 1 is one sample; as rows of u32 and as the `[2, 37]` tensor.
fn packed_segments(b: usize, s: usize) -> (Vec<Vec<u32>>, Tensor) {
    assert_eq!((b, s), (2, 37));
    let seg0: Vec<u32> = (0..s as u32)
        .map(|p| match p {
            0..11 => 0,
            11..31 => 1,
            31..35 => 2,
            _ => 3,
        })
        .collect();
    let segments = vec![seg0, vec![0u32; s]];
    let seg_t = Tensor::from_vec(segments.concat(), (b, s), &Device::Cpu).unwrap();
    (segments, seg_t)
}

#[test]
fn blocked_attention_matches_the_whole_matrix_reference() {
    use moeq::ops::attention::{attention, attention_reference};
    let cpu = &Device::Cpu;
    // 6 query heads over 2 kv heads (groups of 3), 37 positions; batch 0 packs samples of 11,
    // 20 and 4 tokens and 2 padding positions, batch 1 is one sample.
    let (b, s, nh, kvh, hd) = (2, 37, 6, 2, 8);
    let (segments, seg_t) = packed_segments(b, s);
    let q = (Tensor::randn(0f32, 1.0, (b, s, nh, hd), cpu).unwrap() * 2.0).unwrap();
    let k = (Tensor::randn(0f32, 1.0, (b, s, kvh, hd), cpu).unwrap() * 2.0).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    // Value heads of the q/k size, and of other sizes (latent attention: values of their own).
    for vd in [hd, 12, 5] {
        let v = Tensor::randn(0f32, 1.0, (b, s, kvh, vd), cpu).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (b, s, nh, vd), cpu).unwrap();
        // None: the reference; Some(c): blocks of c query positions (all, uneven, one).
        let run = |block: Option<usize>| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [vq, vk, vv] = vars.each_ref().map(|x| x.as_tensor());
            let y = match block {
                Some(c) => attention(vq, vk, vv, &seg_t, scale, c).unwrap(),
                None => attention_reference(vq, vk, vv, &segments, scale).unwrap(),
            };
            let g = backward_of(&y, &upstream);
            let grads = vars.map(|x| g.get(x.as_tensor()).unwrap().clone());
            (y, grads)
        };
        let (y_ref, g_ref) = run(None);
        for c in [37, 8, 5, 1] {
            let (y, g) = run(Some(c));
            assert_eq!(y.dims(), &[b, s, nh, vd]);
            // f32 throughout; sums of ≤ 37 products reordered by the blocking: a few ulps of
            // scale.
            assert!(
                max_abs(&(&y - &y_ref).unwrap()) <= 1e-5 * max_abs(&y_ref),
                "values of {vd}, block {c}: output"
            );
            for (name, (g, r)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g_ref)) {
                assert!(max_abs(r) > 0.1, "d{name} is not trivially small");
                let err = max_abs(&(g - r).unwrap());
                assert!(
                    err <= 1e-5 * max_abs(r),
                    "values of {vd}, block {c}: d{name} off by {err}"
                );
            }
        }
        // Nothing crosses a sample boundary: output rows of sample 1 ignore sample 0's values.
        let v2 = v
            .slice_assign(
                &[0..1, 0..11, 0..kvh, 0..vd],
                &Tensor::zeros((1, 11, kvh, vd), DType::F32, cpu).unwrap(),
            )
            .unwrap();
        let y2 = attention(&q, &k, &v2, &seg_t, scale, 5).unwrap();
        let (y1, _) = run(Some(5));
        let tail = |t: &Tensor| t.narrow(0, 0, 1).unwrap().narrow(1, 11, 26).unwrap();
        assert_eq!(max_abs(&(tail(&y1) - tail(&y2)).unwrap()), 0.0);
        let head = |t: &Tensor| t.narrow(1, 0, 11).unwrap();
        assert!(max_abs(&(head(&y1) - head(&y2)).unwrap()) > 0.0);
    }
}

/// gpt-oss's attention — a sliding window shorter than the samples and per-head sinks of both
/// signs — on the blocked op (blocks past the window skip the keys left of it) against the
/// whole-matrix reference (the window in the additive mask, the sinks as one more score column
/// dropped after the softmax), forward and gradients through candle's autograd. 6 query heads
/// on 2 kv heads, 37 positions; row 0 packs samples of 11, 20 and 4 tokens and 2 padding
/// positions. Scores `scale·q·k` are about unit size, so sinks of 0.5 to 3 move a row's mass.
#[test]
fn blocked_attention_with_a_window_and_sinks_matches_the_reference() {
    use moeq::ops::attention::{attention_reference_with, attention_with};
    let cpu = &Device::Cpu;
    let (b, s, nh, kvh, hd) = (2, 37, 6, 2, 8);
    let (segments, seg_t) = packed_segments(b, s);
    let rand = |h: usize| Tensor::randn(0f32, 1.0, (b, s, h, hd), cpu).unwrap();
    let (q, k, v, upstream) = (rand(nh), rand(kvh), rand(kvh), rand(nh));
    let scale = 1.0 / (hd as f64).sqrt();
    let sinks = Tensor::new(&[2.0f32, -1.5, 0.5, 3.0, -3.0, 1.0], cpu).unwrap();
    let plain =
        attention_reference_with(&q, &k, &v, &segments, scale, &WindowSinks::default()).unwrap();
    // Windows of 5 (shorter than samples of 11 and 20, longer than one of 4), of 1 (a query
    // sees itself: with sinks its weight is below one), and none (sinks only).
    for (window, with_sinks) in [
        (Some(5), true),
        (Some(5), false),
        (Some(1), true),
        (None, true),
    ] {
        let extras = WindowSinks {
            window,
            sinks: with_sinks.then(|| sinks.clone()),
        };
        // None: the reference; Some(c): blocks of c query positions.
        let run = |block: Option<usize>| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [vq, vk, vv] = vars.each_ref().map(|x| x.as_tensor());
            let y = match block {
                Some(c) => attention_with(vq, vk, vv, &seg_t, scale, c, &extras).unwrap(),
                None => attention_reference_with(vq, vk, vv, &segments, scale, &extras).unwrap(),
            };
            let g = backward_of(&y, &upstream);
            (y, vars.map(|x| g.get(x.as_tensor()).unwrap().clone()))
        };
        let (y_ref, g_ref) = run(None);
        let case = format!("window {window:?}, sinks {with_sinks}");
        assert!(
            max_abs(&(&y_ref - &plain).unwrap()) > 0.1,
            "{case}: the window or sinks change nothing"
        );
        for c in [37, 8, 5, 1] {
            let (y, g) = run(Some(c));
            // f32 throughout; sums of ≤ 37 products reordered by the blocking: a few ulps of
            // scale.
            let err = max_abs(&(&y - &y_ref).unwrap());
            assert!(
                err <= 1e-5 * max_abs(&y_ref),
                "{case}, block {c}: output off by {err}"
            );
            for (name, (g, r)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g_ref)) {
                assert!(max_abs(r) > 0.01, "{case}: d{name} is not exercised");
                let err = max_abs(&(g - r).unwrap());
                assert!(
                    err <= 1e-5 * max_abs(r),
                    "{case}, block {c}: d{name} off by {err}"
                );
            }
        }
    }
    // Outside the window nothing is seen: with a window of 5, changing row 1's value at
    // position 3 changes the outputs at 3..=7 and no other.
    let extras = WindowSinks {
        window: Some(5),
        sinks: Some(sinks.clone()),
    };
    let v2 = v
        .slice_assign(
            &[1..2, 3..4, 0..kvh, 0..hd],
            &(v.narrow(0, 1, 1).unwrap().narrow(1, 3, 1).unwrap() + 1.0).unwrap(),
        )
        .unwrap();
    let (y1, y2) = (
        attention_with(&q, &k, &v, &seg_t, scale, 8, &extras).unwrap(),
        attention_with(&q, &k, &v2, &seg_t, scale, 8, &extras).unwrap(),
    );
    let diff = (y1 - y2).unwrap().narrow(0, 1, 1).unwrap();
    assert!(max_abs(&diff.narrow(1, 3, 5).unwrap()) > 0.0);
    assert_eq!(max_abs(&diff.narrow(1, 0, 3).unwrap()), 0.0);
    assert_eq!(max_abs(&diff.narrow(1, 8, s - 8).unwrap()), 0.0);
}

/// The masked softmax op with a window and sinks against the additive-mask reference (window
/// in the mask, sink column concatenated, softmax, dropped), forward and backward; a row's
/// probabilities then sum to less than one by the sink's share.
#[test]
fn masked_softmax_with_a_window_and_sinks_matches_the_reference() {
    let cpu = &Device::Cpu;
    let (b, h, s) = (2, 3, 19);
    let seg0: Vec<u32> = (0..s as u32).map(|p| u32::from(p >= 12)).collect();
    let segments = vec![seg0, vec![0u32; s]];
    let seg_t = Tensor::from_vec(segments.concat(), (b, s), cpu).unwrap();
    let scores = Tensor::randn(0f32, 1.0, (b, h, s, s), cpu).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (b, h, s, s), cpu).unwrap();
    let extras = WindowSinks {
        window: Some(6),
        sinks: Some(Tensor::new(&[1.0f32, -2.0, 2.5], cpu).unwrap()),
    };
    let run = |ours: bool| {
        let v = Var::from_tensor(&scores).unwrap();
        let p = if ours {
            masked_softmax(v.as_tensor(), &seg_t, 0.7, &extras).unwrap()
        } else {
            masked_softmax_reference(v.as_tensor(), &segments, 0.7, &extras).unwrap()
        };
        let g = backward_of(&p, &upstream);
        (p, g.get(v.as_tensor()).unwrap().clone())
    };
    let ((p, g), (p_ref, g_ref)) = (run(true), run(false));
    // Probabilities ≤ 1 and their gradients O(1): f32 rounding of sums of ≤ 7 terms.
    assert!(max_abs(&(&p - &p_ref).unwrap()) < 1e-6, "forward");
    assert!(max_abs(&(&g - &g_ref).unwrap()) < 1e-5, "backward");
    let rows: Vec<f32> = p.sum(3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        rows.iter().all(|&r| r < 1.0 - 1e-3 && r > 0.0),
        "the sinks take a share"
    );
    let row: Vec<f32> = p
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .get(10)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(row[..5].iter().all(|&x| x == 0.0) && row[5..=10].iter().all(|&x| x > 0.0));
}

/// The fused rotary embedding against transformers' primitive-op arithmetic, forward and
/// backward (x's gradient through candle's autograd on the reference), with real frequency
/// tables at scattered positions. f32: both sides compute in f32, differing only in rounding
/// order (≤ 1e-6 relative to the values' scale, about 1); bf16: the reference rounds after
/// each of its three ops (half an ulp each) and the fused op once, so they differ by up to
/// 2 ulps of the largest value v: ≤ v/64, as a bf16 ulp is at most v·2⁻⁷ (a fixed 2e-2
/// failed once at exactly 2 ulps of a value near 3, 0.03125).
#[test]
fn fused_rope_matches_the_primitive_op_reference() {
    use moeq::ops::rope::{apply_rope, apply_rope_reference, Rope};
    let cpu = &Device::Cpu;
    let spec = moeq::arch::RopeSpec {
        theta: 1e6,
        rope_type: "default".into(),
        factor: None,
        original_max_position_embeddings: None,
        extra: Default::default(),
    };
    let (n, heads, hd) = (37, 3, 16);
    let rope = Rope::new(&spec, hd, 512, 512, cpu).unwrap();
    let positions: Vec<u32> = (0..n as u32).map(|i| (i * 53) % 500).collect();
    let pos = Tensor::new(positions.as_slice(), cpu).unwrap();
    let x0 = Tensor::randn(0f32, 1.0, (n, heads, hd), cpu).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (n, heads, hd), cpu).unwrap();
    for (dtype, ulps) in [(DType::F32, None), (DType::BF16, Some(2.0f32))] {
        let (cos, sin) = rope.tables(&pos, dtype).unwrap();
        let run = |fused: bool| {
            let x = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
            let y = if fused {
                apply_rope(x.as_tensor(), &cos, &sin)
            } else {
                apply_rope_reference(x.as_tensor(), &cos, &sin)
            }
            .unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * &upstream)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let gx = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
            (y.to_dtype(DType::F32).unwrap(), gx)
        };
        let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
        let dy = max_abs(&(&y - &y_ref).unwrap());
        let dg = max_abs(&(&gx - &gx_ref).unwrap());
        let tol = |v: f32| ulps.map_or(1e-6, |u| u * v / 128.0);
        let (ty, tg) = (tol(max_abs(&y_ref)), tol(max_abs(&gx_ref)));
        assert!(
            dy <= ty && dg <= tg,
            "{dtype:?}: values {dy} (tolerance {ty}), gradient {dg} (tolerance {tg})"
        );
        // The rotation moved the values (positions other than 0 rotate).
        assert!(max_abs(&(&y - &x0.to_dtype(DType::F32).unwrap()).unwrap()) > 0.1);
    }
}

#[test]
fn attention_block_equals_the_separate_ops_bit_for_bit() {
    use moeq::ops::attention::attention_with;
    use moeq::ops::attention_block::{attention_block, BlockArgs};
    use moeq::ops::norm::rms_norm;
    use moeq::ops::rope::apply_rope;
    let cpu = &Device::Cpu;
    // 2 × 21 positions (batch 0 packed as samples of 8 and 13), 6 query heads on 2 kv heads of
    // 8, blocks of 5 query positions; random q, k, v, norm weights, rotary tables, upstream;
    // plain causal attention, and gpt-oss's (a window of 4, sinks of both signs).
    let (b, s, nh, kvh, hd) = (2usize, 21usize, 6usize, 2usize, 8usize);
    let n = b * s;
    let seg: Vec<u32> = (0..n as u32)
        .map(|p| u32::from(p < s as u32 && p >= 8))
        .collect();
    let segments = Tensor::from_vec(seg, (b, s), cpu).unwrap();
    let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, cpu).unwrap();
    let (q, k, v) = (
        rand(&[n, nh * hd]),
        rand(&[n, kvh * hd]),
        rand(&[n, kvh * hd]),
    );
    let (wq, wk) = (
        (rand(&[hd]) * 0.2).unwrap().affine(1.0, 1.0).unwrap(),
        (rand(&[hd]) * 0.2).unwrap().affine(1.0, 1.0).unwrap(),
    );
    let angle = rand(&[n, 1, hd]);
    let (cos, sin) = (angle.cos().unwrap(), angle.sin().unwrap());
    let upstream = rand(&[n, nh * hd]);
    let (scale, block, eps) = (0.35, 5, 1e-6);
    let gpt_oss = WindowSinks {
        window: Some(4),
        sinks: Some(Tensor::new(&[1.5f32, -2.0, 0.5, 3.0, -1.0, 2.5], cpu).unwrap()),
    };
    for (dtype, extras) in [DType::F32, DType::BF16]
        .into_iter()
        .flat_map(|d| [(d, WindowSinks::default()), (d, gpt_oss.clone())])
    {
        for with_norms in [false, true] {
            let run = |fused: bool| {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                    .collect();
                let (qv, kv, vv) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let (c, sn) = (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap());
                let out = if fused {
                    // A pass without a graph leaves the attention output in the memo; the pass
                    // with a graph takes it (the training step's forward, then recompute).
                    let memo = std::cell::RefCell::new(None);
                    let args = BlockArgs {
                        batch: b,
                        seq: s,
                        heads: nh,
                        kv_heads: kvh,
                        head_dim: hd,
                        v_head_dim: hd,
                        norms: with_norms.then_some((&wq, &wk, eps)),
                        rotary: Some((&c, &sn)),
                        segments: &segments,
                        samples: &Default::default(),
                        window: extras.window,
                        sinks: extras.sinks.as_ref(),
                        scale,
                        block,
                        memo: Some(&memo),
                    };
                    let (qd, kd, vd) = (qv.detach(), kv.detach(), vv.detach());
                    let first = attention_block(&qd, &kd, &vd, &args).unwrap();
                    assert!(memo.borrow().is_some(), "the first pass keeps its output");
                    let out = attention_block(qv, kv, vv, &args).unwrap();
                    assert!(memo.borrow().is_none(), "the recompute takes it");
                    assert_eq!(
                        first
                            .flatten_all()
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                        out.flatten_all()
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    );
                    out
                } else {
                    let mut qh = qv.reshape((n, nh, hd)).unwrap();
                    let mut kh = kv.reshape((n, kvh, hd)).unwrap();
                    if with_norms {
                        qh = rms_norm(&qh, &wq, eps).unwrap();
                        kh = rms_norm(&kh, &wk, eps).unwrap();
                    }
                    let qr = apply_rope(&qh, &c, &sn).unwrap();
                    let kr = apply_rope(&kh, &c, &sn).unwrap();
                    attention_with(
                        &qr.reshape((b, s, nh, hd)).unwrap(),
                        &kr.reshape((b, s, kvh, hd)).unwrap(),
                        &vv.reshape((b, s, kvh, hd)).unwrap(),
                        &segments,
                        scale,
                        block,
                        &extras,
                    )
                    .unwrap()
                    .reshape((n, nh * hd))
                    .unwrap()
                };
                let g = (out.to_dtype(DType::F32).unwrap() * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut all = vec![out];
                all.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
                all
            };
            let (fused, separate) = (run(true), run(false));
            for (what, (a, r)) in ["out", "dq", "dk", "dv"]
                .iter()
                .zip(fused.iter().zip(&separate))
            {
                let rows = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let window = extras.window;
                assert_eq!(
                    rows(a),
                    rows(r),
                    "{dtype:?} norms {with_norms} window {window:?}: {what}"
                );
                assert!(max_abs(r) > 0.01, "{what} is not exercised");
            }
        }
    }
}

/// Latent attention's block (q and k rotated by the layer, values of their own size) takes both
/// sides at their sizes, or — where cuDNN's packed layout would serve the rows — zero-pads the
/// smaller side to the larger: both give the same output and gradients. The padded path is
/// asked for on the CPU by describing the rows as cuDNN's ragged layout (the CPU ignores it).
#[test]
fn attention_block_with_values_of_another_size_pads_or_not_alike() {
    use moeq::ops::attention::{Ragged, RowSamples};
    use moeq::ops::attention_block::{attention_block, BlockArgs};
    let cpu = &Device::Cpu;
    let (b, s, nh) = (2, 23, 3);
    let seg: Vec<u32> = (0..(b * s) as u32)
        .map(|p| u32::from(p % 23 >= 9))
        .collect();
    let segments = Tensor::from_slice(&seg, (b, s), cpu).unwrap();
    let packed = RowSamples {
        whole: false,
        ragged: Some(Ragged::of(&seg, (b, s), (nh, nh, 12), cpu).unwrap()),
    };
    // q/k larger than the values (DeepSeek: 192 and 128) and smaller.
    for (hd, vd) in [(12usize, 8usize), (6, 10)] {
        let n = b * s;
        let rand = |w: usize| Tensor::randn(0f32, 1.0, (n, nh * w), cpu).unwrap();
        let (q, k, v, upstream) = (rand(hd), rand(hd), rand(vd), rand(vd));
        let run = |samples: &RowSamples| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [vq, vk, vv] = vars.each_ref().map(|x| x.as_tensor());
            let args = BlockArgs {
                batch: b,
                seq: s,
                heads: nh,
                kv_heads: nh,
                head_dim: hd,
                v_head_dim: vd,
                norms: None,
                rotary: None,
                segments: &segments,
                samples,
                window: None,
                sinks: None,
                scale: 0.3,
                block: 7,
                memo: None,
            };
            let y = attention_block(vq, vk, vv, &args).unwrap();
            let g = backward_of(&y, &upstream);
            let mut all = vec![y];
            all.extend(vars.map(|x| g.get(x.as_tensor()).unwrap().clone()));
            all
        };
        let (native, padded) = (run(&RowSamples::default()), run(&packed));
        // f32; the padded sums add exact zeros, in GEMMs whose inner sizes differ: a few ulps.
        for (what, (a, r)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(native.iter().zip(&padded))
        {
            assert_eq!(a.dims(), r.dims(), "{hd}/{vd}: {what}");
            assert!(max_abs(r) > 0.01, "{hd}/{vd}: {what} is not exercised");
            let err = max_abs(&(a - r).unwrap());
            assert!(err <= 1e-5 * max_abs(r), "{hd}/{vd}: {what} off by {err}");
        }
    }
}
