//! Valid configs: defaults, warnings, aliases and round trips.

use super::*;
use std::path::Path;

#[test]
fn embedded_default_parses_cleanly() {
    let out = TrainConfig::embedded_default().unwrap();
    assert_eq!(out.warnings, Vec::<String>::new());
    let c = out.config;
    assert_eq!(c.base_model, "synth://qwen3_moe/tiny?seed=0");
    assert_eq!(c.device, DeviceChoice::Cpu);
    assert!(c.load_in_4bit);
    assert_eq!(c.adapter, Adapter::Qlora);
    assert_eq!((c.lora_r, c.lora_alpha), (8, 16.0));
    assert_eq!(
        c.lora_target_modules,
        TargetModules::Named(vec![
            "q_proj".into(),
            "k_proj".into(),
            "v_proj".into(),
            "o_proj".into()
        ])
    );
    assert_eq!(
        c.lora_target_parameters,
        vec!["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    );
    assert_eq!(c.datasets.len(), 1);
    assert_eq!(c.datasets[0].path, "synth://reverse?n=4000");
    assert_eq!(c.datasets[0].ds_type, DatasetType::InputOutput);
    assert_eq!(c.val_set_size, ValSetSize::Fraction(0.05));
    assert_eq!(
        (c.sequence_len, c.sample_packing, c.micro_batch_size),
        (128, true, 8)
    );
    assert_eq!((c.gradient_accumulation_steps, c.max_steps), (1, Some(300)));
    assert_eq!(c.learning_rate, 3.0e-3);
    assert_eq!(c.lr_scheduler, LrScheduler::Cosine);
    assert_eq!((c.warmup_steps, c.warmup_ratio), (Some(20), None));
    assert_eq!(c.output_dir, Path::new("outputs/tiny-cpu"));
    assert_eq!(
        (c.logging_steps, c.eval_steps, c.save_steps),
        (10, Some(100), Some(100))
    );
    assert_eq!(c.seed, 0);
    assert_eq!(
        (c.lora_r, c.lora_alpha, c.peft_use_rslora),
        (8, 16.0, false)
    );
    assert_eq!(c.warmup_steps_for(300), 20);
}

#[test]
fn defaults_are_applied() {
    let out = ok(BASE);
    assert_eq!(out.warnings, Vec::<String>::new());
    let c = out.config;
    assert_eq!(c.tokenizer_config, None);
    assert_eq!(c.device, DeviceChoice::Auto);
    assert!(c.load_in_4bit);
    assert_eq!(c.bnb_4bit_quant_type, crate::quant::QuantKind::Nf4);
    assert!(c.bnb_4bit_use_double_quant);
    assert_eq!(c.bnb_4bit_compute_dtype, None);
    assert_eq!(c.quant_blocksize, 64);
    assert_eq!(c.adapter, Adapter::Qlora);
    assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (16, 32.0, 0.0));
    assert_eq!(
        c.lora_target_modules,
        TargetModules::Named(vec![
            "q_proj".into(),
            "k_proj".into(),
            "v_proj".into(),
            "o_proj".into()
        ])
    );
    assert!(!c.lora_target_linear);
    assert!(c.lora_target_parameters.is_empty());
    assert!(!c.peft_use_rslora);
    let d = &c.datasets[0];
    assert_eq!(
        (d.field.as_str(), d.field_messages.as_str()),
        ("text", "messages")
    );
    assert_eq!(d.roles_to_train, vec!["assistant"]);
    assert_eq!(d.train_on_eos, TrainOnEos::Turn);
    assert!(d.message_property_mappings.is_empty());
    assert_eq!(
        (&d.split, &d.chat_template, &d.name, &d.data_files),
        (&None, &None, &None, &None)
    );
    assert_eq!(c.chat_template, None);
    assert!(c.val_set_size.is_zero());
    assert_eq!(c.sequence_len, 2048);
    assert!(
        !c.sample_packing && !c.pad_to_sequence_len && !c.train_on_inputs && !c.skip_bad_samples
    );
    assert_eq!(c.max_consecutive_skipped_steps, 10);
    assert_eq!((c.micro_batch_size, c.gradient_accumulation_steps), (1, 1));
    assert_eq!((c.num_epochs, c.max_steps), (1.0, None));
    assert_eq!(c.learning_rate, 2e-4);
    assert_eq!(c.lr_scheduler, LrScheduler::Cosine);
    assert_eq!((c.warmup_steps, c.warmup_ratio), (None, None));
    assert_eq!(c.optimizer, Optimizer::AdamW);
    assert_eq!(
        (c.weight_decay, c.adam_beta1, c.adam_beta2, c.adam_epsilon),
        (0.0, 0.9, 0.999, 1e-8)
    );
    assert_eq!(c.max_grad_norm, 1.0);
    assert_eq!(c.bf16, Bf16Mode::Auto);
    assert!(!c.fp16);
    assert!(c.gradient_checkpointing);
    assert_eq!(c.output_dir, Path::new("./outputs/moeq"));
    assert_eq!(
        (c.save_steps, c.save_total_limit, c.eval_steps),
        (None, None, None)
    );
    assert_eq!(c.logging_steps, 1);
    assert_eq!(c.seed, 42);
    assert_eq!(c.resume_from_checkpoint, None);
    assert!(c.expert_parallel);
    assert_eq!(c.collective_timeout_s, 120);
    assert_eq!(c.warmup_steps_for(1000), 0);
}

#[test]
fn lora_adapter_defaults_to_unquantized() {
    let c = ok_with("adapter: lora\n").config;
    assert!(!c.load_in_4bit);
}

#[test]
fn ignored_keys_warn_once_each() {
    let out =
        ok_with("strict: false\nflash_attention: true\nwandb_project: demo\nevals_per_epoch: 4\n");
    assert_eq!(
        out.warnings,
        vec![
            "t.yaml: key 'strict' is accepted for axolotl compatibility but ignored by moeq (moeq always checks every key)",
            "t.yaml: key 'flash_attention' is accepted for axolotl compatibility but ignored by moeq (moeq picks its \
             attention kernel itself)",
            "t.yaml: key 'wandb_project' is accepted for axolotl compatibility but ignored by moeq (moeq has no \
             Weights & Biases integration)",
            "t.yaml: key 'evals_per_epoch' is accepted for axolotl compatibility but ignored by moeq (use eval_steps)",
        ]
    );
}

#[test]
fn every_ignored_key_gives_exactly_one_warning() {
    for (key, reason) in IGNORED_AXOLOTL_KEYS {
        let out = ok_with(&format!("{key}: 1\n"));
        assert_eq!(
            out.warnings,
            vec![format!(
                "t.yaml: key '{key}' is accepted for axolotl compatibility but ignored by moeq ({reason})"
            )]
        );
    }
}

#[test]
fn ignored_dataset_key_warns() {
    let out =
        ok("base_model: /m\ndatasets:\n  - path: a.json\n    type: alpaca\n    ds_type: json\n");
    assert_eq!(
        out.warnings,
        vec!["t.yaml: key 'datasets[0].ds_type' is accepted for axolotl compatibility but ignored by moeq (moeq \
              infers the file format from the file extension)"]
    );
}

/// axolotl's example configs list many keys with no value; those mean
/// "unset" and must load silently, unsupported ones included.
#[test]
fn blank_and_false_axolotl_keys_are_silent() {
    let out = ok_with(
        "wandb_project:\nwandb_entity:\nlora_model_dir:\ndeepspeed:\nfsdp:\nfsdp_config:\nload_in_8bit: false\n\
         special_tokens:\nwarmup_ratio:\nmax_steps:\n",
    );
    assert_eq!(out.warnings, Vec::<String>::new());
    assert_eq!(out.config.max_steps, None);
}

#[test]
fn target_module_forms() {
    assert_eq!(
        ok_with("lora_target_modules: all-linear\n")
            .config
            .lora_target_modules,
        TargetModules::AllLinear
    );
    assert_eq!(
        ok_with("lora_target_modules: [all-linear]\n")
            .config
            .lora_target_modules,
        TargetModules::AllLinear
    );
    assert_eq!(
        ok_with("lora_target_modules: q_proj\n")
            .config
            .lora_target_modules,
        TargetModules::Named(vec!["q_proj".into()])
    );
    let c = ok_with("lora_target_linear: true\nlora_target_modules: [q_proj]\n").config;
    assert_eq!(c.lora_target_modules, TargetModules::AllLinear);
    let c =
        ok_with("lora_target_modules: []\nlora_target_parameters: mlp.experts.down_proj\n").config;
    assert!(c.lora_target_modules.is_empty());
    assert_eq!(c.lora_target_parameters, vec!["mlp.experts.down_proj"]);
}

#[test]
fn device_forms() {
    assert_eq!(
        ok_with("device: cuda:1\n").config.device,
        DeviceChoice::Cuda(Some(1))
    );
    assert_eq!(
        ok_with("device: cuda\n").config.device,
        DeviceChoice::Cuda(None)
    );
    assert_eq!(ok_with("device: cpu\n").config.device, DeviceChoice::Cpu);
    assert_eq!(DeviceChoice::Cuda(Some(3)).to_string(), "cuda:3");
}

#[test]
fn value_forms() {
    assert_eq!(
        ok_with("val_set_size: 200\n").config.val_set_size,
        ValSetSize::Count(200)
    );
    assert_eq!(
        ok_with("val_set_size: 0\n").config.val_set_size,
        ValSetSize::Fraction(0.0)
    );
    assert_eq!(ok_with("bf16: true\n").config.bf16, Bf16Mode::Enabled);
    assert_eq!(ok_with("bf16: false\n").config.bf16, Bf16Mode::Disabled);
    assert_eq!(
        ok_with("optimizer: adamw_torch_fused\n").config.optimizer,
        Optimizer::AdamW
    );
    assert_eq!(ok_with("learning_rate: 1\n").config.learning_rate, 1.0);
    assert_eq!(
        ok_with("resume_from_checkpoint: auto\n")
            .config
            .resume_from_checkpoint,
        Some(ResumeFrom::Auto)
    );
    assert_eq!(
        ok_with("resume_from_checkpoint: true\n")
            .config
            .resume_from_checkpoint,
        Some(ResumeFrom::Auto)
    );
    assert_eq!(
        ok_with("resume_from_checkpoint: out/checkpoint-100\n")
            .config
            .resume_from_checkpoint,
        Some(ResumeFrom::Path("out/checkpoint-100".into()))
    );
    let c =
        ok_with("warmup_ratio: 0.1\nlora_r: 64\nlora_alpha: 16\npeft_use_rslora: true\n").config;
    assert_eq!(c.warmup_steps_for(95), 10);
    assert_eq!(
        (c.lora_r, c.lora_alpha, c.peft_use_rslora),
        (64, 16.0, true)
    );
}

#[test]
fn cross_field_warnings() {
    let out = ok_with(
        "gradient_checkpointing: false\nsave_total_limit: 2\nmax_steps: 50\nval_set_size: 0.1\neval_steps: 100\n\
         max_consecutive_skipped_steps: 3\n",
    );
    assert_eq!(
        out.warnings,
        vec![
            "t.yaml: key 'save_total_limit' has no effect without save_steps (only the final adapter is saved)",
            "t.yaml: key 'eval_steps' (100) is larger than max_steps (50), so no evaluation runs during training",
        ]
    );
}

#[test]
fn chat_template_dataset() {
    let c = ok("base_model: /m\nchat_template: chatml\ndatasets:\n  - path: chats/\n    type: chat_template\n    \
                split: train\n    field_messages: conversations\n    message_property_mappings:\n      role: from\n      \
                content: value\n    roles_to_train: [gpt]\n    train_on_eos: all\n    data_files: a.jsonl\n")
    .config;
    let d = &c.datasets[0];
    assert_eq!(d.ds_type, DatasetType::ChatTemplate);
    assert_eq!(d.field_messages, "conversations");
    assert_eq!(
        d.message_property_mappings.get("role").map(String::as_str),
        Some("from")
    );
    assert_eq!(d.roles_to_train, vec!["gpt"]);
    assert_eq!(d.train_on_eos, TrainOnEos::All);
    assert_eq!(d.data_files, Some(vec!["a.jsonl".to_string()]));
    assert_eq!(c.chat_template.as_deref(), Some("chatml"));
}

/// A typical axolotl QLoRA example, blank keys and all.
#[test]
fn axolotl_style_config() {
    let out = ok("\
base_model: Qwen/Qwen3-30B-A3B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
wandb_entity:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
deepspeed:
fsdp:
fsdp_config:
special_tokens:
");
    let keys: Vec<&str> = out
        .warnings
        .iter()
        .filter_map(|w| w.split('\'').nth(1))
        .collect();
    assert_eq!(
        keys,
        [
            "model_type",
            "tokenizer_type",
            "strict",
            "group_by_length",
            "tf32",
            "flash_attention",
            "evals_per_epoch",
            "saves_per_epoch"
        ]
    );
    assert_eq!(out.config.lora_target_modules, TargetModules::AllLinear);
    assert_eq!(out.config.learning_rate, 2e-4);
}

/// A saved resolved config must load back to the same value.
#[test]
fn resolved_config_round_trips() {
    let configs = [
        TINY_CPU_YAML.to_string(),
        BASE.to_string(),
        format!(
            "{BASE}adapter: lora\nlora_target_modules: all-linear\ndevice: cuda:2\nval_set_size: 10\nbf16: false\n\
             resume_from_checkpoint: auto\nwarmup_ratio: 0.05\nbnb_4bit_compute_dtype: bfloat16\ntokenizer_config: tok\n"
        ),
        format!("{BASE}gradient_checkpointing: false\n"),
        format!("{BASE}recompute_attention: false\nactivation_offloading: true\n"),
        format!("{BASE}full_determinism: false\n"),
    ];
    for yaml in configs {
        let first = ok(&yaml).config;
        let saved = serde_yaml::to_string(&first).unwrap();
        let again = match TrainConfig::from_yaml_str(&saved, "saved.yaml") {
            Ok(o) => o.config,
            Err(e) => panic!("{e}\n{saved}"),
        };
        assert_eq!(first, again, "{saved}");
    }
}

#[test]
fn from_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.yaml");
    std::fs::write(&path, format!("{BASE}wandb_name: x\nlora_r: 0\n")).unwrap();
    let e = TrainConfig::from_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: key 'lora_r' must be at least 1, got 0", path.display())
    );
    std::fs::write(&path, format!("{BASE}wandb_name: x\n")).unwrap();
    let out = TrainConfig::from_file(&path).unwrap();
    assert!(out.warnings[0].starts_with(&format!("{}: key 'wandb_name'", path.display())));
}

