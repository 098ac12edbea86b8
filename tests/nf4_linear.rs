//! The 4-bit linear op against dequantize-then-matmul on random data, forward and backward,
//! and the frozen weight gets no gradient.

use candle_core::{DType, Device, Tensor, Var};
use moeq::ops::nf4_linear::{nf4_linear, Nf4Weight};
use moeq::quant::{QuantSettings, QuantizedParam};

#[test]
fn forward_and_backward_match_the_dequantized_reference() {
    let dev = Device::Cpu;
    let (out_f, in_f) = (48, 128);
    let w: Vec<f32> = Tensor::randn(0f32, 0.05, out_f * in_f, &dev)
        .unwrap()
        .to_vec1()
        .unwrap();
    let q = QuantizedParam::quantize(&w, &[out_f, in_f], QuantSettings::default()).unwrap();
    let weight = Nf4Weight::from_param(&q, &dev).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, in_f), &dev).unwrap()).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (2, 5, out_f), &dev).unwrap();

    let y = nf4_linear(x.as_tensor(), &weight.clone().into()).unwrap();
    let grads = (&y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let deq = Tensor::from_vec(q.dequantize(), (out_f, in_f), &dev).unwrap();
    let x_ref = Var::from_tensor(x.as_tensor()).unwrap();
    let y_ref = x_ref
        .as_tensor()
        .broadcast_matmul(&deq.t().unwrap())
        .unwrap();
    let grads_ref = (&y_ref * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    // Same f32 operations on the same values: equal up to matmul summation order.
    let close = |a: &Tensor, b: &Tensor| {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-5 * m.max(1.0), "max diff {d} (scale {m})");
    };
    assert_eq!(y.dims(), &[2, 5, out_f]);
    close(&y, &y_ref);
    let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
    close(gx, grads_ref.get(x_ref.as_tensor()).unwrap());
    assert!(
        gx.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    assert!(grads.get(&weight.packed).is_none());
    assert!(weight
        .absmax
        .tensors()
        .iter()
        .all(|t| grads.get(t).is_none()));
    assert_eq!(
        weight.dequantize(DType::F32).unwrap().dims(),
        &[out_f, in_f]
    );
}

#[test]
fn feature_mismatch_is_an_error() {
    let dev = Device::Cpu;
    let w = vec![0.5f32; 64 * 64];
    let q = QuantizedParam::quantize(&w, &[64, 64], QuantSettings::default()).unwrap();
    let weight = Nf4Weight::from_param(&q, &dev).unwrap().into();
    let x = Tensor::zeros((3, 32), DType::F32, &dev).unwrap();
    let err = nf4_linear(&x, &weight).unwrap_err().to_string();
    assert!(
        err.contains("nf4_linear: input has 32 features, weight expects 64"),
        "{err}"
    );
}

/// Nested statistics kept on the device (`Scales::Nested`) expand to exactly the host's f32
/// scales for any range of blocks, including ranges that start or end inside a 256-block
/// nested group (a rank's or a chunk's experts). Exact: same formula, same roundings.
#[test]
fn nested_scales_expand_to_the_host_values_for_any_block_range() {
    use moeq::ops::nf4_linear::Scales;
    use moeq::quant::nested::{dequantize_absmax, quantize_absmax};
    use moeq::quant::Absmax;
    let dev = Device::Cpu;
    let n = 7 * 256 + 77;
    // Positive block maxima spread over two orders of magnitude, as real weights give.
    let absmax: Vec<f32> = Tensor::randn(0f32, 1.0, n, &dev)
        .and_then(|t| t.exp())
        .and_then(|t| t.to_vec1())
        .unwrap();
    let nested = quantize_absmax(&absmax);
    let want = dequantize_absmax(&nested);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let stats = Absmax::Nested(nested);
    let whole = Scales::kept(&stats, 0..n, &dev).unwrap();
    assert_eq!(whole.len(), n);
    for (from, len) in [
        (0, n),
        (5, 300),
        (256, 512),
        (1000, n - 1000),
        (n - 1, 1),
        (255, 2),
    ] {
        let got: Vec<f32> = whole
            .narrow(from, len)
            .unwrap()
            .values()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            bits(&got),
            bits(&want[from..from + len]),
            "narrow {from}+{len}"
        );
        let part = Scales::kept(&stats, from..from + len, &dev).unwrap();
        let got: Vec<f32> = part.values().unwrap().to_vec1().unwrap();
        assert_eq!(
            bits(&got),
            bits(&want[from..from + len]),
            "built from {from}+{len}"
        );
    }
    // On the CPU the model's scales are expanded once, to the same values.
    let expanded = Scales::from_absmax(&stats, 5..305, &dev).unwrap();
    assert!(matches!(expanded, Scales::Plain(_)));
    let got: Vec<f32> = expanded.values().unwrap().to_vec1().unwrap();
    assert_eq!(bits(&got), bits(&want[5..305]));
    // Values differ from block to block (the check above compares real data).
    assert!(want.windows(2).any(|w| w[0] != w[1]));
}
