//! MXFP4 expert weights, as OpenAI's gpt-oss checkpoints ship them: an expert parameter `P`
//! (`gate_up_proj`, `down_proj`) is stored as `P_blocks` u8 `[E, rows, cols/32, 16]` and
//! `P_scales` u8 `[E, rows, cols/32]`, rows = output features, cols = input features. Each
//! block byte packs two FP4 (e2m1) codes, the low nibble the even element; each group of 32
//! elements along cols shares one E8M0 scale byte `s`, and the weight is `fp4 · 2^(s − 127)`.
//! moeq turns each expert's slice into bf16 `[rows, cols]` as it reads it — transformers'
//! `convert_moe_packed_tensors` arithmetic (an f32 product rounded to bf16), without its
//! transpose — and quantizes it to NF4 from there. The encoder exists to write test
//! checkpoints in the hub format.

use candle_core::{Device, Tensor};
use half::bf16;

/// e2m1 code → value: codes 8..16 are 0..8 negated (code 8 is −0).
const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];
/// Elements sharing one scale byte.
const GROUP: usize = 32;
/// E8M0 reserves 255 for NaN.
const NAN_SCALE: u8 = 255;

/// The packed FP4 codes of an MXFP4 parameter.
pub(crate) fn blocks_name(param: &str) -> String {
    format!("{param}_blocks")
}

/// The E8M0 group scales of an MXFP4 parameter.
pub(crate) fn scales_name(param: &str) -> String {
    format!("{param}_scales")
}

/// `2^(s − 127)` in f32, exact for every byte but 255: 0 is the subnormal 2^−127.
fn scale_f32(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits(u32::from(s) << 23),
    }
}

/// One expert: blocks `[rows, cols/32, 16]` + scales `[rows, cols/32]` → bf16 `[rows, cols]`
/// on the CPU. The f32 product is exact (two significant bits times a power of two); it only
/// leaves bf16's range at scales ≥ 253, where it becomes ±inf as in transformers.
pub(crate) fn dequantize(
    blocks: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    if cols % GROUP != 0 {
        candle_core::bail!("MXFP4 weight [{rows}, {cols}]: cols must be a multiple of {GROUP}");
    }
    let (want_blocks, want_scales) = (rows * cols / 2, rows * cols / GROUP);
    if blocks.len() != want_blocks || scales.len() != want_scales {
        candle_core::bail!(
            "MXFP4 weight [{rows}, {cols}]: {} block bytes and {} scale bytes (expected {want_blocks} = [{rows}, {}, 16] and {want_scales} = [{rows}, {}])",
            blocks.len(),
            scales.len(),
            cols / GROUP,
            cols / GROUP
        );
    }
    if let Some(i) = scales.iter().position(|&s| s == NAN_SCALE) {
        let groups = cols / GROUP;
        candle_core::bail!(
            "MXFP4 weight [{rows}, {cols}]: scale byte 255 (NaN in E8M0) at row {}, group {}: the checkpoint is corrupt",
            i / groups,
            i % groups
        );
    }
    // Block byte i holds elements 2i and 2i+1, both in group i / 16.
    let mut out = Vec::with_capacity(rows * cols);
    for (byte, scale) in blocks
        .iter()
        .zip(scales.iter().flat_map(|&s| [s; GROUP / 2]))
    {
        let scale = scale_f32(scale);
        out.push(bf16::from_f32(FP4_VALUES[usize::from(byte & 0xF)] * scale));
        out.push(bf16::from_f32(FP4_VALUES[usize::from(byte >> 4)] * scale));
    }
    Tensor::from_vec(out, (rows, cols), &Device::Cpu)
}

