//! `moeq-launch --nproc N -- moeq train --config x.yaml`: the torchrun-style launcher. The
//! flags are torchrun's (`--nproc-per-node`, `--nnodes`, `--node-rank`, `--master-addr`,
//! `--master-port`, `--max-restarts`); the work is in `moeq::distributed::launch`.
use clap::Parser;
use moeq::distributed::launch::{self, LaunchOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "moeq-launch",
    version,
    about = "Start N ranks of a command on this node with torchrun's environment (RANK, \
             LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...); stop the group when one fails",
    after_help = "Example: moeq-launch --nproc 8 -- moeq train --config x.yaml\n\
                  Multi-node: run it on every node with the same --nnodes, --master-addr, \
                  --master-port and MOEQ_JOB_TOKEN, and that node's --node-rank.\n\
                  Exit codes: 0 success, 1 the group failed, 2 bad input (or rank exited 2), \
                  128+N launcher got signal N."
)]
struct Args {
    /// Processes (ranks) to start on this node, usually one per GPU.
    #[arg(
        long,
        value_name = "N",
        visible_alias = "nproc-per-node",
        alias = "nproc_per_node"
    )]
    nproc: usize,
    /// Nodes in the job.
    #[arg(long, value_name = "M", default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0 to nnodes-1 (RANK = node_rank * nproc + local rank).
    #[arg(long, value_name = "K", default_value_t = 0, alias = "node_rank")]
    node_rank: usize,
    /// Address of rank 0's node [default: $MASTER_ADDR, else 127.0.0.1].
    #[arg(long, value_name = "A", alias = "master_addr")]
    master_addr: Option<String>,
    /// Rendezvous port on the master [default: $MASTER_PORT, else a free port on one node,
    /// 29500 across nodes].
    #[arg(long, value_name = "P", alias = "master_port")]
    master_port: Option<u16>,
    /// Restarts of the whole group after a failure (they resume from the last checkpoint).
    #[arg(long, value_name = "R", default_value_t = 0, alias = "max_restarts")]
    max_restarts: u32,
    /// Also append each rank's output to D/rank-R.log.
    #[arg(long, value_name = "D")]
    log_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when stopping the ranks.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    grace_seconds: f64,
    /// The command each rank runs, after `--`.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = LaunchOptions {
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        max_restarts: a.max_restarts,
        log_dir: a.log_dir,
        grace_seconds: a.grace_seconds,
        command: a.command,
    };
    match launch::plan(opts, &|k| std::env::var(k).ok()).and_then(|p| launch::run(&p)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
