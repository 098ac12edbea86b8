//! YAML text to [`TrainConfig`]: syntax, key set, then each field.

use super::fields::{describe, invalid, one_of, quote_word, Bounds, Fields};
use super::key_check::{check_keys, KeySet};
use super::keys::{
    DATASET_KEYS, IGNORED_AXOLOTL_KEYS, IGNORED_AXOLOTL_PREFIXES, IGNORED_DATASET_KEYS,
    SUPPORTED_KEYS, UNSUPPORTED_AXOLOTL_KEYS,
};
use super::types::*;
use super::{validate, yaml, ConfigError, ConfigOutcome, DatasetConfig, TrainConfig};
use serde_yaml::Value;
use std::cell::RefCell;
use std::path::PathBuf;

type R<T> = Result<T, ConfigError>;

pub(crate) fn parse(text: &str, origin: &str) -> R<ConfigOutcome> {
    let mut root: Value = serde_yaml::from_str(text).map_err(|e| yaml::error(origin, text, &e))?;
    root.apply_merge()
        .map_err(|e| yaml::error(origin, text, &e))?;
    let map = match &root {
        Value::Mapping(m) if !m.is_empty() => m,
        Value::Null | Value::Mapping(_) => {
            return Err(invalid(
                origin,
                "the config is empty; it needs at least base_model and datasets",
            ))
        }
        other => {
            return Err(invalid(
                origin,
                format!(
                    "the top level must be a mapping of keys such as 'base_model: ...', got {}",
                    describe(other)
                ),
            ))
        }
    };

    let mut warnings = Vec::new();
    let errors = RefCell::new(Vec::new());
    let f = Fields::new(origin, String::new(), map, &errors);
    let suggested = check_keys(
        &f,
        "",
        map,
        &KeySet {
            supported: SUPPORTED_KEYS,
            ignored: IGNORED_AXOLOTL_KEYS,
            ignored_prefixes: IGNORED_AXOLOTL_PREFIXES,
            unsupported: UNSUPPORTED_AXOLOTL_KEYS,
            readme_what: "keys",
        },
        &mut warnings,
    );
    let misspelt = |key: &str| suggested.iter().any(|s| s == key);
    if !f.present("base_model") && !misspelt("base_model") {
        f.record(f.missing("base_model", "a model directory or synth://<arch>/<preset>"));
    }
    if !f.present("datasets") {
        if !misspelt("datasets") {
            f.record(f.missing("datasets", "a list of entries with 'path' and 'type'"));
        }
        return Err(all_errors(errors.into_inner()));
    }
    // Every bad value is recorded and parsing goes on, so a config with several problems
    // reports them all (one line each); a problem that leaves nothing to go on stops at once.
    match build(&f, &mut warnings) {
        Ok(config) if errors.borrow().is_empty() => {
            match validate::check(&config, &f, &mut warnings) {
                Ok(()) if errors.borrow().is_empty() => {
                    return Ok(ConfigOutcome { config, warnings })
                }
                Ok(()) => {}
                Err(e) => f.record(e),
            }
        }
        Ok(_) => {}
        Err(e) => f.record(e),
    }
    Err(all_errors(errors.into_inner()))
}

/// One error, or all of them as one (one line each when printed).
fn all_errors(mut errors: Vec<ConfigError>) -> ConfigError {
    match errors.len() {
        1 => errors.remove(0),
        _ => ConfigError::Several(errors),
    }
}

