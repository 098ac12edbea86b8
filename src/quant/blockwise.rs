//! Blockwise 4-bit quantization on the CPU, bit-exact with bitsandbytes' CUDA path
//! (`kQuantizeBlockwise` / `kDequantizeBlockwise`):
//!
//! - flatten row-major; block `b` is elements `[b·bs, (b+1)·bs)`, the last block may be partial;
//! - `absmax_b = max |x|` in f32 over the valid elements;
//! - each value is scaled by `rcp.approx(absmax_b)` (`mul.ftz`) and coded by the NF4/FP4 tree;
//!   an all-zero block scales to NaN and codes to 0;
//! - packing: `byte[j] = code[2j] << 4 | code[2j+1]`; an odd tail's low nibble codes 0.0;
//! - dequantization: `code_value · absmax_b` in f32, one rounding to the output dtype.
//!
//! Work is split over threads by whole blocks; results do not depend on the thread count.

use super::codebook::{fp4_value, nf4_value, quantize_fp4, quantize_nf4};
use super::rcp::{mul_ftz, rcp_approx_ftz};
use super::QuantKind;
use half::{bf16, f16};

/// Element types that can be quantized: converted to f32 exactly, as the kernel's
/// `(float)vals[j]` does.
pub trait QuantInput: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl QuantInput for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl QuantInput for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl QuantInput for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Blocks per thread task: large enough to amortise thread start-up.
const BLOCKS_PER_TASK: usize = 4096;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `f(first_block, blocks)` over `nblocks` in contiguous chunks on up to all cores and
/// concatenates the outputs in block order.
fn par_blocks<R: Send>(nblocks: usize, f: impl Fn(usize, usize) -> Vec<R> + Sync) -> Vec<R> {
    let tasks = nblocks.div_ceil(BLOCKS_PER_TASK).max(1);
    let workers = threads().min(tasks);
    if workers <= 1 {
        return f(0, nblocks);
    }
    let per = nblocks.div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (start, end) = (w * per, ((w + 1) * per).min(nblocks));
                let f = &f;
                s.spawn(move || {
                    if start < end {
                        f(start, end - start)
                    } else {
                        Vec::new()
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("quantization worker panicked"))
            .collect()
    })
}

/// `max |x|` per block of `blocksize` elements.
pub fn block_absmax<T: QuantInput>(x: &[T], blocksize: usize) -> Vec<f32> {
    par_blocks(x.len().div_ceil(blocksize), |first, count| {
        (first..first + count)
            .map(|b| {
                let block = &x[b * blocksize..((b + 1) * blocksize).min(x.len())];
                block.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()))
            })
            .collect()
    })
}

fn code_of(kind: QuantKind, scaled: f32) -> u8 {
    match kind {
        QuantKind::Nf4 => quantize_nf4(scaled),
        QuantKind::Fp4 => quantize_fp4(scaled),
    }
}

fn value_of(kind: QuantKind, code: u8) -> f32 {
    match kind {
        QuantKind::Nf4 => nf4_value(code),
        QuantKind::Fp4 => fp4_value(code),
    }
}

/// Packed codes (`ceil(n/2)` bytes) of `x` given each block's absmax. `blocksize` must be even
/// so that every block starts on a byte boundary.
pub fn quantize_with_absmax<T: QuantInput>(
    x: &[T],
    absmax: &[f32],
    blocksize: usize,
    kind: QuantKind,
) -> Vec<u8> {
    debug_assert!(blocksize % 2 == 0 && absmax.len() == x.len().div_ceil(blocksize));
    let n = x.len();
    par_blocks(absmax.len(), |first, count| {
        let start = first * blocksize;
        let end = ((first + count) * blocksize).min(n);
        let mut out = Vec::with_capacity((end - start).div_ceil(2));
        let mut i = start;
        while i < end {
            let recip = rcp_approx_ftz(absmax[i / blocksize]);
            let hi = code_of(kind, mul_ftz(x[i].to_f32(), recip));
            // The kernel loads 0.0 past the end of the data.
            let lo_in = if i + 1 < n { x[i + 1].to_f32() } else { 0.0 };
            let lo = code_of(kind, mul_ftz(lo_in, recip));
            out.push((hi << 4) | lo);
            i += 2;
        }
        out
    })
}

/// Quantizes `x`: packed codes and the f32 absmax of every block.
pub fn quantize_4bit<T: QuantInput>(
    x: &[T],
    blocksize: usize,
    kind: QuantKind,
) -> (Vec<u8>, Vec<f32>) {
    let absmax = block_absmax(x, blocksize);
    let packed = quantize_with_absmax(x, &absmax, blocksize, kind);
    (packed, absmax)
}

/// Dequantizes `n` values to f32 (`code_value · absmax`, `mul.ftz`). Callers round to their
/// dtype with round-to-nearest-even, as `__float2bfloat16_rn` / `__float2half_rn` do.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: QuantKind,
) -> Vec<f32> {
    par_blocks(absmax.len(), |first, count| {
        let start = first * blocksize;
        let end = ((first + count) * blocksize).min(n);
        (start..end)
            .map(|i| {
                let byte = packed[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                mul_ftz(value_of(kind, code), absmax[i / blocksize])
            })
            .collect()
    })
}
