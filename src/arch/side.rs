//! The two sides of a decoder layer (attention, MLP): where each one's norm sits and how its
//! output joins the residual stream (docs/ARCHITECTURE.md, decision 31).

use super::layers::Layer;
use super::ArchSpec;
use crate::ops::add::add;
use crate::ops::norm::rms_norm;
use candle_core::{Result, Tensor};

/// One side of a decoder layer (attention or MLP) and its norm: the usual pre-norm `x +
/// block(norm(x))·s`, or OLMo-2's post-norm `x + norm(block(x))·s` (`ArchSpec::post_norms`),
/// with s Granite's `residual_multiplier` (1 elsewhere).
pub(super) struct Side<'a> {
    pub norm: &'a Tensor,
    pub post: bool,
    pub eps: f64,
    pub scale: f64,
}

impl Side<'_> {
    /// What the block reads of the residual stream x.
    pub(super) fn input(&self, x: &Tensor) -> Result<Tensor> {
        match self.post {
            false => rms_norm(x, self.norm, self.eps),
            true => Ok(x.clone()),
        }
    }

    /// The residual stream after the block's output y joins x.
    pub(super) fn join(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let y = match self.post {
            false => y.clone(),
            true => rms_norm(y, self.norm, self.eps)?,
        };
        add(x, &self.scaled(&y)?)
    }

    fn scaled(&self, t: &Tensor) -> Result<Tensor> {
        match self.scale {
            1.0 => Ok(t.clone()),
            s => t.affine(s, 0.0),
        }
    }

    /// The tensor the side's norm reads: x before the block, y after it.
    pub(super) fn normed<'t>(&self, x: &'t Tensor, y: &'t Tensor) -> &'t Tensor {
        if self.post {
            y
        } else {
            x
        }
    }

    /// d(block output) for g = d(joined stream); `normed` as [`Side::normed`] kept it.
    pub(super) fn output_grad(&self, normed: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g = self.scaled(g)?;
        match self.post {
            false => Ok(g),
            true => super::backward::norm_backward(normed, self.norm, &g, self.eps),
        }
    }

    /// d(x) for g = d(joined stream) and dh = d(block input).
    pub(super) fn input_grad(&self, normed: &Tensor, g: &Tensor, dh: &Tensor) -> Result<Tensor> {
        match self.post {
            false => super::backward::norm_backward_plus(normed, self.norm, dh, g, self.eps),
            true => add(g, dh),
        }
    }
}

impl Layer {
    /// The attention side and the MLP side.
    pub(super) fn sides(&self, spec: &ArchSpec) -> [Side<'_>; 2] {
        let side = |norm| Side {
            norm,
            post: spec.post_norms,
            eps: spec.rms_norm_eps,
            scale: spec.mup.residual,
        };
        [side(&self.attn_norm), side(&self.mlp_norm)]
    }
}