fn build(f: &Fields, warnings: &mut Vec<String>) -> R<TrainConfig> {
    let base_model = f.string("base_model")?.unwrap_or_default();
    check_synth_model(f, &base_model)?;

    let adapter = f.choice::<Adapter>("adapter")?.unwrap_or(Adapter::Qlora);
    let lora_r = f.usize_min("lora_r", 1)?.unwrap_or(16);
    let lora_target_linear = f.bool("lora_target_linear")?.unwrap_or(false);
    let mut lora_target_modules = target_modules(f)?;
    if lora_target_linear {
        lora_target_modules = TargetModules::AllLinear;
    }

    let (warmup_steps, warmup_ratio) = warmup(f)?;
    if f.bool("quantize_moe_experts")? == Some(false) {
        return Err(f.err(
            "quantize_moe_experts",
            "is false, but moeq always quantizes the experts with the rest of the frozen base (that is what fits MoE models in memory); remove it or set it to true",
        ));
    }
    let bnb = BnbKwargs::read(f)?;
    let fp16 = f.bool("fp16")?.unwrap_or(false);
    if fp16 {
        return Err(f.err(
            "fp16",
            "must be false: moeq trains in bf16 or f32 (use bf16: true, false or auto)",
        ));
    }

    Ok(TrainConfig {
        base_model,
        tokenizer_config: f.string("tokenizer_config")?.map(PathBuf::from),
        model_config: f.json_map("model_config")?.unwrap_or_default(),
        device: device(f)?,
        load_in_4bit: f.bool("load_in_4bit")?.unwrap_or(adapter == Adapter::Qlora),
        strict_weights: f.bool("strict_weights")?.unwrap_or(false),
        bnb_4bit_quant_type: bnb.quant_type.unwrap_or(crate::quant::QuantKind::Nf4),
        bnb_4bit_use_double_quant: bnb.double_quant.unwrap_or(true),
        bnb_4bit_compute_dtype: bnb.compute_dtype,
        quant_blocksize: quant_blocksize(f)?,
        adapter,
        lora_r,
        lora_alpha: f
            .number("lora_alpha", Bounds::POSITIVE)?
            .unwrap_or(2.0 * lora_r as f64),
        lora_dropout: f.number("lora_dropout", Bounds::UNIT)?.unwrap_or(0.0),
        lora_target_modules,
        lora_target_linear,
        lora_target_parameters: f.string_list("lora_target_parameters")?.unwrap_or_default(),
        lora_model_dir: f.string("lora_model_dir")?.map(PathBuf::from),
        peft_use_rslora: f.bool("peft_use_rslora")?.unwrap_or(false),
        datasets: datasets(f, warnings)?,
        dataset_prepared_path: f.string("dataset_prepared_path")?.map(PathBuf::from),
        chat_template: f.string("chat_template")?,
        val_set_size: val_set_size(f)?,
        sequence_len: f.usize_min("sequence_len", 16)?.unwrap_or(2048),
        sample_packing: f.bool("sample_packing")?.unwrap_or(false),
        pad_to_sequence_len: f.bool("pad_to_sequence_len")?.unwrap_or(false),
        train_on_inputs: f.bool("train_on_inputs")?.unwrap_or(false),
        eot_tokens: f.string_list("eot_tokens")?,
        skip_bad_samples: f.bool("skip_bad_samples")?.unwrap_or(false),
        max_consecutive_skipped_steps: f
            .usize_min("max_consecutive_skipped_steps", 1)?
            .unwrap_or(10),
        micro_batch_size: f.usize_min("micro_batch_size", 1)?.unwrap_or(1),
        gradient_accumulation_steps: f.usize_min("gradient_accumulation_steps", 1)?.unwrap_or(1),
        num_epochs: f.number("num_epochs", Bounds::POSITIVE)?.unwrap_or(1.0),
        max_steps: f.usize_min("max_steps", 1)?,
        learning_rate: f
            .number("learning_rate", Bounds::UNIT_POSITIVE)?
            .unwrap_or(2e-4),
        lr_scheduler: f.choice("lr_scheduler")?.unwrap_or(LrScheduler::Cosine),
        cosine_min_lr_ratio: f.number("cosine_min_lr_ratio", Bounds::UNIT_CLOSED)?,
        warmup_steps,
        warmup_ratio,
        optimizer: optimizer(f)?,
        weight_decay: f
            .number("weight_decay", Bounds::NON_NEGATIVE)?
            .unwrap_or(0.0),
        adam_beta1: f.number("adam_beta1", Bounds::UNIT)?.unwrap_or(0.9),
        adam_beta2: f.number("adam_beta2", Bounds::UNIT)?.unwrap_or(0.999),
        adam_epsilon: f.number("adam_epsilon", Bounds::POSITIVE)?.unwrap_or(1e-8),
        max_grad_norm: f
            .number("max_grad_norm", Bounds::NON_NEGATIVE)?
            .unwrap_or(1.0),
        bf16: bf16(f)?,
        fp16,
        gradient_checkpointing: f
            .get("gradient_checkpointing")
            .is_none_or(|v| !matches!(v, Value::Bool(false))),
        activation_offloading: activation_offloading(f)?,
        recompute_attention: recompute_attention(f)?,
        full_determinism: f.bool("full_determinism")?.unwrap_or(true),
        output_dir: f
            .string("output_dir")?
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("./outputs/moeq")),
        save_steps: f.usize_min("save_steps", 1)?,
        save_total_limit: f.usize_min("save_total_limit", 1)?,
        logging_steps: f.usize_min("logging_steps", 1)?.unwrap_or(1),
        eval_steps: f.usize_min("eval_steps", 1)?,
        seed: f.u64_min("seed", 0)?.unwrap_or(42),
        resume_from_checkpoint: resume_from(f)?,
        expert_parallel: f.bool("expert_parallel")?.unwrap_or(true),
        expert_parallel_size: f.usize_min("expert_parallel_size", 1)?,
        collective_timeout_s: f.u64_min("collective_timeout_s", 1)?.unwrap_or(120),
    })
}

