//! AdamW with fp32 state, as `torch.optim.AdamW` computes it (decoupled weight decay, bias
//! correction): candle's AdamW keeps moments in the parameter's dtype and cannot save its
//! state. Parameters are kept sorted by name, so state and updates are in the same order in
//! every process.
//!
//! Per parameter p with gradient g at step t (1-based):
//!   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
//!   p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)

use crate::ops::adamw::{fused_step, StepScalars};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// `params` are the trainable f32 variables, by name (any order; kept sorted).
    pub fn new(mut params: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                if var.dtype() != DType::F32 {
                    candle_core::bail!(
                        "AdamW: parameter '{name}' is {:?}; trainable weights are kept in f32",
                        var.dtype()
                    );
                }
                // Two buffers: the CUDA update writes the moments in place.
                Ok(Slot {
                    name,
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            slots,
            step: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone, as
    /// PyTorch does; their moments do not advance.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_clipped(grads, lr, 1.0)
    }

    /// `step` with every gradient scaled by `clip` first (gradient clipping; 1: unscaled). On
    /// CUDA each parameter's update is one kernel (`ops::adamw`), equal bit for bit to these
    /// tensor ops.
    pub fn step_clipped(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let s = StepScalars {
            clip: (clip < 1.0).then_some(clip),
            beta1: c.beta1,
            beta2: c.beta2,
            decay: 1.0 - lr * c.weight_decay,
            inv_sqrt_bias2: 1.0 / (1.0 - c.beta2.powi(t)).sqrt(),
            eps: c.eps,
            step_size: lr / (1.0 - c.beta1.powi(t)),
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            if fused_step(slot.var.as_tensor(), g, &slot.m, &slot.v, &s)? {
                continue;
            }
            let mut g = g.to_dtype(DType::F32)?;
            if let Some(k) = s.clip {
                g = (g * k)?;
            }
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (slot.var.as_tensor() * s.decay)?;
            let denom = ((slot.v.sqrt()? * s.inv_sqrt_bias2)? + c.eps)?;
            let update = ((&slot.m / denom)? * s.step_size)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// The fp32 moments by `{name}.exp_avg` / `{name}.exp_avg_sq` (PyTorch's names), sorted.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.m.clone()),
                    (format!("{}.exp_avg_sq", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by `state` and the step count.
    pub fn load_state(
        &mut self,
        step: usize,
        state: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for slot in &mut self.slots {
            for (suffix, dst) in [("exp_avg", &mut slot.m), ("exp_avg_sq", &mut slot.v)] {
                let key = format!("{}.{suffix}", slot.name);
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks '{key}'"))
                })?;
                if t.dims() != dst.dims() {
                    candle_core::bail!(
                        "optimizer state '{key}' has shape {:?}, parameter has {:?}",
                        t.dims(),
                        dst.dims()
                    );
                }
                // An own buffer: the CUDA update writes the moments in place.
                *dst = t.to_dtype(DType::F32)?.to_device(dst.device())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}
