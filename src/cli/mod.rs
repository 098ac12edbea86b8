//! The `moeq` command line. Each subcommand lives in its own file; this one parses arguments,
//! sets up logging, and turns errors into one line and an exit code:
//! 0 success, 1 failure while working, 2 bad input (flags, config, data, checkpoint files).

mod eval;
mod export_adapter;
mod generate;
mod gpu_bench;
mod gpu_check;
mod inspect;
mod merge;
mod nccl_check;
mod plot;
mod preprocess;
mod quantize;
mod synth;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "moeq",
    version,
    about = "QLoRA fine-tuning of Mixture-of-Experts language models"
)]
pub struct Cli {
    /// Log filter (e.g. `info`, `debug`, `moeq=trace`); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train LoRA adapters on a frozen NF4 base (default config: the embedded tiny-cpu.yaml).
    Train(train::TrainArgs),
    /// Loss and perplexity of a model (+ adapter) on JSONL data; can dump logits.
    Eval(eval::EvalArgs),
    /// Text from a model (+ adapter): greedy or sampled, with a key/value cache.
    Generate(generate::GenerateArgs),
    /// Run the data pipeline as train would, without weights: statistics, the samples as JSONL
    /// (--out), samples with their trained tokens marked (--show N).
    Preprocess(preprocess::PreprocessArgs),
    /// Rewrite an adapter in a serving layout (per-expert 2-D LoRA tensors).
    ExportAdapter(export_adapter::ExportAdapterArgs),
    /// Add an adapter's updates to the base weights: a checkpoint in the base's own layout.
    Merge(merge::MergeArgs),
    /// Draw a run's curves and tokens per expert as a PNG (RUN_DIR/training.png; training
    /// writes it at its end too).
    Plot(plot::PlotArgs),
    /// Write a deterministic random-init Hugging Face checkpoint.
    Synth(synth::SynthArgs),
    /// Write a pre-quantized (bitsandbytes 4-bit) checkpoint that train loads directly.
    Quantize(quantize::QuantizeArgs),
    /// Describe a model directory: architecture, parameters, layout, memory estimate.
    Inspect(inspect::InspectArgs),
    /// Run the CUDA ops against their CPU references (needs a build with --features cuda).
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Measure CUDA kernel throughput against device copy bandwidth (needs --features cuda).
    GpuBench(gpu_bench::GpuBenchArgs),
    /// Compare every NCCL collective with the CPU collective on random data, on every rank
    /// (run alone, or under moeq-launch; needs a build with --features nccl).
    NcclCheck(nccl_check::NcclCheckArgs),
}

/// An error at the binary's edge: the one-line message and the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// The user's input is wrong: exit 2.
    Input(String),
    /// Work failed: exit 1.
    Failed(String),
}

impl CliError {
    pub fn input(e: impl std::fmt::Display) -> CliError {
        CliError::Input(e.to_string())
    }

