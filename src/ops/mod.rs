//! Custom ops with a CPU reference and a CUDA implementation (kernels in `kernels/`), each
//! with a backward pass, tested against each other.

pub mod check;
pub mod kernels;
pub mod nf4_linear;
pub mod swiglu;

pub use swiglu::swiglu;

/// The contiguous part of a CPU storage slice that `l` describes; custom ops take contiguous
/// inputs only.
pub fn contiguous_slice<'a, T>(
    s: &'a [T],
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}
