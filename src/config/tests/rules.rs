//! Cross-field rules and unsupported axolotl features, with exact messages.

use super::*;

#[test]
fn qlora_without_4bit() {
    assert_eq!(
        err_with("load_in_4bit: false\n"),
        "t.yaml: adapter 'qlora' needs load_in_4bit: true; set load_in_4bit: true, or use adapter: lora to train \
         on unquantized weights"
    );
}

#[test]
fn lora_with_4bit() {
    assert_eq!(
        err_with("adapter: lora\nload_in_4bit: true\n"),
        "t.yaml: adapter 'lora' trains on unquantized weights, but load_in_4bit is true; use adapter: qlora, or \
         set load_in_4bit: false"
    );
}

#[test]
fn expert_parallel_size_needs_expert_parallel() {
    assert_eq!(
        err_with("expert_parallel: false\nexpert_parallel_size: 2\n"),
        "t.yaml: key 'expert_parallel_size' spreads the experts over groups of ranks, but expert_parallel is \
         false; remove one of them"
    );
    assert_eq!(
        err_with("expert_parallel_size: 0\n"),
        "t.yaml: key 'expert_parallel_size' must be at least 1, got 0"
    );
}

#[test]
fn warmup_conflict() {
    assert_eq!(
        err_with("warmup_steps: 10\nwarmup_ratio: 0.1\n"),
        "t.yaml: keys 'warmup_steps' and 'warmup_ratio' are both set; keep only one"
    );
}

#[test]
fn warmup_longer_than_run() {
    assert_eq!(
        err_with("warmup_steps: 300\nmax_steps: 300\n"),
        "t.yaml: key 'warmup_steps' (300) must be less than max_steps (300)"
    );
}

#[test]
fn fp16_true() {
    assert_eq!(
        err_with("fp16: true\n"),
        "t.yaml: key 'fp16' must be false: moeq trains in bf16 or f32 (use bf16: true, false or auto)"
    );
}

#[test]
fn deepspeed_present() {
    assert_eq!(
        err_with("deepspeed: deepspeed_configs/zero2.json\n"),
        "t.yaml: key 'deepspeed' is not supported: moeq does its own distribution; remove 'deepspeed' and launch \
         with moeq-launch"
    );
}

#[test]
fn fsdp_present() {
    assert_eq!(
        err_with("fsdp: [full_shard, auto_wrap]\n"),
        "t.yaml: key 'fsdp' is not supported: moeq does its own distribution; remove 'fsdp' and launch with \
         moeq-launch"
    );
}

#[test]
fn load_in_8bit_true() {
    assert_eq!(
        err_with("load_in_8bit: true\n"),
        "t.yaml: key 'load_in_8bit' is not supported: moeq quantizes to 4 bits only; use load_in_4bit: true"
    );
}

#[test]
fn nothing_to_train() {
    assert_eq!(
        err_with("lora_target_modules: []\n"),
        "t.yaml: nothing to train: lora_target_modules and lora_target_parameters are both empty; list at least \
         one module (e.g. q_proj) or expert parameter (e.g. mlp.experts.gate_up_proj)"
    );
}

#[test]
fn all_linear_mixed_with_names() {
    assert_eq!(
        err_with("lora_target_modules: [all-linear, q_proj]\n"),
        "t.yaml: key 'lora_target_modules' cannot combine all-linear with other module names"
    );
}

#[test]
fn eval_steps_without_validation_split() {
    assert_eq!(
        err_with("eval_steps: 50\n"),
        "t.yaml: key 'eval_steps' needs a validation split, but val_set_size is 0; set val_set_size (e.g. 0.05) \
         or remove eval_steps"
    );
}
