//! `moeq-launch`: starts `--nproc` copies of a command on this node with torchrun's rank
//! variables, forwards their output line by line with a `[rank R] ` prefix, and treats the ranks
//! as one group: the first failure stops the others (SIGTERM, `--grace-seconds`, SIGKILL) and
//! may restart the whole group (`--max-restarts`) with `MOEQ_RESUME_FROM_CHECKPOINT=auto`.
//!
//! Each child is the leader of its own process group, so a signal reaches everything it
//! started (a `sh -c` and its `sleep`, a trainer and its helpers), and a Ctrl-C at the terminal
//! reaches the launcher alone, which forwards it once. On Linux the launcher is a child
//! subreaper (orphaned grandchildren come back to it and are reaped per group) and each child
//! gets SIGKILL if the launcher dies, so no path leaves processes behind.
//!
//! Exit codes: 0 all ranks succeeded; 1 the group failed (or could not be started); 2 bad
//! input, or the first failing rank exited 2 (the trainer's bad-input code, never restarted);
//! 128+N the launcher received signal N.

mod group;

use super::env::DEFAULT_MASTER_PORT;
use group::{run_attempt, Outcome, Signals};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit code by which `moeq` (and this launcher) says "bad input".
pub const EXIT_BAD_INPUT: i32 = 2;

/// What the user asked for (the binary's flags).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub max_restarts: u32,
    pub log_dir: Option<PathBuf>,
    pub grace_seconds: f64,
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Flags, command or environment are wrong: exit 2.
    #[error("{0}")]
    Input(String),
    /// The launcher itself could not do its work: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl LaunchError {
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Input(_) => EXIT_BAD_INPUT as u8,
            LaunchError::Failed(_) => 1,
        }
    }
}

fn input(msg: impl Into<String>) -> LaunchError {
    LaunchError::Input(msg.into())
}

/// The master port: fixed (flag, `MASTER_PORT`, or 29500 across nodes) or, on one node with
/// nothing given, a free port picked for each attempt so concurrent jobs do not collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterPort {
    Fixed(u16),
    Free,
}

/// Everything checked and resolved before a process starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: MasterPort,
    pub job_token: String,
    pub max_restarts: u32,
    pub log_dir: Option<PathBuf>,
    pub grace: Duration,
    /// The command as given (`argv[0]` for the child) and the executable it resolved to.
    pub command: Vec<String>,
    pub program: PathBuf,
}

