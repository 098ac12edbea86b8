//! Learning-rate schedules as transformers' `get_scheduler` computes them (what axolotl's
//! `lr_scheduler` selects): the multiplier for optimizer step `k` (0-based) is `λ(k)`, so with
//! warmup the first update uses a learning rate of 0. `constant` ignores warmup (transformers'
//! `get_constant_schedule`); `cosine` with a minimum ratio `m` is axolotl's
//! `get_cosine_schedule_with_min_lr`: `m + (1 − m)·½(1 + cos(π·progress))` after warmup.

use crate::config::LrScheduler;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// The fraction of `peak_lr` the cosine schedule ends at (0: decays to 0).
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The multiplier λ(step) applied to `peak_lr`.
    pub fn factor(&self, step: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if self.kind == LrScheduler::Constant {
            return 1.0;
        }
        if step < w {
            return step as f64 / w.max(1) as f64;
        }
        match self.kind {
            LrScheduler::Constant | LrScheduler::ConstantWithWarmup => 1.0,
            LrScheduler::Linear => {
                (t.saturating_sub(step) as f64 / t.saturating_sub(w).max(1) as f64).max(0.0)
            }
            LrScheduler::Cosine => {
                let progress = (step - w) as f64 / t.saturating_sub(w).max(1) as f64;
                let cosine = (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0);
                let m = self.min_lr_ratio;
                (1.0 - m) * cosine + m
            }
        }
    }

    pub fn lr(&self, step: usize) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: LrScheduler) -> Schedule {
        Schedule {
            kind,
            peak_lr: 2e-4,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.0,
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        for kind in [
            LrScheduler::ConstantWithWarmup,
            LrScheduler::Linear,
            LrScheduler::Cosine,
        ] {
            assert_eq!(s(kind).factor(0), 0.0);
            assert_eq!(s(kind).factor(5), 0.5);
            assert_eq!(s(kind).factor(10), 1.0);
        }
    }

    #[test]
    fn decays_like_hugging_face() {
        // Values of transformers' lr_lambda for warmup 10, total 110.
        assert_eq!(s(LrScheduler::ConstantWithWarmup).factor(100), 1.0);
        // transformers' `constant` has no warmup at all.
        for step in [0, 5, 10, 100] {
            assert_eq!(s(LrScheduler::Constant).factor(step), 1.0);
        }
        assert!((s(LrScheduler::Linear).factor(60) - 0.5).abs() < 1e-12);
        assert_eq!(s(LrScheduler::Linear).factor(110), 0.0);
        assert!((s(LrScheduler::Cosine).factor(60) - 0.5).abs() < 1e-12);
        assert!(
            (s(LrScheduler::Cosine).factor(35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos()))
                .abs()
                < 1e-12
        );
        assert!(s(LrScheduler::Cosine).factor(110).abs() < 1e-12);
        assert!((s(LrScheduler::Cosine).lr(60) - 1e-4).abs() < 1e-18);
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        let sched = Schedule {
            kind: LrScheduler::Cosine,
            peak_lr: 1.0,
            warmup_steps: 0,
            total_steps: 4,
            min_lr_ratio: 0.0,
        };
        assert_eq!(sched.factor(0), 1.0);
    }

    /// axolotl's `get_cosine_schedule_with_min_lr`: the cosine between 1 and the ratio.
    #[test]
    fn cosine_decays_to_the_minimum_ratio() {
        let sched = Schedule {
            min_lr_ratio: 0.1,
            ..s(LrScheduler::Cosine)
        };
        assert_eq!(sched.factor(5), 0.5); // warmup unchanged
        assert!((sched.factor(10) - 1.0).abs() < 1e-12);
        assert!((sched.factor(60) - 0.55).abs() < 1e-12); // 0.9 · 0.5 + 0.1
        assert!((sched.factor(110) - 0.1).abs() < 1e-12);
        let progress = 0.25;
        let want = 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) + 0.1;
        assert!((sched.factor(35) - want).abs() < 1e-12);
    }
}
