//! The code books of bitsandbytes and its scalar quantizers, reproduced operation for
//! operation from its CUDA kernels (`dQuantizeNF4`, `dQuantizeFP4`, `dQuantize<0>`), so that
//! every comparison and rounding happens as on the GPU. Golden data from the real library
//! (tests/fixtures/nf4/) is the judge.

/// NF4 values as bitsandbytes stores them (`nf4_dequantization_lut`, f32 bit patterns).
pub const NF4_CODE: [f32; 16] = [
    f32::from_bits(0xbf800000),
    f32::from_bits(0xbf3239b1),
    f32::from_bits(0xbf066b30),
    f32::from_bits(0xbeca32a0),
    f32::from_bits(0xbe91a24d),
    f32::from_bits(0xbe3d353f),
    f32::from_bits(0xbdba7871),
    0.0,
    f32::from_bits(0x3da2faff),
    f32::from_bits(0x3e24cae3),
    f32::from_bits(0x3e7c04dd),
    f32::from_bits(0x3ead033a),
    f32::from_bits(0x3ee1a4b8),
    f32::from_bits(0x3f1007ab),
    f32::from_bits(0x3f3913b3),
    1.0,
];

/// Magnitudes of the FP4 codes' low three bits (`fp4_dequantization_lut`); bit 3 is the sign.
#[allow(clippy::excessive_precision)]
pub const FP4_LUT: [f32; 8] = [
    0.0,
    0.005208333333,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
];

/// Value of a 4-bit code, as the dequantize kernels compute it before scaling.
pub fn nf4_value(code: u8) -> f32 {
    NF4_CODE[(code & 0x0f) as usize]
}

pub fn fp4_value(code: u8) -> f32 {
    let sign = 1.0 - 2.0 * ((code & 0b1000) >> 3) as f32;
    FP4_LUT[(code & 0b111) as usize] * sign
}

/// `dQuantizeNF4`: the decision tree over the f32 midpoints of the code book. A NaN (the
/// scaled value of an all-zero block) fails every comparison and lands on code 0.
#[allow(clippy::excessive_precision)]
pub fn quantize_nf4(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > 0.5016634166240692 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 {
                0b1011
            } else {
                0b1010
            }
        } else if x > 0.1202552504837513 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 {
                0b0111
            } else {
                0b0110
            }
        } else if x > -0.23460740596055984 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 {
            0b0011
        } else {
            0b0010
        }
    } else if x > -0.8480964004993439 {
        0b0001
    } else {
        0b0000
    }
}

/// `dQuantizeFP4`: sign bit from `x < 0`, then a tree over |x|.
#[allow(clippy::excessive_precision)]
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let x = x.abs();
    let code = if x > 0.29166667 {
        if x > 0.583333 {
            if x > 0.8333333 {
                0b0011
            } else {
                0b0010
            }
        } else if x > 0.4166667 {
            0b101
        } else {
            0b100
        }
    } else if x > 0.0859375 {
        if x > 0.20833333 {
            0b0111
        } else {
            0b0110
        }
    } else if x > 0.00260417 {
        0b0001
    } else {
        0b0000
    };
    code + sign
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`) as f32 bits:
/// the code book of the nested (double) quantization of absmax.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// `dQuantize<0>`: the 8-bit quantizer's binary search over a sorted 256-entry code book,
/// then the nearer of the bracketing entries by f32 midpoint, exactly as the kernel decides.
pub fn quantize_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    chosen as u8
}
