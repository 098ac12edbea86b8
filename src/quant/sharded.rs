//! World-size independent quantization of a parameter split across ranks (expert parallelism).
//!
//! A rank owning experts `[e0, e1)` of `gate_up_proj [E, 2I, H]` quantizes only its contiguous
//! element range: block absmax and 4-bit codes are local to a block, so they equal the
//! whole-tensor result provided the range starts and ends on block boundaries. The statistics
//! that span the parameter (double-quant offset and nested 256-blocks) are computed by every
//! rank from the all-gathered absmax in global order (`global_absmax`). Result: identical
//! bytes for any number of ranks.

use super::blockwise::{block_absmax, quantize_with_absmax, QuantInput};
use super::{nested, Absmax, QuantError, QuantSettings};
use std::ops::Range;

/// One rank's share of a quantized parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceQuant {
    /// Element range of the flattened parameter this slice covers.
    pub elements: Range<usize>,
    pub packed: Vec<u8>,
    /// f32 absmax of the slice's blocks (to be all-gathered).
    pub absmax: Vec<f32>,
}

/// Checks that splitting a parameter of `per_expert · num_experts` elements at expert
/// boundaries keeps every quantization block inside one expert.
pub fn check_expert_alignment(
    name: &str,
    per_expert: usize,
    settings: &QuantSettings,
) -> Result<(), QuantError> {
    settings.validate()?;
    if per_expert % settings.blocksize != 0 {
        return Err(QuantError::Layout {
            name: name.to_string(),
            problem: format!(
                "one expert holds {per_expert} elements, not a multiple of the quantization blocksize {}: blocks would straddle experts (use a blocksize that divides {per_expert})",
                settings.blocksize
            ),
        });
    }
    Ok(())
}

/// Quantizes `x`, the elements `[start, start + x.len())` of a parameter with `total`
/// elements. The range must begin on a block boundary and end on one or at `total`.
pub fn quantize_slice<T: QuantInput>(
    name: &str,
    x: &[T],
    start: usize,
    total: usize,
    settings: &QuantSettings,
) -> Result<SliceQuant, QuantError> {
    settings.validate()?;
    let end = start + x.len();
    let bs = settings.blocksize;
    if start % bs != 0 || (end % bs != 0 && end != total) || end > total {
        return Err(QuantError::Layout {
            name: name.to_string(),
            problem: format!("slice {start}..{end} of {total} elements does not fall on {bs}-element block boundaries"),
        });
    }
    let absmax = block_absmax(x, bs);
    let packed = quantize_with_absmax(x, &absmax, bs, settings.kind);
    Ok(SliceQuant {
        elements: start..end,
        packed,
        absmax,
    })
}

/// The stored block scales of the whole parameter from its absmax gathered from all ranks
/// in global block order — the same on every rank and for every world size.
pub fn global_absmax(all_absmax: Vec<f32>, settings: &QuantSettings) -> Absmax {
    if settings.double_quant {
        Absmax::Nested(nested::quantize_absmax(&all_absmax))
    } else {
        Absmax::Plain(all_absmax)
    }
}

/// Concatenates slices (in element order, covering the parameter) into whole packed codes.
pub fn assemble_packed(slices: &[SliceQuant]) -> Vec<u8> {
    slices
        .iter()
        .flat_map(|s| s.packed.iter().copied())
        .collect()
}
