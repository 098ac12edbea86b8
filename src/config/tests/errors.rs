//! Each malformed config and the exact line the user sees.

use super::*;

#[test]
fn unknown_key_with_suggestion() {
    assert_eq!(
        err_with("lora_targt_modules: [q_proj]\n"),
        "t.yaml: unknown key 'lora_targt_modules' (did you mean 'lora_target_modules'?)"
    );
}

#[test]
fn unknown_key_from_another_trainer() {
    assert_eq!(
        err_with("max_seq_length: 512\n"),
        "t.yaml: unknown key 'max_seq_length' (did you mean 'sequence_len'?)"
    );
    assert_eq!(
        err_with("model: x\n"),
        "t.yaml: unknown key 'model' (did you mean 'base_model'?)"
    );
}

#[test]
fn unknown_key_without_suggestion() {
    assert_eq!(
        err_with("foo: 1\n"),
        "t.yaml: unknown key 'foo' (see README.md for the supported keys)"
    );
}

#[test]
fn unknown_key_suggests_ignored_axolotl_key() {
    assert_eq!(
        err_with("flash_atention: true\n"),
        "t.yaml: unknown key 'flash_atention' (did you mean 'flash_attention'?)"
    );
}

#[test]
fn integer_given_string() {
    assert_eq!(
        err_with("lora_r: sixteen\n"),
        "t.yaml: key 'lora_r' must be an integer, got string \"sixteen\""
    );
}

#[test]
fn integer_given_float() {
    assert_eq!(
        err_with("micro_batch_size: 2.5\n"),
        "t.yaml: key 'micro_batch_size' must be an integer, got number 2.5"
    );
}

#[test]
fn bool_given_yes_string() {
    assert_eq!(
        err_with("sample_packing: yes\n"),
        "t.yaml: key 'sample_packing' must be true or false, got string \"yes\""
    );
}

#[test]
fn bool_given_number() {
    assert_eq!(
        err_with("load_in_4bit: 1\n"),
        "t.yaml: key 'load_in_4bit' must be true or false, got number 1"
    );
}

#[test]
fn float_given_string() {
    assert_eq!(
        err_with("learning_rate: fast\n"),
        "t.yaml: key 'learning_rate' must be a number, got string \"fast\""
    );
}

#[test]
fn list_given_number() {
    assert_eq!(
        err_with("lora_target_parameters: 3\n"),
        "t.yaml: key 'lora_target_parameters' must be a list of strings, got number 3"
    );
}

#[test]
fn list_element_not_string() {
    assert_eq!(
        err_with("lora_target_modules: [q_proj, 3]\n"),
        "t.yaml: key 'lora_target_modules[1]' must be a string, got number 3"
    );
}

#[test]
fn string_given_list() {
    assert_eq!(
        err_with("output_dir: [a, b]\n"),
        "t.yaml: key 'output_dir' must be a string, got a list"
    );
}

#[test]
fn lora_dropout_out_of_range() {
    assert_eq!(
        err_with("lora_dropout: 1.5\n"),
        "t.yaml: key 'lora_dropout' must be in [0, 1), got 1.5"
    );
}

#[test]
fn lora_r_zero() {
    assert_eq!(
        err_with("lora_r: 0\n"),
        "t.yaml: key 'lora_r' must be at least 1, got 0"
    );
}

#[test]
fn learning_rate_above_one() {
    assert_eq!(
        err_with("learning_rate: 2\n"),
        "t.yaml: key 'learning_rate' must be in (0, 1], got 2"
    );
}

#[test]
fn sequence_len_too_short() {
    assert_eq!(
        err_with("sequence_len: 8\n"),
        "t.yaml: key 'sequence_len' must be at least 16, got 8"
    );
}

#[test]
fn negative_seed() {
    assert_eq!(
        err_with("seed: -1\n"),
        "t.yaml: key 'seed' must be at least 0, got -1"
    );
}

#[test]
fn adam_epsilon_zero() {
    assert_eq!(
        err_with("adam_epsilon: 0\n"),
        "t.yaml: key 'adam_epsilon' must be greater than 0, got 0"
    );
}

#[test]
fn weight_decay_infinite() {
    assert_eq!(
        err_with("weight_decay: .inf\n"),
        "t.yaml: key 'weight_decay' must be at least 0, got .inf"
    );
}

#[test]
fn val_set_size_not_fraction_or_count() {
    assert_eq!(
        err_with("val_set_size: 1.5\n"),
        "t.yaml: key 'val_set_size' must be a fraction in [0, 1) or a record count of at least 1, got 1.5"
    );
}

