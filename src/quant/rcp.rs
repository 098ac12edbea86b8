//! The GPU's single-precision reciprocal under `--use_fast_math` (`rcp.approx.ftz.f32`), which
//! bitsandbytes uses for `1 / absmax` before scaling a block. It is not always the correctly
//! rounded IEEE reciprocal (measured on an H100: 1,108,522 of the 2^23 mantissas differ, each
//! by one ulp), and a one-ulp difference can move a value across a code threshold, so the CPU
//! reference reproduces it from `rcp_map.bin`: 2 bits per mantissa (0 = IEEE, 1 = one ulp
//! above, 2 = one ulp below), measured by tests/fixtures/nf4/gen_golden.py. The result's
//! mantissa depends only on the input's mantissa (measured for exponents −100…100), so the
//! map covers every exponent.

static MAP: &[u8; 1 << 21] = include_bytes!("rcp_map.bin");

/// Correction, in ulps, of the GPU reciprocal of `1.m` relative to IEEE.
fn correction(mantissa: u32) -> i32 {
    match (MAP[(mantissa >> 2) as usize] >> ((mantissa & 3) * 2)) & 3 {
        1 => 1,
        2 => -1,
        _ => 0,
    }
}

/// Number of mantissas where the GPU differs from IEEE.
pub fn exception_count() -> usize {
    (0..1u32 << 23).filter(|&m| correction(m) != 0).count()
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
    let ieee = (1.0f32 / f32::from_bits(0x3f80_0000 | mantissa)).to_bits();
    let base = (ieee as i64 + correction(mantissa) as i64) as u32;
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
    fn the_measured_map_is_present() {
        assert_eq!(exception_count(), 1_108_522);
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