/// Midpoints between consecutive FP4 magnitudes: code `k` is the count of those below `|x|`.
const MIDPOINTS: [f64; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// `2^e` in f64 (exact for |e| ≤ 1022).
fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// The e2m1 code nearest to `x` (already divided by the group scale). Ties go to the even
/// code, as in IEEE rounding (0.25 → 0, 0.75 → 1, 2.5 → 2, 3.5 → 4, 5 → 4); magnitudes above 6
/// saturate to 6. NaN encodes as ±0.
fn fp4_code(x: f64) -> u8 {
    let a = x.abs();
    let magnitude = MIDPOINTS
        .iter()
        .zip(1u8..)
        .filter(|&(&mid, upper)| a > mid || (a == mid && upper % 2 == 0))
        .count() as u8;
    magnitude | if x.is_sign_negative() { 8 } else { 0 }
}

/// The smallest scale byte at which a group's largest magnitude rounds to at most 6, i.e.
/// `max < 7 · 2^(s − 127)` (7 would tie to the even 8, past the grid), clamped to 0..=254.
/// The largest magnitude then rounds to 4 or 6, so re-encoding a decoded group picks the same
/// byte. An all-zero group gets 0.
fn group_scale(max: f64) -> u8 {
    let fits = |s: i32| max < 7.0 * pow2(s - 127);
    let mut s = ((max / 7.0).log2().floor() + 128.0).clamp(0.0, 254.0) as i32;
    while s > 0 && fits(s - 1) {
        s -= 1;
    }
    while s < 254 && !fits(s) {
        s += 1;
    }
    s as u8
}

/// f32 `w [rows, cols]` → (blocks `[rows, cols/32, 16]`, scales `[rows, cols/32]`), the hub
/// layout. Each value lands within half an FP4 step of itself (in units of its group's scale),
/// except past the clamp at scale byte 254. Panics if `cols` is not a multiple of 32 or
/// `w.len() != rows · cols` (a test-writing helper: the caller picks the shapes).
pub(crate) fn quantize(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(
        cols % GROUP == 0 && w.len() == rows * cols,
        "MXFP4 quantize: {} values for [{rows}, {cols}] (cols must be a multiple of {GROUP})",
        w.len()
    );
    let mut blocks = Vec::with_capacity(w.len() / 2);
    let mut scales = Vec::with_capacity(w.len() / GROUP);
    for group in w.chunks_exact(GROUP) {
        let max = group.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
        let s = group_scale(max);
        let unit = pow2(i32::from(s) - 127);
        scales.push(s);
        for pair in group.chunks_exact(2) {
            let lo = fp4_code(f64::from(pair[0]) / unit);
            let hi = fp4_code(f64::from(pair[1]) / unit);
            blocks.push(lo | hi << 4);
        }
    }
    (blocks, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn decoded(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        dequantize(blocks, scales, rows, cols)
            .and_then(|t| {
                t.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()
            })
            .expect("valid MXFP4")
    }

    /// Random weights over many magnitudes: each group draws its own exponent in 2^−40..2^40,
    /// so neighbouring groups get very different scale bytes.
    fn random_weights(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        let mut w = Vec::with_capacity(n);
        for _ in 0..n / GROUP {
            let unit = 2f32.powi(rng.random_range(-40..=40));
            w.extend((0..GROUP).map(|_| rng.random_range(-7.0f32..7.0) * unit));
        }
        w
    }

    #[test]
    fn hand_worked_bytes() {
        // Row 0, scale 128 = 2^1: 0x2F → low F = −6, high 2 = +1 → [−12, 2]; 0x80 → [+0, −0].
        // Row 1, scale 0 = 2^−127: 0x31 → [0.5, 1.5] · 2^−127 (bf16 subnormals).
        // Row 2, scale 254 = 2^127: 0x31 → [2^126, 1.5 · 2^127]; 0x04 → 2 · 2^127 = inf.
        let mut blocks = vec![0u8; 3 * 16];
        blocks[..2].copy_from_slice(&[0x2F, 0x80]);
        blocks[16] = 0x31;
        blocks[32..34].copy_from_slice(&[0x31, 0x04]);
        let v = decoded(&blocks, &[128, 0, 254], 3, 32);
        assert_eq!(v[..4], [-12.0, 2.0, 0.0, 0.0]);
        assert!(v[2].is_sign_positive() && v[3].is_sign_negative());
        assert_eq!(v[32..34], [2f32.powi(-128), 1.5 * 2f32.powi(-127)]);
        assert_eq!(
            v[64..67],
            [2f32.powi(126), 1.5 * 2f32.powi(127), f32::INFINITY]
        );
        assert_eq!(v[67], 0.0);
    }

    #[test]
    fn scale_bytes_are_powers_of_two() {
        for s in 0..=254u8 {
            assert_eq!(
                f64::from(scale_f32(s)),
                pow2(i32::from(s) - 127),
                "scale byte {s}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let err = |b: &[u8], s: &[u8], r, c| dequantize(b, s, r, c).unwrap_err().to_string();
        assert!(err(&[0; 8], &[0; 1], 1, 16).contains("multiple of 32"));
        assert!(err(&[0; 15], &[0; 1], 1, 32).contains("expected 16"));
        assert!(err(&[0; 32], &[0; 1], 2, 32).contains("and 2 = [2, 1]"));
        let nan = err(&[0; 32], &[127, 255], 1, 64);
        assert!(
            nan.contains("NaN") && nan.contains("row 0, group 1"),
            "{nan}"
        );
    }

    #[test]
    fn ties_round_to_even_and_the_top_saturates() {
        // A group whose max is 6 keeps scale 2^0, so the values below are already scaled.
        let mut w = vec![6.0f32; GROUP];
        let xs = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, 6.9];
        let want = [0.0f32, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, 6.0];
        w[..xs.len()].copy_from_slice(&xs);
        let (blocks, scales) = quantize(&w, 1, GROUP);
        assert_eq!(scales, [127]);
        let v = decoded(&blocks, &scales, 1, GROUP);
        for (i, (x, want)) in xs.iter().zip(want).enumerate() {
            assert_eq!(
                v[i].to_bits(),
                want.to_bits(),
                "{x} → {} (want {want})",
                v[i]
            );
        }
        // 7 would round past 6: the group moves to the next scale.
        assert_eq!(quantize(&[7.0; GROUP], 1, GROUP).1, [128]);
        assert_eq!(quantize(&[0.0; GROUP], 1, GROUP).1, [0]);
    }

    #[test]
    fn random_values_land_within_half_a_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let (rows, cols) = (24, 96);
        let w = random_weights(&mut rng, rows * cols);
        let (blocks, scales) = quantize(&w, rows, cols);
        let v = decoded(&blocks, &scales, rows, cols);
        let grid = &FP4_VALUES[..8];
        for (g, &s) in scales.iter().enumerate() {
            let unit = pow2(i32::from(s) - 127);
            let mut top = 0f64;
            for i in g * GROUP..(g + 1) * GROUP {
                let (x, q) = (f64::from(w[i]) / unit, f64::from(v[i]) / unit);
                // The nearest grid value's distance; past 6, saturation costs less than 1 (half 4 → 6).
                let nearest = grid
                    .iter()
                    .map(|&m| (x.abs() - f64::from(m)).abs())
                    .fold(1.0, f64::min);
                assert!(
                    (x - q).abs() <= nearest,
                    "w[{i}] = {}: scaled {x} → {q}",
                    w[i]
                );
                assert!(
                    q == 0.0 || q.signum() == x.signum(),
                    "w[{i}]: sign of {x} → {q}"
                );
                top = top.max(q.abs());
            }
            assert!(
                top == 4.0 || top == 6.0,
                "group {g} (scale {s}) tops at {top}"
            );
        }
    }

    #[test]
    fn encoding_a_decoded_tensor_gives_back_its_bytes() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let (rows, cols) = (16, 128);
        let (blocks, scales) = quantize(&random_weights(&mut rng, rows * cols), rows, cols);
        let again = quantize(&decoded(&blocks, &scales, rows, cols), rows, cols);
        assert_eq!((blocks, scales), again);
    }
}