#[test]
fn bad_enum_with_suggestion() {
    assert_eq!(
        err_with("lr_scheduler: cosin\n"),
        "t.yaml: key 'lr_scheduler' must be one of constant, constant_with_warmup, linear, cosine; got 'cosin' (did you mean 'cosine'?)"
    );
}

#[test]
fn bad_enum_without_suggestion() {
    assert_eq!(
        err_with("adapter: full\n"),
        "t.yaml: key 'adapter' must be one of qlora, lora; got 'full'"
    );
}

#[test]
fn bad_enum_not_a_string() {
    assert_eq!(
        err_with("bnb_4bit_quant_type: 4\n"),
        "t.yaml: key 'bnb_4bit_quant_type' must be one of nf4, fp4; got number 4"
    );
}

#[test]
fn unsupported_optimizer() {
    assert_eq!(
        err_with("optimizer: adamw_torch_4bit\n"),
        "t.yaml: key 'optimizer' must be one of adamw_torch, adamw_torch_fused, adamw, adamw_bnb_8bit, \
         paged_adamw_8bit, adamw_8bit, adamw_torch_8bit; got 'adamw_torch_4bit' \
         (did you mean 'adamw_torch_8bit'?)"
    );
}

#[test]
fn bad_device() {
    assert_eq!(
        err_with("device: mps\n"),
        "t.yaml: key 'device' must be one of auto, cpu, cuda, cuda:N; got 'mps'"
    );
    assert_eq!(
        err_with("device: cuda:x\n"),
        "t.yaml: key 'device' must be one of auto, cpu, cuda, cuda:N; got 'cuda:x' (did you mean 'cuda'?)"
    );
}

#[test]
fn bad_bf16() {
    assert_eq!(
        err_with("bf16: full\n"),
        "t.yaml: key 'bf16' must be true, false or auto; got 'full'"
    );
}

#[test]
fn quant_blocksize_not_allowed() {
    assert_eq!(
        err_with("quant_blocksize: 100\n"),
        "t.yaml: key 'quant_blocksize' must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096; got 100"
    );
}

#[test]
fn missing_base_model() {
    assert_eq!(
        err("datasets:\n  - path: a.jsonl\n    type: completion\n"),
        "t.yaml: missing required key 'base_model' (a model directory or synth://<arch>/<preset>)"
    );
}

#[test]
fn blank_base_model_is_missing() {
    assert_eq!(
        err("base_model:\ndatasets:\n  - path: a.jsonl\n    type: completion\n"),
        "t.yaml: missing required key 'base_model' (a model directory or synth://<arch>/<preset>)"
    );
}

#[test]
fn malformed_synth_base_model() {
    assert_eq!(
        err("base_model: synth://qwen3_moe\ndatasets:\n  - path: a.jsonl\n    type: completion\n"),
        "t.yaml: key 'base_model' must look like synth://<arch>/<preset>?seed=N, got 'synth://qwen3_moe'"
    );
}

#[test]
fn missing_datasets() {
    assert_eq!(
        err("base_model: /models/m\n"),
        "t.yaml: missing required key 'datasets' (a list of entries with 'path' and 'type')"
    );
}

#[test]
fn empty_datasets() {
    assert_eq!(
        err("base_model: /models/m\ndatasets: []\n"),
        "t.yaml: key 'datasets' must list at least one dataset"
    );
}

#[test]
fn datasets_not_a_list() {
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  path: a.jsonl\n  type: completion\n"),
        "t.yaml: key 'datasets' must be a list of entries with 'path' and 'type', got a mapping"
    );
}

#[test]
fn dataset_entry_not_a_mapping() {
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  - a.jsonl\n"),
        "t.yaml: key 'datasets[0]' must be a mapping with 'path' and 'type', got string \"a.jsonl\""
    );
}

#[test]
fn dataset_missing_path() {
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  - type: completion\n"),
        "t.yaml: missing required key 'datasets[0].path' (a data file, a directory or synth://<task>)"
    );
}

/// As in axolotl, a dataset without `type:` holds pre-tokenized records.
#[test]
fn dataset_without_type_is_pretokenized() {
    let c = crate::config::TrainConfig::from_yaml_str(
        "base_model: /models/m\ndatasets:\n  - path: a.jsonl\n    type: completion\n  - path: b.jsonl\n",
        "t.yaml",
    )
    .unwrap()
    .config;
    assert_eq!(
        c.datasets[1].ds_type,
        crate::config::DatasetType::Pretokenized
    );
}