#[test]
fn key_tables_are_consistent() {
    let mut all: Vec<&str> = SUPPORTED_KEYS
        .iter()
        .chain(IGNORED_AXOLOTL_KEYS)
        .chain(UNSUPPORTED_AXOLOTL_KEYS)
        .map(|(k, _)| *k)
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a key is listed twice");
    let mut ds: Vec<&str> = DATASET_KEYS
        .iter()
        .chain(IGNORED_DATASET_KEYS)
        .map(|(k, _)| *k)
        .collect();
    let n = ds.len();
    ds.sort_unstable();
    ds.dedup();
    assert_eq!(ds.len(), n, "a dataset key is listed twice");
}

/// axolotl's schedule keys: `constant_with_warmup`, `cosine_min_lr_ratio`, and a fractional
/// `warmup_steps`, which transformers reads as a ratio of all steps (rounded up).
#[test]
fn axolotl_schedule_keys() {
    let c = ok_with("lr_scheduler: constant_with_warmup\nwarmup_steps: 5\n").config;
    assert_eq!(c.lr_scheduler, LrScheduler::ConstantWithWarmup);
    assert_eq!(c.warmup_steps_for(100), 5);
    let c = ok_with("lr_scheduler: cosine\ncosine_min_lr_ratio: 0.1\n").config;
    assert_eq!(c.cosine_min_lr_ratio, Some(0.1));
    let c = ok_with("warmup_steps: 0.1\n").config;
    assert_eq!((c.warmup_steps, c.warmup_ratio), (None, Some(0.1)));
    assert_eq!(c.warmup_steps_for(95), 10);
    let c = ok_with("warmup_steps: 0\n").config;
    assert_eq!((c.warmup_steps, c.warmup_ratio), (Some(0), None));
    // Settings that have no effect say so.
    let out = ok_with("lr_scheduler: constant\nwarmup_steps: 3\n");
    assert_eq!(
        out.warnings,
        vec!["t.yaml: lr_scheduler 'constant' ignores warmup, as in transformers; use constant_with_warmup to warm up"]
    );
    let out = ok_with("lr_scheduler: linear\ncosine_min_lr_ratio: 0.1\n");
    assert_eq!(
        out.warnings,
        vec!["t.yaml: key 'cosine_min_lr_ratio' applies to lr_scheduler cosine only; it has no effect with linear"]
    );
}

