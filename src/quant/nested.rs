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

/// Mean of the absmax array as bitsandbytes gets it: `torch.mean` of a contiguous f32 tensor on
/// CUDA (PyTorch 2.10 and later, `Reduce.cuh`), addition for addition. Each thread of a block of
/// `B` threads sums float4 vectors `x, x + B·ctas, …` into four accumulators (the tail of a
/// length not divisible by 4 to the first accumulator of the first threads), adds them
/// `((a0 + a1) + a2) + a3`; the block halves in shared memory down to 32 lanes, then the warp
/// adds lanes `l + 16, + 8, + 4, + 2, + 1` (PyTorch 2.5–2.9 shuffled in the other order); long
/// arrays are split over `ctas` blocks whose results the last block adds the same way; the sum
/// is multiplied by `1.0f / n`. The input is an allocation of its own (16-byte aligned).
/// tests/quant_golden.rs checks it bit for bit against torch on an H200 (every length to 5,000
/// and real models' lengths up to 7.3M).
pub fn mean_offset(absmax: &[f32]) -> f32 {
    let n = absmax.len();
    if n == 0 {
        return 0.0;
    }
    let vectorized = n >= 128;
    let dim0 = if vectorized { n / 4 } else { n };
    let b = if dim0 >= 512 { 512 } else { 1 << dim0.ilog2() };
    let vpt = n.div_ceil(b);
    let ctas = if vpt >= 256 {
        // 132 SMs × (2048 threads / 512) blocks at most, at least 16 values per thread.
        vpt.div_ceil(16)
            .min(132 * (2048 / 512))
            .max(vpt.div_ceil(256))
    } else {
        1
    };
    let block = |cta: usize| -> Vec<f32> {
        (0..b)
            .map(|x| {
                let mut acc = [0f32; 4];
                if vectorized {
                    let vectors = n / 4;
                    let mut i = x + b * cta;
                    while i < vectors {
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a += absmax[4 * i + j];
                        }
                        i += b * ctas;
                    }
                    if cta == 0 && x < n % 4 {
                        acc[0] += absmax[n - n % 4 + x];
                    }
                } else {
                    acc[0] += absmax[x];
                    if x + b < n {
                        acc[1] += absmax[x + b];
                    }
                }
                ((acc[0] + acc[1]) + acc[2]) + acc[3]
            })
            .collect()
    };
    let partials: Vec<f32> = (0..ctas).map(|c| block_sum(block(c))).collect();
    let sum = if ctas == 1 {
        partials[0]
    } else {
        // The last block: thread t adds results t, t + B, … to zero, then the block sums.
        block_sum(
            (0..b)
                .map(|t| partials.iter().skip(t).step_by(b).fold(0f32, |a, &p| a + p))
                .collect(),
        )
    };
    sum * (1.0f32 / n as f32)
}

/// `block_x_reduce` of one block's lane values: halves in shared memory down to 32 lanes, then
/// the warp's shuffles with offsets 16, 8, 4, 2, 1; lane 0's value.
fn block_sum(mut v: Vec<f32>) -> f32 {
    let mut width = v.len();
    while width > 32 {
        width /= 2;
        for x in 0..width {
            v[x] += v[x + width];
        }
    }
    let mut off = width / 2;
    while off > 0 {
        for l in 0..off {
            v[l] += v[l + off];
        }
        off /= 2;
    }
    v[0]
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
