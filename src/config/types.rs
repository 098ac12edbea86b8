//! Typed values of the string-valued config keys.
//!
//! Every enum here serializes back to the exact spelling a user writes, so a
//! resolved config saved with `serde_yaml` loads again unchanged.

use serde::{Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;

/// Implemented by the enums whose YAML form is one of a fixed set of words,
/// so the parser can list the accepted words and suggest the nearest one.
pub(crate) trait Choice: Copy + 'static {
    /// Accepted spellings in the order they are listed in error messages.
    /// Aliases map to the same variant as their canonical spelling.
    fn accepted() -> &'static [(&'static str, Self)];
}

macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// The canonical spelling, as written back into a saved config.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl Choice for $name {
            fn accepted() -> &'static [(&'static str, Self)] {
                &[ $( ($text, $name::$variant) $(, ($alias, $name::$variant))* ),+ ]
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

choice_enum! {
    /// Which adapter to train; QLoRA is the default because moeq exists to fit
    /// large MoE models into little memory.
    Adapter {
        /// LoRA on top of 4-bit quantized base weights.
        Qlora => "qlora",
        /// LoRA on top of unquantized base weights.
        Lora => "lora",
    }
}

/// The 4-bit code book of the frozen base weights is `quant::QuantKind` (bitsandbytes naming).
impl Choice for crate::quant::QuantKind {
    fn accepted() -> &'static [(&'static str, Self)] {
        use crate::quant::QuantKind;
        const ACCEPTED: [(&str, QuantKind); 2] = [
            (QuantKind::Nf4.as_str(), QuantKind::Nf4),
            (QuantKind::Fp4.as_str(), QuantKind::Fp4),
        ];
        &ACCEPTED
    }
}

choice_enum! {
    /// Learning-rate schedule applied after warmup.
    LrScheduler {
        /// The peak rate throughout; warmup does not apply (transformers' `constant`).
        Constant => "constant",
        /// Linear warmup, then the peak rate.
        ConstantWithWarmup => "constant_with_warmup",
        Linear => "linear",
        Cosine => "cosine",
    }
}

choice_enum! {
    /// AdamW with fp32 moments, or with 8-bit blockwise moments (bitsandbytes' 8-bit Adam
    /// scheme, `train::adamw8`); axolotl's names for each are accepted so configs carry over
    /// unchanged (`paged_adamw_8bit`'s paging of the state to host memory under pressure is
    /// not done: the 8-bit state is a quarter of the fp32 one and stays on the GPU).
    Optimizer {
        AdamW => "adamw_torch" | "adamw_torch_fused" | "adamw",
        AdamW8bit => "adamw_bnb_8bit" | "paged_adamw_8bit" | "adamw_8bit" | "adamw_torch_8bit",
    }
}

choice_enum! {
    /// Data type for the de-quantized matmuls (bitsandbytes naming). Unset
    /// means "follow bf16".
    ComputeDtype {
        Bfloat16 => "bfloat16",
        Float16 => "float16",
        Float32 => "float32",
    }
}

choice_enum! {
    /// How a dataset's records become token sequences (axolotl `type:`).
    DatasetType {
        /// Raw text from `field`; every token is trained on.
        Completion => "completion",
        /// instruction / input / output records in the Alpaca prompt format.
        Alpaca => "alpaca",
        /// Conversations rendered with a chat template.
        ChatTemplate => "chat_template",
        /// Segments with per-segment `label` flags, no template.
        InputOutput => "input_output",
        /// Records already tokenized: `input_ids`, optional `labels` and `attention_mask`
        /// (what axolotl reads from a dataset given without `type:`, moeq's default too).
        Pretokenized => "pretokenized",
    }
}

choice_enum! {
    /// Which end-of-sequence tokens of a conversation count towards the loss
    /// (axolotl `train_on_eos`, default `turn`).
    TrainOnEos {
        /// Every EOS token.
        All => "all",
        /// The EOS ending each trained turn.
        Turn => "turn",
        /// Only the final EOS.
        Last => "last",
        /// No EOS token.
        None => "none",
    }
}

/// Where to run. `Cuda(None)` means "the GPU this process was given", which
/// under `moeq-launch` is the local rank's device, not necessarily GPU 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// CUDA when a device is available, otherwise the CPU.
    Auto,
    Cpu,
    /// An explicit ordinal comes from `cuda:N`.
    Cuda(Option<usize>),
}

impl DeviceChoice {
    /// What a config or flag may say.
    pub const SPELLINGS: [&'static str; 4] = ["auto", "cpu", "cuda", "cuda:N"];

    /// `auto`, `cpu`, `cuda` or `cuda:N`; None for anything else.
    pub fn parse(s: &str) -> Option<DeviceChoice> {
        match s {
            "auto" => Some(DeviceChoice::Auto),
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| DeviceChoice::Cuda(Some(n))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `bf16:` takes a boolean or `auto`, as in axolotl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Mode {
    /// bf16 on CUDA devices that support it, f32 elsewhere (CPU bf16 is slow).
    Auto,
    Enabled,
    Disabled,
}

impl Serialize for Bf16Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bf16Mode::Auto => s.serialize_str("auto"),
            Bf16Mode::Enabled => s.serialize_bool(true),
            Bf16Mode::Disabled => s.serialize_bool(false),
        }
    }
}

/// Which linear layers get a LoRA pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// PEFT's `all-linear`: every linear layer except the output head. The
    /// model code decides what that means for its architecture.
    AllLinear,
    /// Module-name suffixes such as `q_proj`; may be empty when only expert
    /// parameters are trained.
    Named(Vec<String>),
}

impl TargetModules {
    pub fn is_empty(&self) -> bool {
        matches!(self, TargetModules::Named(v) if v.is_empty())
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::AllLinear => s.serialize_str("all-linear"),
            TargetModules::Named(v) => v.serialize(s),
        }
    }
}

/// Held-out split size: axolotl reads a float below 1 as a fraction and an
/// integer as a record count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ValSetSize {
    /// In [0, 1); 0 means no validation split.
    Fraction(f64),
    /// At least 1 record.
    Count(usize),
}

impl ValSetSize {
    pub fn is_zero(&self) -> bool {
        matches!(self, ValSetSize::Fraction(f) if *f == 0.0)
    }
}

/// `resume_from_checkpoint:` either names a checkpoint or asks for the latest
/// one under `output_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest checkpoint in `output_dir`, or a fresh start when none.
    Auto,
    Path(PathBuf),
}

impl Serialize for ResumeFrom {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResumeFrom::Auto => s.serialize_str("auto"),
            ResumeFrom::Path(p) => p.serialize(s),
        }
    }
}
