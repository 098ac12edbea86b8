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

    let y = nf4_linear(x.as_tensor(), &weight).unwrap();
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
    assert!(grads.get(&weight.packed).is_none() && grads.get(&weight.absmax).is_none());
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
    let weight = Nf4Weight::from_param(&q, &dev).unwrap();
    let x = Tensor::zeros((3, 32), DType::F32, &dev).unwrap();
    let err = nf4_linear(&x, &weight).unwrap_err().to_string();
    assert!(
        err.contains("nf4_linear: input has 32 features, weight expects 64"),
        "{err}"
    );
}
