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

    /// The moments by PyTorch's names, sorted: `{name}.exp_avg` / `{name}.exp_avg_sq` (f32),
    /// or for 8-bit moments each as `.q8` (u8 codes) and `.absmax` (f32 per 256-element block).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            match &s.moments {
                Moments::F32 { m, v } => {
                    out.push((format!("{}.exp_avg", s.name), m.clone()));
                    out.push((format!("{}.exp_avg_sq", s.name), v.clone()));
                }
                Moments::Q8(q) => {
                    for (suffix, t) in [
                        ("exp_avg.q8", &q.m_codes),
                        ("exp_avg.absmax", &q.m_absmax),
                        ("exp_avg_sq.q8", &q.v_codes),
                        ("exp_avg_sq.absmax", &q.v_absmax),
                    ] {
                        out.push((format!("{}.{suffix}", s.name), t.clone()));
                    }
                }
            }
        }
        out
    }

    /// Restores moments saved by `state` (of an optimizer with the same 8-bit setting) and
    /// the step count.
    pub fn load_state(
        &mut self,
        step: usize,
        state: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for slot in &mut self.slots {
            let dsts: Vec<(&str, &mut Tensor)> = match &mut slot.moments {
                Moments::F32 { m, v } => vec![("exp_avg", m), ("exp_avg_sq", v)],
                Moments::Q8(q) => vec![
                    ("exp_avg.q8", &mut q.m_codes),
                    ("exp_avg.absmax", &mut q.m_absmax),
                    ("exp_avg_sq.q8", &mut q.v_codes),
                    ("exp_avg_sq.absmax", &mut q.v_absmax),
                ],
            };
            for (suffix, dst) in dsts {
                let key = format!("{}.{suffix}", slot.name);
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "optimizer state lacks '{key}' (written by the other AdamW? 8-bit and fp32 moments do not mix: keep the checkpoint's optimizer)"
                    ))
                })?;
                let want = dst.dtype();
                let t = if want == DType::F32 {
                    t.to_dtype(DType::F32)?
                } else {
                    t.clone()
                };
                if t.dims() != dst.dims() || t.dtype() != want {
                    candle_core::bail!(
                        "optimizer state '{key}' is {:?} {:?}, this optimizer keeps {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        want,
                        dst.dims()
                    );
                }
                // An own buffer: the CUDA update writes the moments in place.
                *dst = t.to_device(dst.device())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}
