//! The taped forward and the backward of a SwiGLU MLP (dense layers and shared experts), for
//! the decoder layer's written backward (`arch::backward`): separate gate/up/down projections,
//! or gate and up as one fused projection (Granite MoE's shared MLP).

use super::backward::{proj, AdapterGrads, ProjTape};
use super::joint::{gate_up_taped, Tapes};
use super::layers::{MlpProjs, Proj};
use super::model::LoraCtx;
use crate::ops::swiglu::{packed_backward, packed_forward, swiglu, swiglu_backward, Glu};
use candle_core::{Result, Tensor};

/// gate, up, down of a SwiGLU MLP.
pub(super) struct MlpTape {
    gate_up: Tapes,
    g: Tensor,
    u: Tensor,
    down: ProjTape,
}

pub(super) fn swiglu_mlp(p: &[Proj; 3], x: &Tensor, lora: &LoraCtx) -> Result<(Tensor, MlpTape)> {
    let ([g, u], gate_up) = gate_up_taped(p, x, lora)?;
    let (y, down) = proj(&p[2], &swiglu(&g, &u)?, lora)?;
    Ok((
        y,
        MlpTape {
            gate_up,
            g,
            u,
            down,
        },
    ))
}

impl MlpTape {
    pub(super) fn backward(
        self,
        p: &[Proj; 3],
        dy: &Tensor,
        dx_into: Option<Tensor>,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        let dact = self.down.backward(&p[2], dy, None, grads)?;
        let (dg, du) = swiglu_backward(&self.g, &self.u, &dact)?;
        self.gate_up
            .backward(&[&p[0], &p[1]], &[dg, du], dx_into, grads)
    }
}

/// The shared expert's MLP: separate projections, or gate and up fused (with its output gu).
pub(super) enum SharedMlpTape {
    Split(MlpTape),
    Fused {
        gate_up: ProjTape,
        gu: Tensor,
        down: ProjTape,
    },
}

pub(super) fn shared_mlp(
    p: &MlpProjs,
    x: &Tensor,
    lora: &LoraCtx,
) -> Result<(Tensor, SharedMlpTape)> {
    match p {
        MlpProjs::Split(p) => {
            let (y, t) = swiglu_mlp(p, x, lora)?;
            Ok((y, SharedMlpTape::Split(t)))
        }
        MlpProjs::Fused([gate_up, down]) => {
            let (gu, gate_up) = proj(gate_up, x, lora)?;
            let (y, down) = proj(down, &packed_forward(&gu, Glu::Silu)?, lora)?;
            Ok((y, SharedMlpTape::Fused { gate_up, gu, down }))
        }
    }
}

impl SharedMlpTape {
    pub(super) fn backward(
        self,
        p: &MlpProjs,
        dy: &Tensor,
        dx_into: Option<Tensor>,
        grads: &mut AdapterGrads,
    ) -> Result<Tensor> {
        match (self, p) {
            (SharedMlpTape::Split(t), MlpProjs::Split(p)) => t.backward(p, dy, dx_into, grads),
            (SharedMlpTape::Fused { gate_up, gu, down }, MlpProjs::Fused([pg, pd])) => {
                let dact = down.backward(pd, dy, None, grads)?;
                let dgu = packed_backward(&gu, &dact, Glu::Silu)?;
                gate_up.backward(pg, &dgu, dx_into, grads)
            }
            _ => candle_core::bail!("shared MLP: its tape does not match its projections"),
        }
    }
}
