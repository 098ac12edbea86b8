//! Sharded = whole: quantizing a 3-D expert parameter split over 1, 2, 3, 4 and 8 simulated
//! ranks (contiguous, uneven expert ranges), then computing the parameter-wide statistics
//! from the gathered absmax, gives exactly the bytes of quantizing the whole tensor at once.

use half::bf16;
use moeq::quant::sharded::{
    assemble_packed, check_expert_alignment, global_absmax, quantize_slice,
};
use moeq::quant::{Absmax, QuantError, QuantKind, QuantSettings, QuantizedParam};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Contiguous expert ranges as an ownership plan would make them: the first `E % R` ranks get
/// one extra expert.
fn plan(experts: usize, ranks: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (experts / ranks, experts % ranks);
    let mut start = 0;
    (0..ranks)
        .map(|r| {
            let n = base + usize::from(r < extra);
            let range = start..start + n;
            start += n;
            range
        })
        .collect()
}

fn random_experts(e: usize, rows: usize, cols: usize, seed: u64) -> Vec<bf16> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..e * rows * cols)
        .map(|i| {
            // Per-expert scale differences so block statistics vary across experts.
            let scale = 0.01 * (1 + (i / (rows * cols)) % 5) as f32;
            bf16::from_f32(scale * rng.sample::<f32, _>(StandardNormal))
        })
        .collect()
}

#[test]
fn sharded_quantization_equals_whole_for_any_rank_count() {
    let (experts, rows, cols) = (10, 96, 64);
    let x = random_experts(experts, rows, cols, 42);
    let per_expert = rows * cols;
    for settings in [
        QuantSettings::default(),
        QuantSettings {
            kind: QuantKind::Fp4,
            blocksize: 128,
            double_quant: true,
        },
        QuantSettings {
            kind: QuantKind::Nf4,
            blocksize: 256,
            double_quant: false,
        },
    ] {
        let whole = QuantizedParam::quantize(&x, &[experts, rows, cols], settings).unwrap();
        for ranks in [1, 2, 3, 4, 8] {
            check_expert_alignment("gate_up_proj", per_expert, &settings).unwrap();
            let slices: Vec<_> = plan(experts, ranks)
                .into_iter()
                .filter(|r| !r.is_empty())
                .map(|r| {
                    let (a, b) = (r.start * per_expert, r.end * per_expert);
                    quantize_slice("gate_up_proj", &x[a..b], a, x.len(), &settings).unwrap()
                })
                .collect();
            // "all-gather": every rank sees the absmax of all ranks in rank (= expert) order.
            let gathered: Vec<f32> = slices
                .iter()
                .flat_map(|s| s.absmax.iter().copied())
                .collect();
            let absmax = global_absmax(gathered, &settings);
            assert_eq!(
                assemble_packed(&slices),
                whole.packed,
                "{settings:?} ranks={ranks}: codes"
            );
            assert_eq!(
                absmax, whole.absmax,
                "{settings:?} ranks={ranks}: statistics"
            );
            if let Absmax::Nested(n) = &absmax {
                // Double quantization really spans experts: nested blocks cross rank borders.
                assert!(
                    n.codes.len() > 256,
                    "test shape too small to cross nested blocks"
                );
            }
        }
    }
}

#[test]
fn blocks_that_would_straddle_experts_are_rejected() {
    let settings = QuantSettings {
        kind: QuantKind::Nf4,
        blocksize: 4096,
        double_quant: true,
    };
    let err = check_expert_alignment("model.layers.0.mlp.experts.down_proj", 48 * 64, &settings)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "model.layers.0.mlp.experts.down_proj: one expert holds 3072 elements, not a multiple of the quantization blocksize 4096: blocks would straddle experts (use a blocksize that divides 3072)"
    );
    let x = vec![bf16::ONE; 100];
    let err = quantize_slice("p", &x, 10, 200, &QuantSettings::default()).unwrap_err();
    assert_eq!(
        err,
        QuantError::Layout {
            name: "p".into(),
            problem: "slice 10..110 of 200 elements does not fall on 64-element block boundaries"
                .into()
        }
    );
}

#[test]
fn every_real_expert_shape_divides_every_blocksize() {
    // (2I·H, H·I) per expert for qwen3-30b-a3b, qwen3-235b-a22b, qwen1.5-moe, mixtral-8x7b, olmoe.
    let shapes = [
        (768, 2048),
        (1536, 4096),
        (1408, 2048),
        (14336, 4096),
        (1024, 2048),
    ];
    for (i, h) in shapes {
        for bs in moeq::quant::BLOCKSIZES {
            let s = QuantSettings {
                kind: QuantKind::Nf4,
                blocksize: bs,
                double_quant: true,
            };
            check_expert_alignment("gate_up_proj", 2 * i * h, &s).unwrap();
            check_expert_alignment("down_proj", h * i, &s).unwrap();
        }
    }
}

