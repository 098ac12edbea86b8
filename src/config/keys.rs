//! The key tables. They are public so the README's key reference can be
//! generated from (or checked against) the same lists the parser enforces.

/// Every top-level key moeq acts on, with a one-line summary (default in
/// parentheses). A key missing here is rejected as unknown by the parser.
pub const SUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "base_model",
        "model directory or synth://<arch>/<preset>?seed=N[&layers=L][&layout=hub|fused][&init=disk|device] (required)",
    ),
    (
        "tokenizer_config",
        "tokenizer directory or tokenizer.json (default: from base_model)",
    ),
    (
        "dataset_prepared_path",
        "folder for the tokenized samples: preprocess and train write them, train reuses them while the datasets, tokenizer and data settings are unchanged (none: tokenize on every run)",
    ),
    (
        "model_config",
        "overrides of the base model's config.json (rope, norm epsilon, top-k, ...): settings that keep the weights' shapes and that moeq reads; others are refused with the reason",
    ),
    ("device", "auto | cpu | cuda | cuda:N (auto)"),
    (
        "load_in_4bit",
        "quantize the frozen base weights to 4 bits (true for qlora, false for lora)",
    ),
    ("bnb_4bit_quant_type", "nf4 | fp4 (nf4)"),
    (
        "strict_weights",
        "stop before training when a frozen weight holds NaN or Inf (false: a warning naming each)",
    ),
    (
        "bnb_4bit_use_double_quant",
        "quantize the block scales too (true)",
    ),
    (
        "bnb_4bit_compute_dtype",
        "bfloat16 | float16 | float32 (follows bf16)",
    ),
    (
        "quant_blocksize",
        "weights per quantization block: 32..4096, a power of two (64)",
    ),
    ("adapter", "qlora | lora (qlora)"),
    (
        "quantize_moe_experts",
        "true: the experts are quantized with the rest of the frozen base, as moeq always does; false is refused",
    ),
    (
        "bnb_config_kwargs",
        "bitsandbytes settings as a mapping: bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype act as the top-level keys (which must agree); llm_int8_has_fp16_weight and bnb_4bit_quant_storage do not change 4-bit values",
    ),
    ("lora_r", "LoRA rank, >= 1 (16)"),
    ("lora_alpha", "LoRA scale numerator, > 0 (2 * lora_r)"),
    ("lora_dropout", "dropout on the LoRA input, in [0, 1) (0.0)"),
    (
        "lora_target_modules",
        "linear layers to adapt: a list, one name, or all-linear (q_proj, k_proj, v_proj, o_proj)",
    ),
    (
        "lora_target_linear",
        "true is the same as lora_target_modules: all-linear (false)",
    ),
    (
        "lora_target_parameters",
        "fused expert weights to adapt, e.g. mlp.experts.gate_up_proj (none)",
    ),
    (
        "lora_model_dir",
        "a LoRA adapter directory (moeq's or PEFT's) to continue training from, with a fresh optimizer; its r, alpha and targets must be the config's (none: new adapters)",
    ),
    (
        "peft_use_rslora",
        "scale by alpha / sqrt(r) instead of alpha / r (false)",
    ),
    ("datasets", "list of {path, type, ...} entries (required)"),
    (
        "chat_template",
        "default chat template for chat_template datasets (the tokenizer's)",
    ),
    (
        "val_set_size",
        "held-out fraction in [0, 1) or record count >= 1 (0)",
    ),
    ("sequence_len", "tokens per sequence, >= 16 (2048)"),
    (
        "sample_packing",
        "pack several samples into one sequence (false)",
    ),
    (
        "pad_to_sequence_len",
        "pad every batch to sequence_len (false)",
    ),
    ("train_on_inputs", "also train on prompt tokens (false)"),
    (
        "eot_tokens",
        "chat templates: the end-of-turn token texts; a turn ends with one of these (trained per train_on_eos) instead of any special token; each must be one token of the tokenizer (none: any special token)",
    ),
    (
        "skip_bad_samples",
        "skip records that fail to parse or tokenize instead of stopping (false)",
    ),
    (
        "max_consecutive_skipped_steps",
        "stop after this many consecutive steps skipped for a non-finite loss or gradient, >= 1 (10)",
    ),
    (
        "micro_batch_size",
        "sequences per device per step, >= 1 (1)",
    ),
    (
        "gradient_accumulation_steps",
        "micro-batches per optimizer step, >= 1 (1)",
    ),
    (
        "num_epochs",
        "passes over the data, > 0 (1); max_steps takes precedence",
    ),
    ("max_steps", "optimizer steps, >= 1 (from num_epochs)"),
    ("learning_rate", "peak learning rate, in (0, 1] (2e-4)"),
    (
        "lr_scheduler",
        "constant | constant_with_warmup | linear | cosine (cosine); constant ignores warmup, as in transformers",
    ),
    (
        "cosine_min_lr_ratio",
        "with cosine: decay to this fraction of learning_rate instead of 0, in [0, 1] (0)",
    ),
    (
        "warmup_steps",
        "linear warmup steps, >= 0 (0); a fraction in (0, 1) is a ratio of all steps, as in transformers; exclusive with warmup_ratio",
    ),
    (
        "warmup_ratio",
        "warmup as a fraction of all steps, in [0, 1); exclusive with warmup_steps",
    ),
    (
        "optimizer",
        "adamw_torch | adamw_torch_fused | adamw: AdamW with fp32 moments (adamw_torch); adamw_bnb_8bit | paged_adamw_8bit | adamw_8bit | adamw_torch_8bit: AdamW with 8-bit blockwise moments (bitsandbytes' scheme; parameters under 4,096 elements keep fp32)",
    ),
    ("weight_decay", "decoupled weight decay, >= 0 (0.0)"),
    ("adam_beta1", "in [0, 1) (0.9)"),
    ("adam_beta2", "in [0, 1) (0.999)"),
    ("adam_epsilon", "> 0 (1e-8)"),
    (
        "max_grad_norm",
        "gradient clipping norm, >= 0, 0 disables (1.0)",
    ),
    ("bf16", "true | false | auto (auto)"),
    ("fp16", "must be false: moeq trains in bf16 or f32"),
    (
        "gradient_checkpointing",
        "true | false | offload: recompute each layer in the backward (true); offload also parks the saved layer inputs in host memory",
    ),
    (
        "activation_offloading",
        "true | false | legacy: park the recompute's saved layer inputs (and attention outputs, where kept) in page-locked host memory (false)",
    ),
    (
        "recompute_attention",
        "true | false: with gradient_checkpointing, run each layer's attention again in the recompute (true: least memory) or keep its output for the backward, with the experts' recompute and backward by chunks where they have no adapters (false: about 4.5% faster, one attention output a layer more memory)",
    ),
    (
        "full_determinism",
        "true | false: bit-identical reruns and resumes (true); false lets attention's backward on the GPU add its query gradient atomically (faster, less memory; reruns differ in the last bits)",
    ),
    (
        "output_dir",
        "where checkpoints and the adapter go (./outputs/moeq)",
    ),
    (
        "save_steps",
        "checkpoint every N steps, >= 1 (only at the end)",
    ),
    ("save_total_limit", "keep at most N checkpoints, >= 1 (all)"),
    ("logging_steps", "log every N steps, >= 1 (1)"),
    (
        "eval_steps",
        "evaluate every N steps, >= 1; needs val_set_size (never)",
    ),
    ("seed", "seed for data order, dropout and init, >= 0 (42)"),
    (
        "resume_from_checkpoint",
        "auto or a checkpoint directory (start fresh)",
    ),
    (
        "expert_parallel",
        "shard experts across ranks when launched on several GPUs (true)",
    ),
    (
        "expert_parallel_size",
        "ranks per expert-parallel group, dividing the number of ranks: each group holds every expert once, spread over its ranks, and the groups are replicas whose expert gradients are summed (all ranks)",
    ),
    (
        "collective_timeout_s",
        "seconds before a stuck collective aborts, >= 1 (120)",
    ),
];