#[test]
fn dataset_unknown_key() {
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  - path: a.jsonl\n    type: completion\n  - pth: b.jsonl\n    type: completion\n"),
        "t.yaml: unknown key 'datasets[1].pth' (did you mean 'path'?)"
    );
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  - path: a.jsonl\n    type: completion\n    shards: 4\n"),
        "t.yaml: unknown key 'datasets[0].shards' (see README.md for the supported dataset keys)"
    );
}

#[test]
fn dataset_bad_type() {
    assert_eq!(
        err("base_model: /models/m\ndatasets:\n  - path: a.jsonl\n    type: sharegpt\n"),
        "t.yaml: key 'datasets[0].type' must be one of completion, alpaca, chat_template, input_output, pretokenized; got 'sharegpt'"
    );
}

#[test]
fn dataset_bad_mapping_value() {
    assert_eq!(
        err(
            "base_model: /models/m\ndatasets:\n  - path: a.jsonl\n    type: chat_template\n    \
             message_property_mappings: {role: [from]}\n"
        ),
        "t.yaml: key 'datasets[0].message_property_mappings.role' must be a string, got a list"
    );
}

#[test]
fn yaml_syntax_error() {
    assert_eq!(
        err("base_model: x\n  lora_r: 3\n"),
        "t.yaml: YAML syntax error at line 2 column 9: mapping values are not allowed in this context"
    );
    assert_eq!(
        err("base_model: x\nlora_target_modules: [q_proj\n"),
        "t.yaml: YAML syntax error at line 3 column 1: did not find expected ',' or ']', while parsing a flow \
         sequence at line 2 column 22"
    );
}

#[test]
fn two_documents() {
    assert_eq!(
        err("base_model: x\n---\nbase_model: y\n"),
        "t.yaml: YAML syntax error: deserializing from YAML containing more than one document is not supported"
    );
}

#[test]
fn duplicate_keys() {
    assert_eq!(
        err(&format!("{BASE}lora_r: 8\nseed: 1\nlora_r: 16\n")),
        "t.yaml: duplicate key 'lora_r' at line 7 column 1; each key may appear only once"
    );
    assert_eq!(
        err("base_model: x\ndatasets:\n  - path: a\n    type: completion\n  - path: b\n    # c\n    path: c\n"),
        "t.yaml: duplicate key 'datasets[1].path' at line 7 column 5; each key may appear only once"
    );
    assert_eq!(
        err("base_model: x\ndatasets: [{path: a, path: b}]\n"),
        "t.yaml: duplicate key 'datasets[0].path' in the mapping at line 2 column 12; each key may appear only once"
    );
}

#[test]
fn top_level_list() {
    assert_eq!(
        err("- base_model: x\n"),
        "t.yaml: the top level must be a mapping of keys such as 'base_model: ...', got a list"
    );
}

#[test]
fn empty_file() {
    assert_eq!(
        err(""),
        "t.yaml: the config is empty; it needs at least base_model and datasets"
    );
    assert_eq!(
        err("# nothing yet\n\n"),
        "t.yaml: the config is empty; it needs at least base_model and datasets"
    );
}

#[test]
fn non_string_key() {
    assert_eq!(
        err_with("1: x\n"),
        "t.yaml: every key must be a string, got number 1"
    );
    assert_eq!(
        err("base_model: x\ndatasets:\n  - path: a\n    type: completion\n    true: 1\n"),
        "t.yaml: every key in 'datasets[0]' must be a string, got boolean true"
    );
}

