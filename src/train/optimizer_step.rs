//! One optimizer step on one rank: the step's micro-batches (forward and backward,
//! `step::forward_backward`), the gradients and statistics reduced over the ranks, the global
//! gradient norm, then either a skip (non-finite loss or norm: no update) or clipping and AdamW.

use super::build::Run;
use super::error::{failed, step_failed, Memory, TrainError};
use super::ranks::{all_reduce_grads, host_sum, square_sums, sum_over_ranks};
use super::step::{forward_backward, MicroStats, KEEP_ATTENTION};
use crate::distributed::store::WATCH;
use crate::util::{mem, phases, phases::timed};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// What one optimizer step did, in global figures (the same on every rank).
pub(crate) struct StepResult {
    /// Mean loss per labelled token.
    pub loss: f64,
    pub grad_norm: f64,
    /// Non-padding tokens of the step.
    pub tokens: usize,
    /// [layer][global expert] tokens routed.
    pub expert_tokens: Vec<Vec<u64>>,
    /// The learning rate applied, or None when the step was skipped.
    pub lr: Option<f64>,
}

impl Run<'_> {
    /// Optimizer step `step` (0-based). `nan_loss` makes it report a non-finite loss, as an
    /// overflow would (fault injection for tests of the skip rule).
    pub fn optimizer_step(
        &mut self,
        step: usize,
        nan_loss: bool,
    ) -> Result<StepResult, TrainError> {
        let (mut grads, mut stats) = self.micro_batches(step)?;
        if self.distributed {
            self.reduce(&mut grads, &mut stats)?;
        }
        if step == self.start_step {
            WATCH.limit(std::time::Duration::from_secs(
                self.config.collective_timeout_s,
            ));
        }
        // The norm's squares are launched before the wait below, so they queue behind the
        // backward still running (after it, the GPU waited 2.9 ms a step for their launches;
        // launch/bench/NOTES.md item 48).
        let squares = timed("gradient norm", &self.device, || {
            Ok::<_, candle_core::Error>((
                square_sums(&grads, &self.replicated)?,
                square_sums(&grads, &self.owned)?,
            ))
        })
        .map_err(failed)?;
        mem::sample_gpu_peak(&self.device);
        let grad_norm = self.global_norm(squares)?;
        if nan_loss {
            stats.loss_sum = f64::NAN;
        }
        let mut result = StepResult {
            loss: stats.loss_sum / stats.labelled.max(1) as f64,
            grad_norm,
            tokens: stats.tokens,
            expert_tokens: stats.expert_tokens,
            lr: None,
        };
        // Skipped: no update; the batch is consumed. Every rank sees the same global numbers,
        // so all skip together.
        if !grad_norm.is_finite() || !stats.loss_sum.is_finite() {
            return Ok(result);
        }
        let lr = self.schedule.lr(step);
        self.update(&grads, grad_norm, lr)?;
        phases::mark_memory("6 optimizer", &self.device);
        if step == self.start_step {
            phases::reset();
        }
        self.tokens_seen += result.tokens as u64;
        result.lr = Some(lr);
        Ok(result)
    }

    /// Forward and backward of the step's micro-batches: gradients accumulated by PEFT name,
    /// the loss normalised by the labelled tokens of the whole step over all ranks.
    fn micro_batches(
        &mut self,
        step: usize,
    ) -> Result<(BTreeMap<String, Tensor>, MicroStats), TrainError> {
        let (gas, world, rank) = (self.gas, self.world, self.rank);
        let batches: Vec<_> = (0..gas).map(|_| self.loader.next_batch()).collect();
        let local_denom: usize = batches.iter().map(|b| b.num_targets()).sum();
        let denom = sum_over_ranks(self.comm.as_ref(), vec![local_denom as f64])?[0] as usize;
        let mut grads = BTreeMap::new();
        let mut stats = MicroStats::default();
        for (micro, batch) in batches.iter().enumerate() {
            let key = Some((
                self.config.seed,
                ((step * gas + micro) * world + rank) as u64,
            ));
            let s = forward_backward(
                &self.model,
                &self.adapters,
                batch,
                denom,
                key,
                self.activations,
                &mut grads,
            )
            .map_err(|e| {
                let memory = Memory {
                    activations: self.activations,
                    attention_kept: KEEP_ATTENTION.get(),
                    micro_batch_size: self.config.micro_batch_size,
                };
                step_failed(e, memory)
            })?;
            WATCH.progress();
            stats.loss_sum += s.loss_sum;
            stats.labelled += s.labelled;
            stats.tokens += s.tokens;
            if stats.expert_tokens.is_empty() {
                stats.expert_tokens = s.expert_tokens;
            } else {
                for (acc, add) in stats.expert_tokens.iter_mut().zip(&s.expert_tokens) {
                    for (a, b) in acc.iter_mut().zip(add) {
                        *a += b;
                    }
                }
            }
        }
        Ok((grads, stats))
    }

    /// Replicated adapters' gradients summed over the ranks; loss, token counts and expert
    /// load made global.
    fn reduce(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        stats: &mut MicroStats,
    ) -> Result<(), TrainError> {
        // An adapter no token reached still takes part (zero gradient), as the whole
        // parameter would in one process.
        for (name, v) in &self.vars {
            if !grads.contains_key(name) {
                grads.insert(name.clone(), v.as_tensor().zeros_like().map_err(failed)?);
            }
        }
        all_reduce_grads(self.comm.as_ref(), grads, &self.replicated).map_err(failed)?;
        // Expert gradients: summed over the ranks holding the same experts, one tensor at a
        // time (the groups' parts differ in size when the experts do not divide evenly).
        if let Some(replicas) = &self.experts.replicas {
            for name in &self.owned {
                let g = replicas.all_reduce_sum(&grads[name]).map_err(failed)?;
                grads.insert(name.clone(), g);
            }
        }
        let mut v = vec![stats.loss_sum, stats.labelled as f64, stats.tokens as f64];
        v.extend(stats.expert_tokens.iter().flatten().map(|&c| c as f64));
        let g = sum_over_ranks(self.comm.as_ref(), v)?;
        stats.loss_sum = g[0];
        stats.labelled = g[1] as usize;
        stats.tokens = g[2] as usize;
        let mut at = 3;
        for row in stats.expert_tokens.iter_mut() {
            for c in row.iter_mut() {
                *c = g[at] as u64;
                at += 1;
            }
        }
        Ok(())
    }

    /// Global gradient norm: replicated gradients (equal on every rank) plus the expert
    /// gradients of every rank of the expert-parallel group (each expert once).
    /// `squares`: `square_sums` of (replicated, owned).
    fn global_norm(&self, squares: (Option<Tensor>, Option<Tensor>)) -> Result<f64, TrainError> {
        let replicated = host_sum(squares.0).map_err(failed)?;
        let owned = host_sum(squares.1).map_err(failed)?;
        let owned = sum_over_ranks(self.experts.group.as_ref(), vec![owned])?[0];
        Ok((replicated + owned).sqrt())
    }

    /// Clips to `max_grad_norm` (0: never) and applies AdamW at `lr`.
    fn update(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        grad_norm: f64,
        lr: f64,
    ) -> Result<(), TrainError> {
        let max = self.config.max_grad_norm;
        let clip = if max > 0.0 && grad_norm > max {
            max / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let mut store = GradStore::default();
        for (name, v) in &self.vars {
            if let Some(g) = grads.get(name) {
                store.insert(v.as_tensor(), g.clone());
            }
        }
        timed("optimizer", &self.device, || {
            self.opt.step_clipped(&store, lr, clip)
        })
        .map_err(failed)
    }
}
