//! Rules that involve more than one key. They run after every key parsed on
//! its own, so the messages can rely on typed values.

use super::fields::{invalid, Fields};
use super::types::{Adapter, LrScheduler};
use super::{ConfigError, TrainConfig};

pub(crate) fn check(
    c: &TrainConfig,
    f: &Fields,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let origin = f.origin();
    let err = |msg: String| Err(invalid(origin, msg));
    let mut warn = |msg: String| warnings.push(format!("{origin}: {msg}"));

    match (c.adapter, c.load_in_4bit) {
        (Adapter::Qlora, false) => {
            return err("adapter 'qlora' needs load_in_4bit: true; set load_in_4bit: true, or use adapter: lora \
                        to train on unquantized weights"
                .into())
        }
        // Only reachable when load_in_4bit was written out: its default follows the adapter.
        (Adapter::Lora, true) => {
            return err("adapter 'lora' trains on unquantized weights, but load_in_4bit is true; use adapter: \
                        qlora, or set load_in_4bit: false"
                .into())
        }
        _ => {}
    }

    if c.expert_parallel_size.is_some_and(|s| s > 1) && !c.expert_parallel {
        return err("key 'expert_parallel_size' spreads the experts over groups of ranks, but expert_parallel is false; \
                    remove one of them"
            .into());
    }

    if c.warmup_steps.is_some() && c.warmup_ratio.is_some() {
        return err("keys 'warmup_steps' and 'warmup_ratio' are both set; keep only one".into());
    }
    let warms_up = c.warmup_steps.is_some_and(|w| w > 0) || c.warmup_ratio.is_some_and(|r| r > 0.0);
    if c.lr_scheduler == LrScheduler::Constant && warms_up {
        warn("lr_scheduler 'constant' ignores warmup, as in transformers; use constant_with_warmup to warm up".into());
    }
    if c.cosine_min_lr_ratio.is_some() && c.lr_scheduler != LrScheduler::Cosine {
        warn(format!(
            "key 'cosine_min_lr_ratio' applies to lr_scheduler cosine only; it has no effect with {}",
            c.lr_scheduler
        ));
    }

    if c.lora_target_modules.is_empty() && c.lora_target_parameters.is_empty() {
        return err("nothing to train: lora_target_modules and lora_target_parameters are both empty; list at \
                    least one module (e.g. q_proj) or expert parameter (e.g. mlp.experts.gate_up_proj)"
            .into());
    }

    if c.eval_steps.is_some() && c.val_set_size.is_zero() {
        return err(
            "key 'eval_steps' needs a validation split, but val_set_size is 0; set val_set_size \
                    (e.g. 0.05) or remove eval_steps"
                .into(),
        );
    }

    if let (Some(w), Some(m)) = (c.warmup_steps, c.max_steps) {
        // A schedule that never leaves warmup is almost always a units mix-up.
        if w > 0 && w >= m {
            return err(format!(
                "key 'warmup_steps' ({w}) must be less than max_steps ({m})"
            ));
        }
    }

    if c.save_total_limit.is_some() && c.save_steps.is_none() {
        warn("key 'save_total_limit' has no effect without save_steps (only the final adapter is saved)".into());
    }
    if let Some(m) = c.max_steps {
        if let Some(e) = c.eval_steps.filter(|&e| e > m) {
            warn(format!(
                "key 'eval_steps' ({e}) is larger than max_steps ({m}), so no evaluation runs during training"
            ));
        }
        if let Some(s) = c.save_steps.filter(|&s| s > m) {
            warn(format!(
                "key 'save_steps' ({s}) is larger than max_steps ({m}), so no checkpoint is saved during training"
            ));
        }
    }
    Ok(())
}
