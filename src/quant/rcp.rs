//! The GPU's single-precision reciprocal under `--use_fast_math` (`rcp.approx.ftz.f32`), which
//! bitsandbytes uses for `1 / absmax` before scaling a block. It is not always the correctly
//! rounded IEEE reciprocal, and a one-ulp difference can move a value across a code threshold,
//! so the CPU reference reproduces it: IEEE `1/x` except at the mantissas listed in
//! `rcp_exceptions.bin`, measured on the GPU for all 2^23 mantissas
//! (tests/fixtures/nf4/gen_golden.py). The result's mantissa depends only on the input's
//! mantissa (measured), so one table covers every exponent.

/// Little-endian `(mantissa, result bits at exponent 0)` u32 pairs, sorted by mantissa.
static EXCEPTIONS: &[u8] = include_bytes!("rcp_exceptions.bin");

fn exception(mantissa: u32) -> Option<u32> {
    let n = EXCEPTIONS.len() / 8;
    let at = |i: usize, k: usize| {
        let o = i * 8 + k * 4;
        u32::from_le_bytes([
            EXCEPTIONS[o],
            EXCEPTIONS[o + 1],
            EXCEPTIONS[o + 2],
            EXCEPTIONS[o + 3],
        ])
    };
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match at(mid, 0).cmp(&mantissa) {
            std::cmp::Ordering::Equal => return Some(at(mid, 1)),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    None
}

/// Number of measured mantissas where the GPU differs from IEEE.
pub fn exception_count() -> usize {
    EXCEPTIONS.len() / 8
}

/// Subnormals become signed zero, as with `-ftz=true`.
pub fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `a * b` as `mul.ftz.f32` computes it.
pub fn mul_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) * ftz(b))
}

/// `1.0f / x` as `rcp.approx.ftz.f32` computes it.
pub fn rcp_approx_ftz(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let exp = (bits >> 23) & 0xff;
    let mantissa = bits & 0x7f_ffff;
    if x.is_nan() {
        return f32::NAN;
    }
    if exp == 0 {
        return f32::from_bits(sign | 0x7f80_0000); // ±0 and flushed subnormals → ±inf
    }
    if exp == 0xff {
        return f32::from_bits(sign); // ±inf → ±0
    }
    let base = exception(mantissa)
        .unwrap_or_else(|| (1.0f32 / f32::from_bits(0x3f80_0000 | mantissa)).to_bits());
    let base_exp = ((base >> 23) & 0xff) as i32;
    let result_exp = base_exp - (exp as i32 - 127);
    if result_exp <= 0 {
        return f32::from_bits(sign); // would be subnormal: flushed
    }
    if result_exp >= 0xff {
        return f32::from_bits(sign | 0x7f80_0000);
    }
    f32::from_bits(sign | ((result_exp as u32) << 23) | (base & 0x7f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_values_follow_ftz_semantics() {
        assert_eq!(rcp_approx_ftz(0.0), f32::INFINITY);
        assert_eq!(rcp_approx_ftz(1e-40), f32::INFINITY); // subnormal input flushed
        assert_eq!(rcp_approx_ftz(f32::INFINITY), 0.0);
        assert!(rcp_approx_ftz(f32::NAN).is_nan());
        assert_eq!(rcp_approx_ftz(1.0), 1.0);
        assert_eq!(rcp_approx_ftz(4.0), 0.25);
        assert_eq!(rcp_approx_ftz(f32::MAX), 0.0); // 1/MAX is subnormal: flushed
        assert_eq!(mul_ftz(1e-20, 1e-20), 0.0);
    }

    #[test]
    fn power_of_two_scaling_keeps_the_mantissa() {
        // Random-ish mantissas over many exponents: 2^e·x has reciprocal 2^-e·(1/x).
        let mut s = 0x1234_5678u32;
        for _ in 0..10_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = f32::from_bits(0x3f80_0000 | (s & 0x7f_ffff));
            let r = rcp_approx_ftz(x);
            for e in [-60i32, -7, 3, 60] {
                let scale = 2f32.powi(e);
                assert_eq!(rcp_approx_ftz(x * scale), r / scale, "x={x} e={e}");
            }
        }
    }
}