    pub fn failed(e: impl std::fmt::Display) -> CliError {
        CliError::Failed(e.to_string())
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args, cli.log_level.as_deref()),
        Command::Eval(args) => with_logging(cli.log_level.as_deref(), || eval::run(args)),
        Command::Generate(args) => with_logging(cli.log_level.as_deref(), || generate::run(args)),
        Command::Preprocess(args) => {
            with_logging(cli.log_level.as_deref(), || preprocess::run(args))
        }
        Command::Synth(args) => with_logging(cli.log_level.as_deref(), || synth::run(args)),
        Command::ExportAdapter(args) => {
            with_logging(cli.log_level.as_deref(), || export_adapter::run(args))
        }
        Command::Merge(args) => with_logging(cli.log_level.as_deref(), || merge::run(args)),
        Command::Plot(args) => with_logging(cli.log_level.as_deref(), || plot::run(args)),
        Command::Quantize(args) => with_logging(cli.log_level.as_deref(), || quantize::run(args)),
        Command::Inspect(args) => with_logging(cli.log_level.as_deref(), || inspect::run(args)),
        Command::GpuCheck(args) => with_logging(cli.log_level.as_deref(), || gpu_check::run(args)),
        Command::GpuBench(args) => with_logging(cli.log_level.as_deref(), || gpu_bench::run(args)),
        Command::NcclCheck(args) => {
            with_logging(cli.log_level.as_deref(), || nccl_check::run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A message of several problems (a config's) prints one `error:` line per problem.
        Err(CliError::Input(msg)) => {
            msg.lines().for_each(|l| eprintln!("error: {l}"));
            ExitCode::from(2)
        }
        Err(CliError::Failed(msg)) => {
            msg.lines().for_each(|l| eprintln!("error: {l}"));
            ExitCode::from(1)
        }
    }
}

fn with_logging(
    level: Option<&str>,
    f: impl FnOnce() -> Result<(), CliError>,
) -> Result<(), CliError> {
    let _guard = crate::util::logging::init(crate::util::logging::LogSetup {
        level,
        rank: None,
        file: None,
    })
    .map_err(CliError::Input)?;
    f()
}

/// Human-readable byte counts (decimal units, as disk and GPU specs use).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        x if x >= 1e12 => format!("{:.2} TB", x / 1e12),
        x if x >= 1e9 => format!("{:.2} GB", x / 1e9),
        x if x >= 1e6 => format!("{:.2} MB", x / 1e6),
        x if x >= 1e3 => format!("{:.2} kB", x / 1e3),
        x => format!("{x:.0} B"),
    }
}

pub fn human_count(n: u64) -> String {
    let n = n as f64;
    match n {
        x if x >= 1e9 => format!("{:.2}B", x / 1e9),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// The quantization settings of a frozen base, as flags (`moeq eval`, `moeq quantize`), with
/// the same defaults as the config keys: NF4, blocksize 64, double quantization on.
#[derive(clap::Args, Debug, Clone)]
pub struct QuantFlags {
    /// nf4 or fp4 (as `bnb_4bit_quant_type`); `moeq eval` also takes none (the unquantized
    /// base, as `load_in_4bit: false` trains it).
    #[arg(long, default_value = "nf4")]
    quant_type: String,
    /// Values per absmax block (as `quant_blocksize`).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Quantize the block scales too (as `bnb_4bit_use_double_quant`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    double_quant: bool,
}

impl QuantFlags {
    /// The 4-bit settings, or None for `--quant-type none`.
    pub fn base(&self) -> Result<Option<crate::quant::QuantSettings>, CliError> {
        match self.quant_type.as_str() {
            "none" => Ok(None),
            t if crate::quant::QuantKind::parse(t).is_none() => Err(CliError::Input(format!(
                "--quant-type '{t}': must be nf4, fp4 or none (the unquantized base)"
            ))),
            _ => self.settings().map(Some),
        }
    }

    pub fn settings(&self) -> Result<crate::quant::QuantSettings, CliError> {
        let kind = crate::quant::QuantKind::parse(&self.quant_type).ok_or_else(|| {
            CliError::Input(format!(
                "--quant-type '{}': must be nf4 or fp4",
                self.quant_type
            ))
        })?;
        let s = crate::quant::QuantSettings {
            kind,
            blocksize: self.blocksize,
            double_quant: self.double_quant,
        };
        s.validate().map_err(CliError::input)?;
        Ok(s)
    }
}

/// `cpu`, `cuda`, `cuda:N` or `auto` as a config device.
pub fn parse_device(s: &str) -> Result<crate::config::DeviceChoice, CliError> {
    crate::config::DeviceChoice::parse(s).ok_or_else(|| {
        let spellings = crate::config::DeviceChoice::SPELLINGS.join(", ");
        CliError::Input(format!("--device '{s}': use one of {spellings}"))
    })
}