/// Catches a malformed synth:// address here rather than after the run has
/// started; the synth module owns the meaning of arch and preset.
fn check_synth_model(f: &Fields, base_model: &str) -> R<()> {
    let Some(rest) = base_model.strip_prefix("synth://") else {
        return Ok(());
    };
    let body = rest.split('?').next().unwrap_or_default();
    let mut parts = body.split('/');
    let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(p), None) if !a.is_empty() && !p.is_empty());
    if ok {
        Ok(())
    } else {
        Err(f.err(
            "base_model",
            format!(
                "must look like synth://<arch>/<preset>?seed=N, got {}",
                quote_word(base_model)
            ),
        ))
    }
}

fn target_modules(f: &Fields) -> R<TargetModules> {
    let Some(names) = f.string_list("lora_target_modules")? else {
        return Ok(TargetModules::Named(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        ));
    };
    if names.iter().any(|n| n == "all-linear") {
        if names.len() > 1 {
            return Err(f.err(
                "lora_target_modules",
                "cannot combine all-linear with other module names",
            ));
        }
        return Ok(TargetModules::AllLinear);
    }
    Ok(TargetModules::Named(names))
}

fn device(f: &Fields) -> R<DeviceChoice> {
    let Some(v) = f.get("device") else {
        return Ok(DeviceChoice::Auto);
    };
    let parsed = match v {
        Value::String(s) => DeviceChoice::parse(s),
        _ => None,
    };
    parsed.ok_or_else(|| f.err("device", one_of(&DeviceChoice::SPELLINGS, v)))
}

/// `gradient_checkpointing` (true, false or axolotl's `offload`: recompute with the saved layer
/// inputs in host memory) and `activation_offloading` (true, false or axolotl's `legacy`; `disk`
/// is refused): whether the recompute's saved tensors wait in host memory.
fn activation_offloading(f: &Fields) -> R<bool> {
    let checkpointing = match f.get("gradient_checkpointing") {
        Some(Value::String(s)) if s == "offload" => Some(true),
        Some(Value::String(_)) => {
            return Err(f.err("gradient_checkpointing", "must be true, false or offload"))
        }
        _ => f.bool("gradient_checkpointing")?.map(|_| false),
    };
    let offload = match f.get("activation_offloading") {
        Some(Value::String(s)) if s == "legacy" => true,
        Some(Value::String(s)) if s == "disk" => {
            return Err(f.err(
                "activation_offloading",
                "disk is not supported: moeq parks activations in host memory (use true)",
            ))
        }
        Some(Value::String(_)) => {
            return Err(f.err("activation_offloading", "must be true, false or legacy"))
        }
        _ => f.bool("activation_offloading")?.unwrap_or(false),
    };
    if offload && f.get("gradient_checkpointing") == Some(&Value::Bool(false)) {
        return Err(f.err(
            "activation_offloading",
            "offloads what the per-layer recompute keeps: set gradient_checkpointing: true, or activation_offloading: false",
        ));
    }
    Ok(offload || checkpointing == Some(true))
}

