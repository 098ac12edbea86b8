//! Double quantization of the absmax array (`compress_statistics=True`):
//! `offset = mean(absmax)`, then `absmax − offset` is quantized blockwise (blocksize 256) to
//! 8-bit codes of the signed dynamic map, each 256-block keeping its own f32 absmax.
//!
//! These statistics span the whole parameter. With expert parallelism each rank quantizes
//! only its experts' 4-bit codes, then every rank computes this from the all-gathered absmax
//! in global order — so the stored bytes do not depend on the world size.

use super::codebook::{dynamic_map, quantize_8bit};
use super::rcp::{mul_ftz, rcp_approx_ftz};

pub const NESTED_BLOCKSIZE: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// Mean of the absmax array, subtracted before quantizing.
    pub offset: f32,
    /// One 8-bit code per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 absmax per 256 codes.
    pub nested_absmax: Vec<f32>,
}

/// Mean of the absmax array: summed in f64 in index order, rounded once to f32. bitsandbytes
/// uses `torch.mean` on the GPU, whose reduction order differs; both round the same exact
/// value, and the results agree to within an ulp or two (golden tests check).
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    (sum / absmax.len() as f64) as f32
}

pub fn quantize_absmax(absmax: &[f32]) -> NestedAbsmax {
    quantize_absmax_with_offset(absmax, mean_offset(absmax))
}

/// Nested quantization with a given offset (tests pin bitsandbytes' own offset this way).
pub fn quantize_absmax_with_offset(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let code = dynamic_map();
    let nested_absmax: Vec<f32> = absmax
        .chunks(NESTED_BLOCKSIZE)
        .map(|block| block.iter().fold(0f32, |m, &v| m.max((v - offset).abs())))
        .collect();
    // Every code depends on its own value and block only: a large parameter's statistics (3M
    // values for one layer's experts) are split over threads on block boundaries.
    let mut codes = vec![0u8; absmax.len()];
    let quantize = |start_block: usize, out: &mut [u8]| {
        let from = start_block * NESTED_BLOCKSIZE;
        let blocks = out
            .chunks_mut(NESTED_BLOCKSIZE)
            .zip(absmax[from..].chunks(NESTED_BLOCKSIZE));
        for ((out, block), &nabs) in blocks.zip(&nested_absmax[start_block..]) {
            let recip = rcp_approx_ftz(nabs);
            for (c, &a) in out.iter_mut().zip(block) {
                *c = quantize_8bit(&code, mul_ftz(a - offset, recip));
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
    let per_thread = absmax
        .len()
        .div_ceil(NESTED_BLOCKSIZE)
        .div_ceil(threads)
        .max(1)
        * NESTED_BLOCKSIZE;
    if threads == 1 || absmax.len() <= per_thread {
        quantize(0, &mut codes);
    } else {
        std::thread::scope(|s| {
            for (k, out) in codes.chunks_mut(per_thread).enumerate() {
                let q = &quantize;
                s.spawn(move || q(k * per_thread / NESTED_BLOCKSIZE, out));
            }
        });
    }
    NestedAbsmax {
        offset,
        codes,
        nested_absmax,
    }
}

/// The absmax values the 4-bit dequantization uses: `f32(code8 · nested_absmax) + offset`,
/// two roundings.
pub fn dequantize_absmax(n: &NestedAbsmax) -> Vec<f32> {
    dequantize_absmax_range(&n.codes, &n.nested_absmax, n.offset, 0)
}

/// `dequantize_absmax` of a slice of the codes: `codes[0]` is block `start` of the parameter,
/// `nested_absmax` the parameter's whole nested array.
pub fn dequantize_absmax_range(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    start: usize,
) -> Vec<f32> {
    let code = dynamic_map();
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            mul_ftz(
                code[q as usize],
                nested_absmax[(start + i) / NESTED_BLOCKSIZE],
            ) + offset
        })
        .collect()
}
