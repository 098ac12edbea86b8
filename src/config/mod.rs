//! The YAML training config.
//!
//! Keys follow axolotl so existing configs carry over. The whole file is
//! checked before any work starts: a typo or a bad value should cost the
//! user a second, not a model load. Errors are one line, start with the
//! config's name, and name the key and the fix. axolotl keys that moeq does
//! not act on load with one warning each; keys whose effect moeq cannot
//! reproduce are errors, because ignoring them would train something else.

mod fields;
mod key_check;
mod keys;
mod parse;
mod types;
mod validate;
mod yaml;

#[cfg(test)]
mod tests;

pub use keys::{
    DATASET_KEYS, IGNORED_AXOLOTL_KEYS, IGNORED_AXOLOTL_PREFIXES, IGNORED_DATASET_KEYS,
    SUPPORTED_KEYS, UNSUPPORTED_AXOLOTL_KEYS,
};
pub use types::{
    Adapter, Bf16Mode, ComputeDtype, DatasetType, DeviceChoice, LrScheduler, Optimizer, ResumeFrom,
    TargetModules, TrainOnEos, ValSetSize,
};

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The embedded default: a real training job that finishes on a CPU in
/// minutes, so `moeq` can demonstrate itself with no model download.
pub const TINY_CPU_YAML: &str = include_str!("../../configs/tiny-cpu.yaml");

/// The name messages use for [`TINY_CPU_YAML`].
pub const TINY_CPU_SOURCE: &str = "<embedded tiny-cpu.yaml>";

/// A config error. Display is a single line starting with `<source>: ` so it
/// reads well both on a terminal and in a multi-rank log.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{origin}: cannot read config file: {reason}")]
    Read { origin: String, reason: String },
    /// The text is not valid YAML.
    #[error("{origin}: YAML syntax error{}: {message}", at_line_col(.line, .column))]
    Syntax {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// Valid YAML that is not a valid moeq config.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    /// Several problems, one line each.
    #[error("{}", several(.0))]
    Several(Vec<ConfigError>),
}

fn several(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    lines.join("\n")
}

fn at_line_col(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

/// A parsed config plus the non-fatal findings the caller should log.
#[derive(Debug, Clone)]
pub struct ConfigOutcome {
    pub config: TrainConfig,
    /// One line each, starting with `<source>: `.
    pub warnings: Vec<String>,
}

/// One entry of `datasets:`, with defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetConfig {
    /// A file, a directory, or `synth://<task>?n=N`.
    pub path: String,
    #[serde(rename = "type")]
    pub ds_type: DatasetType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Text field of completion records.
    pub field: String,
    /// Message-list field of chat_template records.
    pub field_messages: String,
    /// moeq's property name (`role`, `content`) to the record's name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub message_property_mappings: BTreeMap<String, String>,
    /// The message field holding a reasoning trace (`reasoning_content`), handed to the chat
    /// template as `template_thinking_key` (`reasoning_content`), as axolotl does.
    pub field_thinking: String,
    pub template_thinking_key: String,
    pub roles_to_train: Vec<String>,
    pub train_on_eos: TrainOnEos,
    /// Overrides the top-level `chat_template` for this dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_files: Option<Vec<String>>,
}