/// Checks the options against each other and the environment (`env` reads a variable; the
/// binary passes `std::env::var`): every refusal is a one-line [`LaunchError::Input`].
pub fn plan(
    opts: LaunchOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Plan, LaunchError> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let Some(name) = opts.command.first() else {
        return Err(input(
            "no command to launch: put it after `--`, e.g. `moeq-launch --nproc 2 -- moeq train --config x.yaml`",
        ));
    };
    if opts.nproc == 0 {
        return Err(input("--nproc 0: launch at least one process"));
    }
    if opts.nnodes == 0 {
        return Err(input("--nnodes 0: a job has at least one node"));
    }
    if opts.node_rank >= opts.nnodes {
        return Err(input(format!(
            "--node-rank {} with --nnodes {}: node ranks go from 0 to {}",
            opts.node_rank,
            opts.nnodes,
            opts.nnodes - 1
        )));
    }
    if !opts.grace_seconds.is_finite() || opts.grace_seconds < 0.0 {
        return Err(input(format!(
            "--grace-seconds {}: give a number of seconds >= 0",
            opts.grace_seconds
        )));
    }
    let master_port = match opts.master_port {
        Some(0) => return Err(input("--master-port 0: give a port between 1 and 65535")),
        Some(p) => MasterPort::Fixed(p),
        None => match get("MASTER_PORT") {
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => MasterPort::Fixed(p),
                _ => {
                    return Err(input(format!(
                        "MASTER_PORT='{v}' is not a port (1-65535): fix or unset it"
                    )))
                }
            },
            None if opts.nnodes == 1 => MasterPort::Free,
            None => MasterPort::Fixed(DEFAULT_MASTER_PORT),
        },
    };
    let job_token = match get("MOEQ_JOB_TOKEN") {
        Some(t) => t,
        None if opts.nnodes == 1 => format!("{:032x}", rand::random::<u128>()),
        None => {
            return Err(input(format!(
                "--nnodes {}: export the same MOEQ_JOB_TOKEN on every node before moeq-launch (e.g. `export MOEQ_JOB_TOKEN=$(openssl rand -hex 16)`, generated once per job)",
                opts.nnodes
            )))
        }
    };
    let program = find_program(name, get("PATH").as_deref())?;
    if let Some(dir) = &opts.log_dir {
        check_log_dir(dir, opts.nproc, opts.node_rank * opts.nproc)?;
    }
    Ok(Plan {
        nproc: opts.nproc,
        nnodes: opts.nnodes,
        node_rank: opts.node_rank,
        master_addr: opts
            .master_addr
            .or_else(|| get("MASTER_ADDR"))
            .unwrap_or_else(|| "127.0.0.1".into()),
        master_port,
        job_token,
        max_restarts: opts.max_restarts,
        log_dir: opts.log_dir,
        grace: Duration::from_secs_f64(opts.grace_seconds),
        program,
        command: opts.command,
    })
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The executable `name` runs: a path as given, or the first executable match on `PATH`.
fn find_program(name: &str, path: Option<&str>) -> Result<PathBuf, LaunchError> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return match fs::metadata(&p) {
            Err(_) => Err(input(format!("command '{name}' does not exist"))),
            Ok(m) if m.is_dir() => Err(input(format!("command '{name}' is a directory"))),
            Ok(_) if !is_executable(&p) => Err(input(format!(
                "command '{name}' is not executable (chmod +x it)"
            ))),
            Ok(_) => Ok(p),
        };
    }
    let mut not_executable = None;
    for dir in std::env::split_paths(path.unwrap_or("")) {
        let p = dir.join(name);
        if is_executable(&p) {
            return Ok(p);
        }
        if not_executable.is_none() && p.is_file() {
            not_executable = Some(p);
        }
    }
    Err(input(match not_executable {
        Some(p) => format!(
            "command '{name}' found at {} but it is not executable",
            p.display()
        ),
        None => format!("command '{name}' not found on PATH"),
    }))
}

fn log_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.log"))
}

fn open_log(dir: &Path, rank: usize) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir, rank))
}

/// Creates the log directory and opens every rank's file once, so a bad `--log-dir` is
/// refused before anything starts.
fn check_log_dir(dir: &Path, nproc: usize, first_rank: usize) -> Result<(), LaunchError> {
    let bad = |e: io::Error, p: &Path| {
        input(format!(
            "--log-dir {}: cannot write {}: {e}",
            dir.display(),
            p.display()
        ))
    };
    fs::create_dir_all(dir).map_err(|e| bad(e, dir))?;
    for rank in first_rank..first_rank + nproc {
        open_log(dir, rank).map_err(|e| bad(e, &log_path(dir, rank)))?;
    }
    Ok(())
}