/// Kernel-choice and tracking keys of axolotl's MoE examples load with one warning each;
/// key families go by prefix.
#[test]
fn kernel_choice_and_tracking_keys_are_accepted() {
    let out = ok_with(
        "attn_implementation: flash_attention_2\nlora_mlp_kernel: true\nuse_scattermoe: true\n\
         trackio_project_name: demo\nexpert_parallel_size: 4\n",
    );
    assert_eq!(out.warnings.len(), 4, "{:?}", out.warnings);
    assert!(out.warnings[3].contains("'trackio_project_name'"));
    assert!(out.warnings[3].contains("no Trackio integration"));
    assert_eq!(out.config.expert_parallel_size, Some(4));
}

#[test]
fn activation_offloading_values() {
    for (yaml, offload) in [
        ("activation_offloading: true\n", true),
        ("activation_offloading: legacy\n", true),
        ("activation_offloading: false\n", false),
        ("gradient_checkpointing: true\n", false),
        ("", false),
    ] {
        let out = ok_with(yaml);
        assert_eq!(out.config.activation_offloading, offload, "{yaml}");
        assert!(out.config.gradient_checkpointing, "{yaml}");
        assert!(out.warnings.is_empty(), "{yaml}: {:?}", out.warnings);
    }
    let kept = ok_with("gradient_checkpointing: false\n");
    assert!(!kept.config.gradient_checkpointing && !kept.config.activation_offloading);
}