/// `recompute_attention` (true by default): `false` (keep the outputs) only with the per-layer
/// recompute; `true` is what a run without recompute saves, and loads again.
fn recompute_attention(f: &Fields) -> R<bool> {
    let given = f.bool("recompute_attention")?;
    if given == Some(false) && f.get("gradient_checkpointing") == Some(&Value::Bool(false)) {
        return Err(f.err(
            "recompute_attention",
            "false keeps what the per-layer recompute would run again: set gradient_checkpointing: true, or remove recompute_attention",
        ));
    }
    Ok(given.unwrap_or(true))
}

/// The bitsandbytes settings from the top-level keys and `bnb_config_kwargs` (axolotl passes the
/// mapping to `BitsAndBytesConfig`): a setting given in both places must agree.
struct BnbKwargs {
    quant_type: Option<crate::quant::QuantKind>,
    double_quant: Option<bool>,
    compute_dtype: Option<ComputeDtype>,
}

impl BnbKwargs {
    fn read(f: &Fields) -> R<BnbKwargs> {
        let top = BnbKwargs {
            quant_type: f.choice("bnb_4bit_quant_type")?,
            double_quant: f.bool("bnb_4bit_use_double_quant")?,
            compute_dtype: f.choice("bnb_4bit_compute_dtype")?,
        };
        let map = match f.get("bnb_config_kwargs") {
            None => return Ok(top),
            Some(Value::Mapping(m)) => m,
            Some(v) => {
                return Err(f.err(
                    "bnb_config_kwargs",
                    format!(
                        "must be a mapping of bitsandbytes settings, got {}",
                        describe(v)
                    ),
                ))
            }
        };
        let inner = f.child("bnb_config_kwargs.".into(), map);
        for (k, _) in map {
            let key = k.as_str().unwrap_or_default();
            let known = [
                "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant",
                "bnb_4bit_compute_dtype",
                // Neither changes a 4-bit value: the int8 path and the packed codes' storage type.
                "llm_int8_has_fp16_weight",
                "bnb_4bit_quant_storage",
                "load_in_4bit",
            ];
            if !known.contains(&key) {
                return Err(inner.err(
                    key,
                    "is not a bitsandbytes 4-bit setting moeq knows (bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, llm_int8_has_fp16_weight, bnb_4bit_quant_storage); remove it",
                ));
            }
        }
        if inner.bool("load_in_4bit")? == Some(false) {
            return Err(inner.err(
                "load_in_4bit",
                "must not be false: moeq's frozen base is 4-bit",
            ));
        }
        let kwargs = BnbKwargs {
            quant_type: inner.choice("bnb_4bit_quant_type")?,
            double_quant: inner.bool("bnb_4bit_use_double_quant")?,
            compute_dtype: inner.choice("bnb_4bit_compute_dtype")?,
        };
        fn agree<T: PartialEq + Copy>(
            f: &Fields,
            key: &str,
            top: Option<T>,
            kw: Option<T>,
        ) -> R<Option<T>> {
            match (top, kw) {
                (Some(a), Some(b)) if a != b => Err(f.err(
                    key,
                    format!("and bnb_config_kwargs.{key} disagree; keep one"),
                )),
                (a, b) => Ok(a.or(b)),
            }
        }
        Ok(BnbKwargs {
            quant_type: agree(f, "bnb_4bit_quant_type", top.quant_type, kwargs.quant_type)?,
            double_quant: agree(
                f,
                "bnb_4bit_use_double_quant",
                top.double_quant,
                kwargs.double_quant,
            )?,
            compute_dtype: agree(
                f,
                "bnb_4bit_compute_dtype",
                top.compute_dtype,
                kwargs.compute_dtype,
            )?,
        })
    }
}