#[test]
fn dequantization_error_is_bounded_by_half_the_widest_code_gap() {
    let x = random_experts(4, 32, 64, 7);
    let q = QuantizedParam::quantize(
        &x,
        &[4, 32, 64],
        QuantSettings {
            double_quant: false,
            ..QuantSettings::default()
        },
    )
    .unwrap();
    let Absmax::Plain(absmax) = &q.absmax else {
        unreachable!()
    };
    let deq = q.dequantize();
    // NF4's widest gap is between -1.0 and -0.6962: half of it bounds the error relative to absmax.
    for (i, (v, d)) in x.iter().zip(&deq).enumerate() {
        let bound = 0.5 * (1.0 - 0.6961928) * absmax[i / 64] + 1e-7;
        assert!(
            (v.to_f32() - d).abs() <= bound,
            "element {i}: {} vs {d}",
            v.to_f32()
        );
    }
}

#[test]
fn zero_blocks_and_odd_tails_follow_bitsandbytes() {
    // Block 1 all zero → NaN scale → every code 0. Odd length → final low nibble codes 0.0 (7).
    let mut x = vec![0.5f32; 64 * 3 + 1];
    x[64..128].iter_mut().for_each(|v| *v = 0.0);
    let q = QuantizedParam::quantize(
        &x,
        &[x.len()],
        QuantSettings {
            double_quant: false,
            ..QuantSettings::default()
        },
    )
    .unwrap();
    assert_eq!(q.packed.len(), x.len().div_ceil(2));
    assert!(q.packed[32..64].iter().all(|&b| b == 0));
    assert_eq!(q.packed[0], 0xff); // 0.5 / 0.5 = 1.0 → code 15 twice
    assert_eq!(*q.packed.last().unwrap(), 0xf7);
}

#[test]
fn tensor_ops_match_the_reference_functions() {
    use candle_core::{DType, Device, Tensor};
    let x = random_experts(3, 40, 64, 9);
    let t = Tensor::from_vec(x.clone(), (3, 40, 64), &Device::Cpu).unwrap();
    let settings = QuantSettings::default();
    let (packed, absmax) = moeq::quant::op::quantize(&t, &settings).unwrap();
    let (want_packed, want_absmax) = moeq::quant::quantize_4bit(&x, 64, QuantKind::Nf4);
    assert_eq!(packed.to_vec1::<u8>().unwrap(), want_packed);
    assert_eq!(absmax.to_vec1::<f32>().unwrap(), want_absmax);
    let deq = moeq::quant::op::dequantize(
        &packed,
        &absmax,
        &[3, 40, 64],
        QuantKind::Nf4,
        64,
        DType::BF16,
    )
    .unwrap();
    assert_eq!(deq.dims(), &[3, 40, 64]);
    let want: Vec<bf16> =
        moeq::quant::dequantize_4bit(&want_packed, &want_absmax, x.len(), 64, QuantKind::Nf4)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
    assert_eq!(deq.flatten_all().unwrap().to_vec1::<bf16>().unwrap(), want);
}

/// Nested (double) quantization of a large statistics array is split over threads on block
/// boundaries; every block's codes must be what quantizing that block alone gives.
#[test]
fn nested_statistics_split_over_threads_equal_block_by_block() {
    use moeq::quant::nested::{quantize_absmax_with_offset, NESTED_BLOCKSIZE};
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // 1000 blocks and a partial one: several threads' worth on any machine with 2+ cores.
    let absmax: Vec<f32> = (0..1000 * NESTED_BLOCKSIZE + 77)
        .map(|_| 0.02 + 0.01 * rng.sample::<f32, _>(StandardNormal).abs())
        .collect();
    let offset = 0.025;
    let whole = quantize_absmax_with_offset(&absmax, offset);
    for (b, block) in absmax.chunks(NESTED_BLOCKSIZE).enumerate() {
        let alone = quantize_absmax_with_offset(block, offset);
        let at = b * NESTED_BLOCKSIZE;
        assert_eq!(
            whole.codes[at..at + block.len()],
            alone.codes[..],
            "block {b}"
        );
        assert_eq!(whole.nested_absmax[b], alone.nested_absmax[0], "block {b}");
    }
    assert!(whole.codes.iter().any(|&c| c != whole.codes[0]));
}
