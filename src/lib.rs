//! moeq: QLoRA fine-tuning of Mixture-of-Experts language models.
//!
//! Module map (docs/ARCHITECTURE.md has the whole account; dependencies point one way:
//! cli → train → {arch + lora, data, distributed, quant, model_files, config}; arch → {ops, quant}):
//! - `config`: the YAML training config, validated before any work starts.
//! - `model_files`: Hugging Face model directories (config.json, safetensors, expert layouts),
//!   loading the frozen base and quantizing it as it is read, pre-quantized checkpoints.
//! - `synth`: deterministic synthetic checkpoints and tokenizers.
//! - `quant`: 4-bit quantization bit-exact with bitsandbytes (CPU reference and CUDA), the
//!   frozen-base types.
//! - `arch`: architecture specs built from config.json and the one model implementation; the
//!   `ExpertExchange` an MoE layer needs from expert parallelism.
//! - `lora`: LoRA adapters with PEFT shapes, initialisation and file format.
//! - `ops`: custom ops with a CPU reference, a CUDA implementation and a backward.
//! - `data`: tokenizer, dataset formats, chat templates, masking, packing, the loader.
//! - `distributed`: rank and master resolution (flags, torchrun, SLURM), the rendezvous store,
//!   communicators (solo, TCP, NCCL), joining a job, the launcher, expert dispatch.
//! - `train`: a run assembled from its config, the loop, per-layer recompute, AdamW, schedules,
//!   metrics, evaluation, training checkpoints and resume.
//! - `gpu_check`: every GPU path compared with its CPU reference, and the tolerance table.
//! - `cli`: the subcommands.
//! - `util`: device selection, logging, memory accounting, phase timing, prefetch, progress.
pub mod arch;
pub mod cli;
pub mod config;
pub mod data;
pub mod distributed;
pub mod gpu_check;
pub mod lora;
pub mod model_files;
pub mod ops;
pub mod quant;
pub mod synth;
pub mod train;
pub mod util;