#[test]
fn missing_file() {
    let e = TrainConfig::from_file(std::path::Path::new("/nonexistent/moeq.yaml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/moeq.yaml: cannot read config file: No such file or directory (os error 2)"
    );
}

/// Proves every supported key is actually read: a mapping is the wrong type
/// for all of them (a list for the mapping-valued keys), so each must produce an error that names it.
#[test]
fn every_supported_key_is_parsed() {
    for (key, _) in SUPPORTED_KEYS {
        let yaml = match *key {
            "base_model" => {
                "base_model: {x: 1}\ndatasets: [{path: a, type: completion}]\n".to_string()
            }
            "datasets" => "base_model: /m\ndatasets: {x: 1}\n".to_string(),
            // Its value is a mapping: a list is the wrong type.
            "bnb_config_kwargs" | "model_config" => format!("{BASE}{key}: [1]\n"),
            _ => format!("{BASE}{key}: {{x: 1}}\n"),
        };
        let msg = match parse(&yaml) {
            Ok(_) => panic!("key {key} accepted a mapping"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.starts_with(&format!("t.yaml: key '{key}' ")),
            "{key}: {msg}"
        );
    }
}

#[test]
fn axolotl_values_moeq_refuses() {
    assert_eq!(
        err_with("warmup_steps: 1.5\n"),
        "t.yaml: key 'warmup_steps' must be a whole number of steps or a fraction in (0, 1) of all steps, got 1.5"
    );
    assert_eq!(
        err_with("warmup_steps: 0.1\nwarmup_ratio: 0.1\n"),
        "t.yaml: key 'warmup_steps' and 'warmup_ratio' are both set; keep only one"
    );
    assert!(
        err_with("cosine_min_lr_ratio: 1.5\n").starts_with("t.yaml: key 'cosine_min_lr_ratio' ")
    );
    assert!(err_with("quantize_moe_experts: false\n").contains("moeq always quantizes the experts"));
    assert_eq!(
        err_with("gradient_checkpointing: unsloth\n"),
        "t.yaml: key 'gradient_checkpointing' must be true, false or offload"
    );
    assert_eq!(
        err_with("activation_offloading: disk\n"),
        "t.yaml: key 'activation_offloading' disk is not supported: moeq parks activations in host memory (use true)"
    );
    assert_eq!(
        err_with("activation_offloading: true\ngradient_checkpointing: false\n"),
        "t.yaml: key 'activation_offloading' offloads what the per-layer recompute keeps: set gradient_checkpointing: true, or activation_offloading: false"
    );
    assert_eq!(
        err_with("recompute_attention: false\ngradient_checkpointing: false\n"),
        "t.yaml: key 'recompute_attention' false keeps what the per-layer recompute would run again: set gradient_checkpointing: true, or remove recompute_attention"
    );
    assert!(err_with("recompute_attention: sometimes\n")
        .starts_with("t.yaml: key 'recompute_attention' "));
    assert_eq!(
        err_with("activation_offloading: cpu\n"),
        "t.yaml: key 'activation_offloading' must be true, false or legacy"
    );
    assert!(err_with("nvfp4_merge_aware: true\n").contains("not NVFP4"));
    assert!(
        err_with("eot_tokens: [1]\n").starts_with("t.yaml: key 'eot_tokens[0]' must be a string")
    );
    assert_eq!(
        err_with("model_config: 3\n"),
        "t.yaml: key 'model_config' must be a mapping of config.json keys to values"
    );
    assert_eq!(
        err_with("bnb_4bit_quant_type: nf4\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"),
        "t.yaml: key 'bnb_4bit_quant_type' and bnb_config_kwargs.bnb_4bit_quant_type disagree; keep one"
    );
    assert!(err_with("bnb_config_kwargs:\n  llm_int8_threshold: 6.0\n")
        .starts_with("t.yaml: key 'bnb_config_kwargs.llm_int8_threshold' is not a bitsandbytes 4-bit setting"));
    assert!(err_with("bnb_config_kwargs: nf4\n").contains("must be a mapping"));
}

/// Every problem of a config at once, one line each, in file order for the keys and then in
/// reading order for the values; a misspelt key is not also reported as missing.
#[test]
fn every_problem_is_reported_at_once() {
    let yaml = "base_model: /models/m\ndatasets:\n  - pth: a.jsonl\n    type: completion\n    feild: text\n\
                lora_r: sixteen\nlearning_rate: -1.0\nlr_sheduler: cosine\nmicro_batch_size: 0\n\
                optimizer: sgd\n";
    let msg = match parse(yaml) {
        Ok(o) => panic!("expected errors, got {:?}", o.config),
        Err(e) => e.to_string(),
    };
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(
        lines,
        [
            "t.yaml: unknown key 'lr_sheduler' (did you mean 'lr_scheduler'?)",
            "t.yaml: key 'lora_r' must be an integer, got string \"sixteen\"",
            "t.yaml: unknown key 'datasets[0].pth' (did you mean 'path'?)",
            "t.yaml: unknown key 'datasets[0].feild' (did you mean 'field'?)",
            "t.yaml: key 'micro_batch_size' must be at least 1, got 0",
            "t.yaml: key 'learning_rate' must be in (0, 1], got -1.0",
            "t.yaml: key 'optimizer' must be one of adamw_torch, adamw_torch_fused, adamw, adamw_bnb_8bit, paged_adamw_8bit, adamw_8bit, adamw_torch_8bit; got 'sgd'",
        ],
        "{msg}"
    );
}