/// `warmup_steps` and `warmup_ratio`. A `warmup_steps` fraction in (0, 1) is a ratio of all
/// steps, as transformers' `TrainingArguments` reads it (axolotl passes it through).
fn warmup(f: &Fields) -> R<(Option<usize>, Option<f64>)> {
    let ratio = f.number("warmup_ratio", Bounds::UNIT)?;
    let fraction = match f.get("warmup_steps") {
        Some(Value::Number(n)) if n.as_u64().is_none() && n.as_i64().is_none() => {
            let x = n.as_f64().filter(|x| *x > 0.0 && *x < 1.0);
            let what = "must be a whole number of steps or a fraction in (0, 1) of all steps";
            Some(x.ok_or_else(|| f.err("warmup_steps", format!("{what}, got {n}")))?)
        }
        _ => None,
    };
    match fraction {
        Some(_) if ratio.is_some() => Err(f.err(
            "warmup_steps",
            "and 'warmup_ratio' are both set; keep only one",
        )),
        Some(r) => Ok((None, Some(r))),
        None => Ok((f.usize_min("warmup_steps", 0)?, ratio)),
    }
}

fn quant_blocksize(f: &Fields) -> R<usize> {
    let Some(n) = f.usize_min("quant_blocksize", 0)? else {
        return Ok(64);
    };
    if crate::quant::BLOCKSIZES.contains(&n) {
        Ok(n)
    } else {
        let list = crate::quant::blocksize_list();
        Err(f.err("quant_blocksize", format!("must be one of {list}; got {n}")))
    }
}

fn val_set_size(f: &Fields) -> R<ValSetSize> {
    let Some(v) = f.get("val_set_size") else {
        return Ok(ValSetSize::Fraction(0.0));
    };
    let Value::Number(n) = v else {
        return Err(f.err(
            "val_set_size",
            format!("must be a number, got {}", describe(v)),
        ));
    };
    if let Some(u) = n.as_u64() {
        return match usize::try_from(u) {
            Ok(0) => Ok(ValSetSize::Fraction(0.0)),
            Ok(c) => Ok(ValSetSize::Count(c)),
            Err(_) => Err(f.err("val_set_size", format!("is too large, got {n}"))),
        };
    }
    match n.as_f64() {
        Some(x) if n.is_f64() && (0.0..1.0).contains(&x) => Ok(ValSetSize::Fraction(x)),
        _ => Err(f.err(
            "val_set_size",
            format!("must be a fraction in [0, 1) or a record count of at least 1, got {n}"),
        )),
    }
}

fn optimizer(f: &Fields) -> R<Optimizer> {
    match f.strict_choice::<Optimizer>("optimizer") {
        Ok(o) => Ok(o.unwrap_or(Optimizer::AdamW)),
        Err(ConfigError::Invalid {
            origin,
            mut message,
        }) => {
            let suggested = message.contains("did you mean");
            if !suggested
                && matches!(f.get("optimizer"), Some(Value::String(s)) if s.contains("adam"))
            {
                message.push_str(
                    " (moeq's AdamW keeps fp32 or 8-bit moments; for 4-bit state use adamw_bnb_8bit)",
                );
            }
            f.record(ConfigError::Invalid { origin, message });
            Ok(Optimizer::AdamW)
        }
        Err(e) => Err(e),
    }
}