#[test]
fn full_determinism_values() {
    for (yaml, exact) in [
        ("", true),
        ("full_determinism: true\n", true),
        ("full_determinism: false\n", false),
    ] {
        let out = ok_with(yaml);
        assert_eq!(out.config.full_determinism, exact, "{yaml}");
        assert!(out.warnings.is_empty(), "{yaml}: {:?}", out.warnings);
    }
}

#[test]
fn recompute_attention_values() {
    for (yaml, rerun) in [
        ("", true),
        ("recompute_attention: true\n", true),
        ("recompute_attention: false\n", false),
        (
            "recompute_attention: false\nactivation_offloading: true\n",
            false,
        ),
        (
            "recompute_attention: true\ngradient_checkpointing: false\n",
            true,
        ),
    ] {
        let out = ok_with(yaml);
        assert_eq!(out.config.recompute_attention, rerun, "{yaml}");
        assert!(out.warnings.is_empty(), "{yaml}: {:?}", out.warnings);
    }
}

#[test]
fn quantize_moe_experts_true_and_gradient_checkpointing_offload() {
    let out = ok_with("quantize_moe_experts: true\ngradient_checkpointing: offload\n");
    assert!(out.config.gradient_checkpointing);
    assert!(out.config.activation_offloading);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    // Features left off (false or blank) are no request.
    ok_with("nvfp4_merge_aware: false\neot_tokens:\n");
    let eot = ok_with("eot_tokens: ['<|im_end|>', '<|endoftext|>']\n");
    assert_eq!(
        eot.config.eot_tokens.as_deref(),
        Some(&["<|im_end|>".to_string(), "<|endoftext|>".to_string()][..])
    );
}

/// `bnb_config_kwargs` (passed by axolotl to `BitsAndBytesConfig`) act as the bnb_4bit_* keys.
#[test]
fn bnb_config_kwargs_act_as_the_bnb_keys() {
    let c = ok_with(
        "bnb_config_kwargs:\n  llm_int8_has_fp16_weight: false\n  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n",
    )
    .config;
    assert_eq!(c.bnb_4bit_quant_type, crate::quant::QuantKind::Fp4);
    assert!(!c.bnb_4bit_use_double_quant);
    let c = ok_with("bnb_4bit_quant_type: nf4\nbnb_config_kwargs:\n  bnb_4bit_quant_type: nf4\n")
        .config;
    assert_eq!(c.bnb_4bit_quant_type, crate::quant::QuantKind::Nf4);
    assert!(c.bnb_4bit_use_double_quant);
}