/// The resolved training config: every default applied, every cross-field
/// rule checked. Serializing it gives YAML that loads back to the same value,
/// which is what a run saves next to its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    // --- model ---
    /// A model directory or `synth://<arch>/<preset>?seed=N`.
    pub base_model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_config: Option<PathBuf>,
    /// Overrides of the base model's config.json (`model_config`), applied when the model is
    /// opened (`model_files::overrides`).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub model_config: serde_json::Map<String, serde_json::Value>,
    pub device: DeviceChoice,

    // --- quantization ---
    /// Defaults to `adapter == qlora`.
    pub load_in_4bit: bool,
    /// A frozen weight holding NaN or Inf stops the run before training (else a warning).
    pub strict_weights: bool,
    pub bnb_4bit_quant_type: crate::quant::QuantKind,
    pub bnb_4bit_use_double_quant: bool,
    /// `None` follows `bf16`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bnb_4bit_compute_dtype: Option<ComputeDtype>,
    pub quant_blocksize: usize,

    // --- adapter ---
    pub adapter: Adapter,
    pub lora_r: usize,
    /// Defaults to `2 * lora_r` (axolotl has no default; this is the common choice).
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Already `AllLinear` when `lora_target_linear` is true.
    pub lora_target_modules: TargetModules,
    pub lora_target_linear: bool,
    pub lora_target_parameters: Vec<String>,
    pub peft_use_rslora: bool,
    /// An adapter to start from (`train::build`); `None` initialises new ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_model_dir: Option<PathBuf>,

    // --- data ---
    pub datasets: Vec<DatasetConfig>,
    /// Where the tokenized samples are kept between runs (`data::prepare_cached`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_prepared_path: Option<PathBuf>,
    /// Default template for chat_template datasets; `None` uses the tokenizer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub val_set_size: ValSetSize,
    pub sequence_len: usize,
    pub sample_packing: bool,
    pub pad_to_sequence_len: bool,
    pub train_on_inputs: bool,
    /// Chat templates: the texts that end a turn (none: any special token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eot_tokens: Option<Vec<String>>,
    pub skip_bad_samples: bool,
    pub max_consecutive_skipped_steps: usize,

    // --- schedule and optimizer ---
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Ignored when `max_steps` is set, as in Hugging Face trainers.
    pub num_epochs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
    /// The cosine schedule decays to this fraction of the peak instead of 0 (axolotl's
    /// `cosine_min_lr_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_min_lr_ratio: Option<f64>,
    /// At most one of `warmup_steps` and `warmup_ratio` is set; see
    /// [`TrainConfig::warmup_steps_for`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub bf16: Bf16Mode,
    /// Always false once validated; kept so a saved config shows the choice.
    pub fp16: bool,
    /// Recompute each layer in the backward (true) or keep every layer's tape (false).
    pub gradient_checkpointing: bool,
    /// With recompute: the saved layer inputs (and attention outputs, where kept) wait in
    /// page-locked host memory (`activation_offloading: true`, or `gradient_checkpointing:
    /// offload`).
    #[serde(default)]
    pub activation_offloading: bool,
    /// With recompute: each layer's attention forward runs again in the recompute (true, the
    /// default: least memory) or its first output waits for the backward, with the experts'
    /// recompute and backward by chunks where they have no adapters (false: ≈ 4.5% faster at
    /// micro-batch 8, one attention output a layer more held or parked).
    pub recompute_attention: bool,
    /// Bit-identical reruns and resumes (true, the default); false lets attention's backward
    /// add its query gradient atomically on the GPU (cuDNN's faster algorithm, no dP
    /// workspace), so reruns differ in the last bits. transformers' `full_determinism`.
    pub full_determinism: bool,

    // --- outputs ---
    pub output_dir: PathBuf,
    /// `None`: save only at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<usize>,
    /// `None`: keep every checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    pub logging_steps: usize,
    /// `None`: no periodic evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from_checkpoint: Option<ResumeFrom>,

    // --- distribution ---
    pub expert_parallel: bool,
    /// Ranks per expert-parallel group (None: all ranks form one group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_parallel_size: Option<usize>,
    pub collective_timeout_s: u64,
}

impl TrainConfig {
    /// `source` is the name used in messages, e.g. the file path or
    /// [`TINY_CPU_SOURCE`].
    pub fn from_yaml_str(text: &str, source: &str) -> Result<ConfigOutcome, ConfigError> {
        parse::parse(text, source)
    }

    /// Reads and parses a config file; a missing or unreadable file is a
    /// [`ConfigError::Read`] so the CLI reports every failure the same way.
    pub fn from_file(path: &Path) -> Result<ConfigOutcome, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            origin: origin.clone(),
            reason: e.to_string(),
        })?;
        parse::parse(&text, &origin)
    }

    /// The embedded [`TINY_CPU_YAML`], parsed.
    pub fn embedded_default() -> Result<ConfigOutcome, ConfigError> {
        Self::from_yaml_str(TINY_CPU_YAML, TINY_CPU_SOURCE)
    }

    /// Warmup length in optimizer steps once the total is known, since
    /// `warmup_ratio` is relative to it. Rounds up so a non-zero ratio always
    /// warms up at least one step.
    pub fn warmup_steps_for(&self, total_steps: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(n), _) => n,
            (None, Some(r)) => (r * total_steps as f64).ceil() as usize,
            (None, None) => 0,
        }
    }
}