fn bf16(f: &Fields) -> R<Bf16Mode> {
    match f.get("bf16") {
        None => Ok(Bf16Mode::Auto),
        Some(Value::Bool(true)) => Ok(Bf16Mode::Enabled),
        Some(Value::Bool(false)) => Ok(Bf16Mode::Disabled),
        Some(Value::String(s)) if s == "auto" => Ok(Bf16Mode::Auto),
        Some(v) => {
            let got = match v {
                Value::String(s) => quote_word(s),
                other => describe(other),
            };
            Err(f.err("bf16", format!("must be true, false or auto; got {got}")))
        }
    }
}

/// `true` is accepted as Hugging Face's spelling of "the latest checkpoint".
fn resume_from(f: &Fields) -> R<Option<ResumeFrom>> {
    match f.get("resume_from_checkpoint") {
        None | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(ResumeFrom::Auto)),
        Some(Value::String(s)) if s == "auto" => Ok(Some(ResumeFrom::Auto)),
        Some(_) => Ok(f
            .string("resume_from_checkpoint")?
            .map(|p| ResumeFrom::Path(PathBuf::from(p)))),
    }
}

fn datasets(f: &Fields, warnings: &mut Vec<String>) -> R<Vec<DatasetConfig>> {
    let Some(v) = f.get("datasets") else {
        return Ok(Vec::new());
    };
    let Value::Sequence(items) = v else {
        return Err(f.err(
            "datasets",
            format!(
                "must be a list of entries with 'path' and 'type', got {}",
                describe(v)
            ),
        ));
    };
    if items.is_empty() {
        return Err(f.err("datasets", "must list at least one dataset"));
    }
    let set = KeySet {
        supported: DATASET_KEYS,
        ignored: IGNORED_DATASET_KEYS,
        ignored_prefixes: &[],
        unsupported: &[],
        readme_what: "dataset keys",
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Mapping(m) = item else {
            return Err(f.err(
                &format!("datasets[{i}]"),
                format!(
                    "must be a mapping with 'path' and 'type', got {}",
                    describe(item)
                ),
            ));
        };
        let prefix = format!("datasets[{i}].");
        let suggested = check_keys(f, &prefix, m, &set, warnings);
        let misspelt = |key: &str| suggested.iter().any(|s| s == key);
        let d = f.child(prefix, m);
        // A present but bad value is recorded by the accessor; only an absent one is "missing".
        let path = match d.string("path")? {
            Some(p) => p,
            None if d.present("path") || misspelt("path") => String::new(),
            None => return Err(d.missing("path", "a data file, a directory or synth://<task>")),
        };
        if path
            .strip_prefix("synth://")
            .is_some_and(|t| t.split('?').next().unwrap_or_default().is_empty())
        {
            return Err(d.err(
                "path",
                format!(
                    "must look like synth://<task>?n=N, got {}",
                    quote_word(&path)
                ),
            ));
        }
        let ds_type = match d.choice::<DatasetType>("type")? {
            Some(t) => t,
            None if d.present("type") || misspelt("type") => DatasetType::Completion,
            // axolotl reads a dataset without `type:` as already tokenized.
            None => DatasetType::Pretokenized,
        };
        out.push(DatasetConfig {
            path,
            ds_type,
            split: d.string("split")?,
            field: d.string("field")?.unwrap_or_else(|| "text".to_string()),
            field_messages: d
                .string("field_messages")?
                .unwrap_or_else(|| "messages".to_string()),
            message_property_mappings: d
                .string_map("message_property_mappings")?
                .unwrap_or_default(),
            field_thinking: d
                .string("field_thinking")?
                .unwrap_or_else(|| "reasoning_content".to_string()),
            template_thinking_key: d
                .string("template_thinking_key")?
                .unwrap_or_else(|| "reasoning_content".to_string()),
            roles_to_train: d
                .string_list("roles_to_train")?
                .unwrap_or_else(|| vec!["assistant".to_string()]),
            train_on_eos: d.choice("train_on_eos")?.unwrap_or(TrainOnEos::Turn),
            chat_template: d.string("chat_template")?,
            name: d.string("name")?,
            data_files: d.string_list("data_files")?,
        });
    }
    Ok(out)
}
