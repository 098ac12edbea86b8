//! The CPU quantizer against golden data from the real bitsandbytes 0.50.2 CUDA path
//! (tests/fixtures/nf4/gen_golden.py, run on an H100): packed codes, absmax, nested codes and
//! nested absmax byte for byte; the offset bit for bit (moeq adds in torch's CUDA order; see
//! nested.rs, and the sweep of lengths below); nested codes bit-exact given bitsandbytes' own
//! offset; dequantized values byte for byte.

use half::{bf16, f16};
use moeq::quant::codebook::dynamic_map;
use moeq::quant::nested::{dequantize_absmax, mean_offset, quantize_absmax_with_offset};
use moeq::quant::{dequantize_4bit, quantize_4bit, QuantKind};
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4");

struct Golden {
    bytes: Vec<u8>,
    meta: Value,
}

fn golden() -> Golden {
    let bytes = std::fs::read(format!("{DIR}/nf4_golden.safetensors")).expect("fixture present");
    let meta =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/nf4_golden.json")).unwrap())
            .unwrap();
    Golden { bytes, meta }
}

fn raw<'a>(st: &'a SafeTensors, key: &str) -> &'a [u8] {
    st.tensor(key)
        .unwrap_or_else(|_| panic!("missing {key}"))
        .data()
}