/// The environment of local rank `local` on restart `attempt` (0 for the first start):
/// torchrun's variables plus moeq's own.
pub fn child_env(plan: &Plan, local: usize, attempt: u32, port: u16) -> Vec<(String, String)> {
    let n = plan.nproc;
    let mut v: Vec<(&str, String)> = vec![
        ("RANK", (plan.node_rank * n + local).to_string()),
        ("LOCAL_RANK", local.to_string()),
        ("WORLD_SIZE", (plan.nnodes * n).to_string()),
        ("LOCAL_WORLD_SIZE", n.to_string()),
        ("GROUP_RANK", plan.node_rank.to_string()),
        ("MASTER_ADDR", plan.master_addr.clone()),
        ("MASTER_PORT", port.to_string()),
        ("MOEQ_JOB_TOKEN", plan.job_token.clone()),
        ("MOEQ_RESTART_COUNT", attempt.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", attempt.to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", plan.max_restarts.to_string()),
        ("MOEQ_LAUNCHED", "1".into()),
    ];
    if attempt > 0 {
        v.push(("MOEQ_RESUME_FROM_CHECKPOINT", "auto".into()));
    }
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A port nobody listens on now (the OS picks it; the listener is closed at once).
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Runs the group until it succeeds, fails for good, or the launcher is signalled; returns the
/// launcher's exit code.
pub fn run(plan: &Plan) -> Result<u8, LaunchError> {
    let signals = Signals::install()?;
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with an integer argument touches no memory.
    unsafe {
        // Orphaned grandchildren are re-parented to the launcher, which reaps them per group.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    let mut attempt = 0;
    loop {
        let port = match plan.master_port {
            MasterPort::Fixed(p) => p,
            MasterPort::Free => free_port().map_err(|e| {
                LaunchError::Failed(format!("cannot find a free port on 127.0.0.1: {e}"))
            })?,
        };
        eprintln!(
            "moeq-launch: {} process{} on node {} of {}, master {}:{port}, attempt {attempt}",
            plan.nproc,
            if plan.nproc == 1 { "" } else { "es" },
            plan.node_rank,
            plan.nnodes,
            plan.master_addr
        );
        let outcome = run_attempt(plan, attempt, port, &signals)?;
        if let (Outcome::Failed(_), Some(sig)) = (&outcome, signals.take()) {
            // Signalled while the failed group was being stopped: no restart.
            return Ok((128 + sig) as u8);
        }
        match outcome {
            Outcome::Success => return Ok(0),
            Outcome::Signalled(sig) => return Ok((128 + sig) as u8),
            Outcome::Failed(Some(EXIT_BAD_INPUT)) => return Ok(EXIT_BAD_INPUT as u8),
            Outcome::Failed(_) if attempt < plan.max_restarts => {
                attempt += 1;
                eprintln!(
                    "moeq-launch: restarting the group (attempt {attempt} of {})",
                    plan.max_restarts
                );
            }
            Outcome::Failed(_) => return Ok(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts(command: &[&str]) -> LaunchOptions {
        LaunchOptions {
            nproc: 2,
            nnodes: 1,
            node_rank: 0,
            master_addr: None,
            master_port: None,
            max_restarts: 0,
            log_dir: None,
            grace_seconds: 10.0,
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn plan_with(o: LaunchOptions, vars: &[(&str, &str)]) -> Result<Plan, LaunchError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("PATH".into(), "/usr/bin:/bin".into())])
            .collect();
        plan(o, &|k| map.get(k).cloned())
    }

    #[test]
    fn ranks_and_restart_variables() {
        let mut o = opts(&["sh"]);
        (o.nnodes, o.node_rank, o.nproc) = (3, 2, 4);
        let p = plan_with(o, &[("MOEQ_JOB_TOKEN", "abc"), ("MASTER_ADDR", "node0")]).unwrap();
        assert_eq!(p.master_port, MasterPort::Fixed(DEFAULT_MASTER_PORT));
        let env: HashMap<_, _> = child_env(&p, 1, 0, 29500).into_iter().collect();
        for (k, v) in [
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "12"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "2"),
            ("MASTER_ADDR", "node0"),
            ("MOEQ_JOB_TOKEN", "abc"),
            ("MOEQ_RESTART_COUNT", "0"),
        ] {
            assert_eq!(env[k], v, "{k}");
        }
        assert!(!env.contains_key("MOEQ_RESUME_FROM_CHECKPOINT"));
        let env: HashMap<_, _> = child_env(&p, 0, 2, 29500).into_iter().collect();
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "2");
        assert_eq!(env["MOEQ_RESUME_FROM_CHECKPOINT"], "auto");
    }

    #[test]
    fn port_and_token_defaults() {
        let p = plan_with(opts(&["sh"]), &[]).unwrap();
        assert_eq!(p.master_port, MasterPort::Free);
        assert_eq!(p.job_token.len(), 32);
        let p = plan_with(opts(&["sh"]), &[("MASTER_PORT", "1234")]).unwrap();
        assert_eq!(p.master_port, MasterPort::Fixed(1234));
        let e = plan_with(opts(&["sh"]), &[("MASTER_PORT", "x")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT='x'"), "{e}");
        let mut o = opts(&["sh"]);
        o.nnodes = 2;
        let e = plan_with(o, &[]).unwrap_err();
        assert!(e.to_string().contains("MOEQ_JOB_TOKEN"), "{e}");
    }

    #[test]
    fn commands_are_resolved_or_refused() {
        assert!(plan_with(opts(&["sh"]), &[])
            .unwrap()
            .program
            .ends_with("sh"));
        let e = plan_with(opts(&["no-such-command-moeq"]), &[]).unwrap_err();
        assert!(e.to_string().contains("not found on PATH"), "{e}");
        let e = plan_with(opts(&["/nonexistent/x"]), &[]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = plan_with(opts(&[]), &[]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