/// Keys of one `datasets:` entry.
pub const DATASET_KEYS: &[(&str, &str)] = &[
    (
        "path",
        "data file, directory or synth://<task>?n=N (required)",
    ),
    (
        "type",
        "completion | alpaca | chat_template | input_output | pretokenized (default: pretokenized — records of `input_ids`, optional `labels` and `attention_mask`)",
    ),
    ("split", "split to read from a directory dataset (train)"),
    ("field", "text field for completion records (text)"),
    (
        "field_messages",
        "message-list field for chat_template records (messages)",
    ),
    (
        "message_property_mappings",
        "map moeq's role/content names to the record's",
    ),
    (
        "field_thinking",
        "message field holding a reasoning trace, for chat_template records (reasoning_content)",
    ),
    (
        "template_thinking_key",
        "the name the chat template reads that trace under (reasoning_content; gpt-oss: thinking)",
    ),
    (
        "roles_to_train",
        "roles whose tokens count towards the loss (assistant)",
    ),
    ("train_on_eos", "all | turn | last | none (turn)"),
    (
        "chat_template",
        "chat template for this dataset (the top-level chat_template)",
    ),
    ("name", "dataset configuration name"),
    ("data_files", "files to read inside path, one or a list"),
];

/// axolotl keys moeq accepts so existing configs load, but does not act on:
/// each present (non-null) one produces one warning with this reason.
pub const IGNORED_AXOLOTL_KEYS: &[(&str, &str)] = &[
    ("strict", "moeq always checks every key"),
    ("flash_attention", "moeq picks its attention kernel itself"),
    ("sdp_attention", "moeq picks its attention kernel itself"),
    (
        "xformers_attention",
        "moeq picks its attention kernel itself",
    ),
    ("eager_attention", "moeq picks its attention kernel itself"),
    ("tf32", "moeq picks matmul precision itself"),
    ("group_by_length", "moeq batches in dataset order"),
    ("wandb_project", "moeq has no Weights & Biases integration"),
    ("wandb_entity", "moeq has no Weights & Biases integration"),
    ("wandb_name", "moeq has no Weights & Biases integration"),
    ("wandb_watch", "moeq has no Weights & Biases integration"),
    (
        "wandb_log_model",
        "moeq has no Weights & Biases integration",
    ),
    ("wandb_run_id", "moeq has no Weights & Biases integration"),
    ("wandb_mode", "moeq has no Weights & Biases integration"),
    ("use_tensorboard", "metrics go to the log"),
    (
        "hub_model_id",
        "moeq does not upload to the Hugging Face Hub",
    ),
    (
        "hub_strategy",
        "moeq does not upload to the Hugging Face Hub",
    ),
    (
        "hf_use_auth_token",
        "moeq loads local model directories only",
    ),
    (
        "special_tokens",
        "moeq uses the tokenizer's special tokens as shipped",
    ),
    ("dataset_processes", "moeq tokenizes in-process"),
    ("early_stopping_patience", "moeq has no early stopping"),
    (
        "auto_resume_from_checkpoints",
        "use resume_from_checkpoint: auto",
    ),
    ("local_rank", "moeq-launch assigns ranks"),
    ("ddp_timeout", "use collective_timeout_s"),
    ("logging_dir", "moeq logs to stderr and output_dir"),
    ("debug", "set RUST_LOG=debug instead"),
    ("evals_per_epoch", "use eval_steps"),
    ("saves_per_epoch", "use save_steps"),
    (
        "eval_table_size",
        "moeq does not generate samples during evaluation",
    ),
    (
        "eval_max_new_tokens",
        "moeq does not generate samples during evaluation",
    ),
    ("eval_sample_packing", "evaluation packs like training"),
    ("sample_packing_eff_est", "moeq packs exactly"),
    ("model_type", "moeq reads it from the model directory"),
    ("tokenizer_type", "moeq reads it from the model directory"),
    ("trust_remote_code", "moeq runs no Python model code"),
    (
        "is_llama_derived_model",
        "moeq reads the architecture from config.json",
    ),
    (
        "is_mistral_derived_model",
        "moeq reads the architecture from config.json",
    ),
    (
        "is_qwen_derived_model",
        "moeq reads the architecture from config.json",
    ),
    (
        "is_falcon_derived_model",
        "moeq reads the architecture from config.json",
    ),
    (
        "gradient_checkpointing_kwargs",
        "moeq always recomputes per layer",
    ),
    ("torch_compile", "moeq does not use PyTorch"),
    ("dataloader_num_workers", "moeq's data loader is in-process"),
    ("dataloader_pin_memory", "moeq's data loader is in-process"),
    (
        "dataloader_prefetch_factor",
        "moeq's data loader is in-process",
    ),
    ("low_cpu_mem_usage", "moeq streams weights from disk"),
    ("save_safetensors", "moeq always saves safetensors"),
    ("plugins", "moeq has no plugin system"),
    ("liger_rope", "moeq uses its own fused kernels"),
    ("liger_rms_norm", "moeq uses its own fused kernels"),
    ("liger_glu_activation", "moeq uses its own fused kernels"),
    ("liger_layer_norm", "moeq uses its own fused kernels"),
    (
        "liger_fused_linear_cross_entropy",
        "moeq uses its own fused kernels",
    ),
    (
        "loss_watchdog_threshold",
        "moeq stops on non-finite loss only",
    ),
    (
        "loss_watchdog_patience",
        "moeq stops on non-finite loss only",
    ),
    ("save_strategy", "use save_steps"),
    ("eval_strategy", "use eval_steps"),
    ("evaluation_strategy", "use eval_steps"),
    ("eval_causal_lm_metrics", "moeq reports eval loss only"),
    // Kernel and implementation choices: moeq runs its own kernels, the same arithmetic.
    (
        "attn_implementation",
        "moeq picks its attention kernel itself",
    ),
    (
        "fused_attn_kernel",
        "moeq picks its attention kernel itself",
    ),
    (
        "gemma4_hybrid_attn_impl",
        "moeq picks its attention kernel itself",
    ),
    ("flex_attn_compile_kwargs", "moeq does not use PyTorch"),
    ("use_kernels", "moeq uses its own kernels"),
    (
        "lora_mlp_kernel",
        "moeq fuses each projection with its adapter itself",
    ),
    (
        "lora_qkv_kernel",
        "moeq fuses each projection with its adapter itself",
    ),
    (
        "lora_o_kernel",
        "moeq fuses each projection with its adapter itself",
    ),
    (
        "use_scattermoe",
        "moeq runs the experts as grouped GEMMs over tokens sorted by expert",
    ),
    (
        "use_sonicmoe",
        "moeq runs the experts as grouped GEMMs over tokens sorted by expert",
    ),
    (
        "experts_implementation",
        "moeq runs the experts as grouped GEMMs over tokens sorted by expert",
    ),
    (
        "llama4_linearized_experts",
        "moeq reads fused experts as they are",
    ),
    ("liger_rms_norm_gated", "moeq uses its own fused kernels"),
    (
        "experimental_skip_move_to_device",
        "moeq places each weight where it is used",
    ),
    (
        "ddp_find_unused_parameters",
        "every adapter takes part in moeq's gradient reduction",
    ),
    (
        "fsdp_version",
        "moeq does its own distribution (fsdp itself is refused)",
    ),
];

