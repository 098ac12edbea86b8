//! `moeq plot RUN_DIR`: the run's curves (loss, validation loss, learning rate, tokens/s) and
//! its tokens per expert per layer as a PNG (`train::plot`), the same picture training writes
//! at its end — for a run still going, or one stopped early.

use super::CliError;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// A training run's output_dir (its metrics.jsonl).
    run_dir: PathBuf,
    /// Where to write the PNG (default: RUN_DIR/training.png).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<(), CliError> {
    if !args.run_dir.is_dir() {
        return Err(CliError::Input(format!(
            "{}: not a directory (give the output_dir of a moeq training run)",
            args.run_dir.display()
        )));
    }
    if let Some(out) = &args.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            return Err(CliError::Input(format!(
                "--out {}: its folder does not exist",
                out.display()
            )));
        }
    }
    let metrics = args.run_dir.join("metrics.jsonl");
    if !metrics.is_file() {
        return Err(CliError::Input(format!(
            "{}: no metrics.jsonl (give the output_dir of a moeq training run)",
            args.run_dir.display()
        )));
    }
    let out = crate::train::plot::plot_run(&args.run_dir, args.out.as_deref()).map_err(|e| {
        if e.starts_with("plot ") {
            CliError::Failed(e)
        } else {
            CliError::Input(e)
        }
    })?;
    println!("{}", out.display());
    Ok(())
}
