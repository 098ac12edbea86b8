//! moeq: QLoRA fine-tuning of Mixture-of-Experts language models.
//!
//! Module map (dependencies point one way, see DESIGN):
//! - `config`: the YAML training config, validated before any work starts.
//! - `checkpoint`: reading Hugging Face checkpoints (config.json, safetensors, expert layouts).
//! - `arch`: architecture specs built from config.json, parameter accounting.
//! - `synth`: deterministic synthetic checkpoints and tokenizers.
//! - `quant`: 4-bit quantization bit-exact with bitsandbytes (CPU reference and CUDA).
//! - `data`: tokenizer, dataset formats, chat templates, masking, packing, the loader.
//! - `lora`: LoRA adapters with PEFT shapes, initialisation and file format.
//! - `train`: optimizer, learning-rate schedules, chunked loss (the training loop comes next).
//! - `dist`: rank and master resolution from flags, torchrun and SLURM.
//! - `ops`: custom ops with a CPU reference and a CUDA implementation.
//! - `util`: logging and progress reporting.
pub mod arch;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod lora;
pub mod ops;
pub mod quant;
pub mod synth;
pub mod train;
pub mod util;