/// Key prefixes accepted and ignored, for families of keys (one warning per key).
pub const IGNORED_AXOLOTL_PREFIXES: &[(&str, &str)] = &[
    ("trackio_", "moeq has no Trackio integration"),
    ("wandb_", "moeq has no Weights & Biases integration"),
    ("mlflow_", "moeq has no MLflow integration"),
    ("comet_", "moeq has no Comet integration"),
];

/// Ignored keys inside a `datasets:` entry.
pub const IGNORED_DATASET_KEYS: &[(&str, &str)] = &[(
    "ds_type",
    "moeq infers the file format from the file extension",
)];

/// axolotl keys whose effect moeq cannot reproduce, so silently ignoring
/// them would train something other than what the user asked for. They are
/// an error when set to anything but null, false or an empty value (axolotl
/// templates list many of them blank).
pub const UNSUPPORTED_AXOLOTL_KEYS: &[(&str, &str)] = &[
    ("deepspeed", "moeq does its own distribution; remove 'deepspeed' and launch with moeq-launch"),
    ("fsdp", "moeq does its own distribution; remove 'fsdp' and launch with moeq-launch"),
    ("fsdp_config", "moeq does its own distribution; remove 'fsdp_config' and launch with moeq-launch"),
    ("load_in_8bit", "moeq quantizes to 4 bits only; use load_in_4bit: true"),
    ("peft_use_dora", "moeq does not implement DoRA; remove 'peft_use_dora'"),
    ("lora_modules_to_save", "moeq trains adapters only, never full modules; remove 'lora_modules_to_save'"),
    ("tokens", "moeq cannot add tokens to the vocabulary; remove 'tokens'"),
    ("rl", "moeq does supervised fine-tuning only; remove 'rl'"),
    ("unfrozen_parameters", "moeq trains adapters only; remove 'unfrozen_parameters'"),
    ("lora_fan_in_fan_out", "moeq stores every linear weight as (out, in); remove 'lora_fan_in_fan_out'"),
    ("neftune_noise_alpha", "moeq does not implement NEFTune; remove 'neftune_noise_alpha'"),
    ("test_datasets", "moeq splits validation data off with val_set_size; remove 'test_datasets'"),
    ("nvfp4_merge_aware", "moeq's frozen base is bitsandbytes NF4/FP4, not NVFP4; remove 'nvfp4_merge_aware'"),
    ("model_quantization_config", "moeq quantizes with bitsandbytes 4-bit settings only (bnb_4bit_* keys); remove 'model_quantization_config'"),
    ("model_quantization_config_kwargs", "moeq quantizes with bitsandbytes 4-bit settings only (bnb_4bit_* keys); remove 'model_quantization_config_kwargs'"),
];

