//! AdamW with fp32 state, as `torch.optim.AdamW` computes it (decoupled weight decay, bias
//! correction): candle's AdamW keeps moments in the parameter's dtype and cannot save its
//! state. Parameters are kept sorted by name, so state and updates are in the same order in
//! every process. With `eight_bit` the moments of parameters of at least
//! `adamw8::MIN_8BIT_SIZE` elements are kept in 8 bits, blockwise (`train::adamw8`).
//!
//! Per parameter p with gradient g at step t (1-based):
//!   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
//!   p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)

use super::adamw8::{Maps, Moments8, MIN_8BIT_SIZE};
use crate::ops::adamw::{fused_step, StepScalars};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 8-bit blockwise moments (bitsandbytes' 8-bit Adam scheme).
    pub eight_bit: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            eight_bit: false,
        }
    }
}

/// One parameter's moments.
enum Moments {
    F32 { m: Tensor, v: Tensor },
    Q8(Moments8),
}

struct Slot {
    name: String,
    var: Var,
    moments: Moments,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
    /// The 8-bit code maps, when some moments are 8-bit.
    maps: Option<Maps>,
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
                let n = var.elem_count();
                let moments = if config.eight_bit && n >= MIN_8BIT_SIZE {
                    Moments::Q8(Moments8::zeros(n, var.device())?)
                } else {
                    // Two buffers: the CUDA update writes the moments in place.
                    Moments::F32 {
                        m: var.as_tensor().zeros_like()?,
                        v: var.as_tensor().zeros_like()?,
                    }
                };
                Ok(Slot { name, var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        let maps = match slots.iter().find(|s| matches!(s.moments, Moments::Q8(_))) {
            Some(s) => Some(Maps::new(s.var.device())?),
            None => None,
        };
        Ok(AdamW {
            config,
            slots,
            step: 0,
            maps,
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
            let (m, v) = match &mut slot.moments {
                Moments::F32 { m, v } => (m, v),
                Moments::Q8(q) => {
                    let maps = self.maps.as_ref().ok_or_else(|| {
                        candle_core::Error::Msg("AdamW: 8-bit moments without their maps".into())
                    })?;
                    q.update(&slot.var, g, &s, maps)?;
                    continue;
                }
            };
            if fused_step(slot.var.as_tensor(), g, m, v, &s)? {
                continue;
            }
            let mut g = g.to_dtype(DType::F32)?;
            if let Some(k) = s.clip {
                g = (g * k)?;
            }
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (slot.var.as_tensor() * s.decay)?;
            let denom = ((v.sqrt()? * s.inv_sqrt_bias2)? + c.eps)?;
            let update = ((&*m / denom)? * s.step_size)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state held (moments; 8-bit codes and block absmax where 8-bit).
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match &s.moments {
                Moments::F32 { m, v } => 4 * (m.elem_count() + v.elem_count()),
                Moments::Q8(q) => q.bytes(),
            })
            .sum()
    }

    /// The moments by PyTorch's names, sorted: `{name}.exp_avg` / `{name}.exp_avg_sq`, f32 in
    /// the parameter's shape — 8-bit moments as the values their codes stand for, so a
    /// checkpoint is the same for either optimizer and expert parts can be cut and joined.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::F32 { m, v } => (m.clone(), v.clone()),
                Moments::Q8(q) => {
                    let (m, v) = q.dequantized(self.maps()?)?;
                    (m.reshape(s.var.shape())?, v.reshape(s.var.shape())?)
                }
            };
            out.push((format!("{}.exp_avg", s.name), m));
            out.push((format!("{}.exp_avg_sq", s.name), v));
        }
        Ok(out)
    }

    fn maps(&self) -> Result<&Maps> {
        self.maps.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("AdamW: 8-bit moments without their maps".into())
        })
    }

    /// Restores moments saved by `state` and the step count; 8-bit moments are quantized from
    /// them (exactly what they were, when `state` came from 8-bit moments of the same
    /// parameter).
    pub fn load_state(
        &mut self,
        step: usize,
        state: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let maps = self.maps.as_ref();
        for slot in &mut self.slots {
            let mut got = Vec::new();
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{}.{suffix}", slot.name);
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks '{key}'"))
                })?;
                if t.dims() != slot.var.dims() {
                    candle_core::bail!(
                        "optimizer state '{key}' is {:?}, the parameter {:?}",
                        t.dims(),
                        slot.var.dims()
                    );
                }
                got.push(t.to_dtype(DType::F32)?);
            }
            let device = slot.var.device().clone();
            match &mut slot.moments {
                Moments::F32 { m, v } => {
                    // Own buffers: the CUDA update writes the moments in place.
                    *m = got[0].to_device(&device)?.copy()?;
                    *v = got[1].to_device(&device)?.copy()?;
                }
                Moments::Q8(q) => {
                    let maps = maps.ok_or_else(|| {
                        candle_core::Error::Msg("AdamW: 8-bit moments without their maps".into())
                    })?;
                    *q = Moments8::quantized(&got[0], &got[1], maps, &device)?;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}
