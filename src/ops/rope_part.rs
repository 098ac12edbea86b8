//! The rotary embedding of part of each head: x `[N, heads, hd]`, the `dim` dims from `at`
//! turned by cos/sin `[N, 1, dim]`, the others passed through. GLM-4.5 turns the first half of
//! each head (`partial_rotary_factor` 0.5), latent attention the `qk_rope_head_dim` part. With
//! `interleaved` (DeepSeek) the rotated pairs are adjacent dims `(2i, 2i + 1)` and the part comes
//! out as its rotated even dims then its rotated odd dims, as transformers'
//! `apply_rotary_pos_emb_interleave` writes it: the part is reordered evens-then-odds, which
//! makes the pairs `(i, i + dim/2)`, and turned by the ordinary rotation (`ops::rope`).
//! Built from candle's ops and `apply_rope`, so the same function serves a pass with a graph
//! and one without; [`rope_part_backward`] is its transpose for a hand-written backward.

use super::rope::{apply_rope, rope_forward};
use candle_core::{Result, Tensor};

/// Which dims of a head turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub at: usize,
    pub dim: usize,
    pub interleaved: bool,
}

/// The evens-then-odds order of `dim` dims, or (`inverse`) its inverse.
fn order(dim: usize, inverse: bool, dev: &candle_core::Device) -> Result<Tensor> {
    let half = dim / 2;
    let idx: Vec<u32> = (0..dim)
        .map(|i| match inverse {
            false if i < half => 2 * i,
            false => 2 * (i - half) + 1,
            true if i % 2 == 0 => i / 2,
            true => half + i / 2,
        } as u32)
        .collect();
    Tensor::new(idx, dev)
}

/// x with its part replaced by `f(part)`.
fn around(x: &Tensor, p: Part, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let hd = x.dim(2)?;
    if p.dim == 0 || p.dim % 2 != 0 || p.at + p.dim > hd {
        candle_core::bail!("rope: dims {}..{} of heads of {hd}", p.at, p.at + p.dim);
    }
    let mid = f(&x.narrow(2, p.at, p.dim)?)?;
    let mut pieces = Vec::with_capacity(3);
    if p.at > 0 {
        pieces.push(x.narrow(2, 0, p.at)?);
    }
    pieces.push(mid);
    if p.at + p.dim < hd {
        pieces.push(x.narrow(2, p.at + p.dim, hd - p.at - p.dim)?);
    }
    match pieces.len() {
        1 => Ok(pieces.remove(0)),
        _ => Tensor::cat(&pieces, 2),
    }
}

/// x `[N, heads, hd]` with dims `p.at .. p.at + p.dim` rotated by cos/sin `[N, 1, p.dim]`.
pub fn rope_part(x: &Tensor, cos: &Tensor, sin: &Tensor, p: Part) -> Result<Tensor> {
    around(x, p, |mid| {
        let mid = match p.interleaved {
            true => mid
                .contiguous()?
                .index_select(&order(p.dim, false, x.device())?, 2)?,
            false => mid.contiguous()?,
        };
        apply_rope(&mid, cos, sin)
    })
}

/// The transpose of [`rope_part`] for upstream `dy` (no graph).
pub(crate) fn rope_part_backward(
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    p: Part,
) -> Result<Tensor> {
    let table = |t: &Tensor| super::at_offset_zero(&t.to_dtype(dy.dtype())?);
    let (cos, sin) = (table(cos)?, table(sin)?);
    around(dy, p, |mid| {
        let d = rope_forward(&mid.contiguous()?, &cos, &sin, true)?;
        match p.interleaved {
            true => d.index_select(&order(p.dim, true, dy.device())?, 2),
            false => Ok(d),
        }
    })
}