fn f32s(st: &SafeTensors, key: &str) -> Vec<f32> {
    raw(st, key)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Quantize the case input as its own dtype; returns (packed, raw absmax, dequantize-to-bytes).
/// Dequantizes the case's codes with given f32 scales into the case dtype's bytes.
type Dequantizer = Box<dyn Fn(&[f32]) -> Vec<u8>>;

fn run_case(st: &SafeTensors, case: &Value) -> (Vec<u8>, Vec<f32>, Dequantizer) {
    let bs = case["blocksize"].as_u64().unwrap() as usize;
    let kind = match case["quant_type"].as_str().unwrap() {
        "nf4" => QuantKind::Nf4,
        _ => QuantKind::Fp4,
    };
    let input = raw(st, case["input"].as_str().unwrap());
    macro_rules! quant {
        ($t:ty, $from:expr, $to:expr) => {{
            let x: Vec<$t> = input
                .chunks_exact(std::mem::size_of::<$t>())
                .map($from)
                .collect();
            let n = x.len();
            let (packed, absmax) = quantize_4bit(&x, bs, kind);
            let p2 = packed.clone();
            let deq: Dequantizer = Box::new(move |scales: &[f32]| {
                dequantize_4bit(&p2, scales, n, bs, kind)
                    .into_iter()
                    .flat_map($to)
                    .collect()
            });
            (packed, absmax, deq)
        }};
    }
    match case["dtype"].as_str().unwrap() {
        "float32" => quant!(
            f32,
            |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            |v: f32| v.to_le_bytes()
        ),
        "bfloat16" => quant!(bf16, |c| bf16::from_le_bytes([c[0], c[1]]), |v: f32| {
            bf16::from_f32(v).to_le_bytes()
        }),
        "float16" => quant!(f16, |c| f16::from_le_bytes([c[0], c[1]]), |v: f32| {
            f16::from_f32(v).to_le_bytes()
        }),
        other => panic!("dtype {other}"),
    }
}

#[test]
fn code_books_match_bitsandbytes() {
    let g = golden();
    let st = SafeTensors::deserialize(&g.bytes).unwrap();
    assert_eq!(bits(&f32s(&st, "dynamic_map")), bits(&dynamic_map()));
    assert_eq!(bits(&f32s(&st, "nf4_code")), bits(&QuantKind::Nf4.code()));
    assert_eq!(bits(&f32s(&st, "fp4_code")), bits(&QuantKind::Fp4.code()));
}

#[test]
fn quantization_matches_bitsandbytes_byte_for_byte() {
    let g = golden();
    let st = SafeTensors::deserialize(&g.bytes).unwrap();
    let cases = g.meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let (packed, absmax, dequantize) = run_case(&st, case);
        let want_packed = raw(&st, &format!("{key}.packed"));
        let bad = packed
            .iter()
            .zip(want_packed)
            .filter(|(a, b)| a != b)
            .count();
        if bad > 0 || packed.len() != want_packed.len() {
            failures.push(format!(
                "{key}: {bad} of {} packed bytes differ",
                want_packed.len()
            ));
        }
        let scales = if case["nested"].as_bool().unwrap() {
            assert_eq!(
                bits(&absmax),
                bits(&f32s(&st, &format!("{key}.raw_absmax"))),
                "{key}: absmax"
            );
            let offset = f32::from_bits(case["offset_bits"].as_u64().unwrap() as u32);
            let ours = mean_offset(&absmax);
            assert_eq!(
                ours.to_bits(),
                offset.to_bits(),
                "{key}: offset {ours} vs bitsandbytes {offset}"
            );
            let nested = quantize_absmax_with_offset(&absmax, offset);
            if nested.codes != raw(&st, &format!("{key}.absmax")) {
                failures.push(format!("{key}: nested absmax codes differ"));
            }
            assert_eq!(
                bits(&nested.nested_absmax),
                bits(&f32s(&st, &format!("{key}.nested_absmax"))),
                "{key}"
            );
            dequantize_absmax(&nested)
        } else {
            assert_eq!(
                bits(&absmax),
                bits(&f32s(&st, &format!("{key}.absmax"))),
                "{key}: absmax"
            );
            absmax
        };
        let deq = dequantize(&scales);
        let digest = format!("{:x}", Sha256::digest(&deq));
        if digest != case["dequant_sha256"].as_str().unwrap() {
            failures.push(format!("{key}: dequantized values differ"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The generator's arrays (tests/fixtures/nf4/gen_mean_golden.py): positive, 24-bit mantissas,
/// magnitudes 2^-2 .. 2^2.
fn golden_array(n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h = (i * 2654435761 + n as u64 * 40503) % (1 << 32);
            let base = ((h >> 8) + 1) as f32 * 2f32.powi(-24);
            base * 2f32.powi(((7 * i + n as u64) % 5) as i32 - 2)
        })
        .collect()
}

fn mean_golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/mean_golden.json")).unwrap())
        .unwrap()
}

/// `mean_offset` is torch.mean on CUDA bit for bit (tests/fixtures/nf4/gen_mean_golden.py, torch
/// 2.11 on an H200): every length 1..5,000 — one block, vectorized or not, tails of 1–3 — and
/// real parameters' absmax lengths up to 7.3M, where the sum is split over blocks.
#[test]
fn mean_offset_is_torchs_cuda_mean_bit_for_bit() {
    let meta = mean_golden();
    let lengths = meta["lengths"].as_array().unwrap();
    let want = meta["mean_bits"].as_array().unwrap();
    assert_eq!(lengths.len(), want.len());
    assert!(lengths.len() > 5000);
    let wrong: Vec<usize> = lengths
        .iter()
        .zip(want)
        .map(|(n, bits)| (n.as_u64().unwrap() as usize, bits.as_u64().unwrap() as u32))
        .filter(|&(n, bits)| mean_offset(&golden_array(n)).to_bits() != bits)
        .map(|(n, _)| n)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} lengths differ: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
}

/// The whole double quantization's offset against bitsandbytes 0.50.2 itself: moeq's NF4
/// absmax of the generator's weights (64·n values, every third negated) and their mean equal
/// the `offset` of bitsandbytes' `quantize_4bit(compress_statistics=True)`, for absmax lengths
/// 1..600, 1,536, 4,096, 16,384 and 49,152.
#[test]
fn nested_offset_is_bitsandbytes_bit_for_bit() {
    let meta = mean_golden();
    let lengths = meta["bnb_lengths"].as_array().unwrap();
    let want = meta["bnb_offset_bits"].as_array().unwrap();
    assert_eq!(lengths.len(), want.len());
    assert!(lengths.len() > 600);
    let mut wrong = Vec::new();
    for (n, bits) in lengths.iter().zip(want) {
        let n = n.as_u64().unwrap() as usize;
        let mut w = golden_array(64 * n);
        for x in w.iter_mut().step_by(3) {
            *x = -*x;
        }
        let (_, absmax) = quantize_4bit(&w, 64, QuantKind::Nf4);
        if mean_offset(&absmax).to_bits() != bits.as_u64().unwrap() as u32 {
            wrong.push(n);
        }
    }
    assert!(
        wrong.is_empty(),
        "{} lengths differ: {wrong:?}",
        wrong.len()
    );
}
