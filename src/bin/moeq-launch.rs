//! `moeq-launch --nproc N -- moeq train ...`: the torchrun-style launcher. Multi-process
//! launching (rendezvous, rank environment, restarts) is built with the distributed work; until
//! then this binary refuses clearly instead of starting a job that would not coordinate.
use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "error: moeq-launch: multi-process launching is not built yet; run `moeq train --config <file>` directly (one process)"
    );
    ExitCode::from(1)
}
