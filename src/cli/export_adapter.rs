//! `moeq export-adapter`: an adapter rewritten in another serving layout — today
//! `per-expert`: every 3-D expert adapter as 2-D LoRA tensors of each expert's own projections
//! (`lora::export`), for servers that load MoE LoRA per expert. Written to a temporary folder
//! beside `--out` and renamed into place once complete.

use super::CliError;
use crate::lora::{export, peft};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ExportAdapterArgs {
    /// The base model directory the adapter belongs to (config.json), or synth://…
    #[arg(long)]
    model: String,
    /// The adapter directory (adapter_config.json + adapter_model.safetensors; moeq's or PEFT's).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the exported adapter (a new folder).
    #[arg(long)]
    out: PathBuf,
    /// The layout to write.
    #[arg(long, value_enum, default_value_t = Layout::PerExpert)]
    layout: Layout,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Layout {
    /// Per-expert 2-D LoRA tensors (`…experts.{e}.gate_proj/up_proj/down_proj`).
    PerExpert,
}

pub fn run(args: ExportAdapterArgs) -> Result<(), CliError> {
    let Layout::PerExpert = args.layout;
    if args.out.exists() {
        return Err(CliError::Input(format!(
            "--out {}: already exists; name a new folder",
            args.out.display()
        )));
    }
    let model_dir = crate::synth::resolve_base_model(&args.model).map_err(CliError::input)?;
    let dir = crate::model_files::ModelDir::open(&model_dir).map_err(CliError::input)?;
    let adapters =
        peft::load(&args.adapter, &dir.spec, &candle_core::Device::Cpu).map_err(CliError::Input)?;
    let cfg_path = args.adapter.join("adapter_config.json");
    let original: serde_json::Value = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| CliError::Input(format!("{}: unreadable", cfg_path.display())))?;
    let tensors = export::per_expert(&adapters, &dir.spec).map_err(CliError::failed)?;
    let config = export::per_expert_config(&original, &dir.spec, !adapters.experts.is_empty());
    let name = args
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("adapter");
    let tmp = args.out.with_file_name(format!(".{name}.partial"));
    let fail = |e: std::io::Error| CliError::Failed(format!("writing {}: {e}", args.out.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(fail)?;
    peft::write_f32(&tmp.join("adapter_model.safetensors"), &tensors).map_err(fail)?;
    let text = serde_json::to_string_pretty(&config).map_err(CliError::failed)?;
    std::fs::write(tmp.join("adapter_config.json"), text + "\n").map_err(fail)?;
    std::fs::rename(&tmp, &args.out).map_err(fail)?;
    tracing::info!(
        "exported {} tensors ({} expert adapters per expert) to {}",
        tensors.len(),
        adapters.experts.len(),
        args.out.display()
    );
    Ok(())
}