/// The nearest candidate to a misspelt word, if any is close enough that
/// suggesting it helps more than it confuses. Comparison ignores case.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    // Short words are close to many keys by edit distance alone, so the edit
    // budget grows with length.
    let budget = (word.len() / 3).max(1);
    let mut best: Option<(&'a str, f64)> = None;
    for cand in candidates {
        let jw = strsim::jaro_winkler(&word, cand);
        let lev = strsim::levenshtein(&word, cand);
        let close = (jw >= 0.85 && lev <= budget.max(2))
            || lev <= budget.min(2)
            || (word.len() >= 4 && cand.contains(word.as_str()));
        if close && best.is_none_or(|(_, score)| jw > score) {
            best = Some((cand, jw));
        }
    }
    best.map(|(cand, _)| cand)
}

/// Names from Hugging Face trainers and other tools that users reach for
/// but that no spelling distance connects to the moeq key.
const SYNONYMS: &[(&str, &str)] = &[
    ("max_seq_length", "sequence_len"),
    ("max_seq_len", "sequence_len"),
    ("seq_len", "sequence_len"),
    ("lr", "learning_rate"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("per_device_train_batch_size", "micro_batch_size"),
    ("num_train_epochs", "num_epochs"),
    ("model_name_or_path", "base_model"),
    ("model", "base_model"),
    ("optim", "optimizer"),
];

/// Suggests a key moeq acts on before one it merely tolerates, so a typo of
/// `model` points at `base_model`, not at the ignored `model_type`.
pub(crate) fn suggest_key(
    word: &str,
    supported: &'static [(&'static str, &'static str)],
    others: &[&'static [(&'static str, &'static str)]],
) -> Option<&'static str> {
    lookup(SYNONYMS, word)
        .filter(|target| lookup(supported, target).is_some())
        .or_else(|| suggest(word, supported.iter().map(|(k, _)| *k)))
        .or_else(|| suggest(word, others.iter().flat_map(|t| t.iter()).map(|(k, _)| *k)))
}

pub(crate) fn lookup(table: &[(&'static str, &'static str)], key: &str) -> Option<&'static str> {
    table.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}
