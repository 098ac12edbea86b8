//! The running group: children spawned in their own process groups, their output forwarded,
//! their exits watched, and the group stopped (signal, grace period, SIGKILL) as a whole.

use super::{child_env, open_log, LaunchError, Plan};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How often the launcher looks at signals and its children's groups.
const POLL: Duration = Duration::from_millis(50);
/// A line longer than this is forwarded in pieces (a child printing without newlines must not
/// grow the launcher's memory).
const MAX_LINE: u64 = 1 << 20;
/// How long to wait for output still in the pipes once every child is gone.
const DRAIN: Duration = Duration::from_secs(2);
/// How long to wait for a failed rank's last lines before saying it failed.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// How a child ended, as the first-failure line says it.
fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
            _ => format!("{s}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGQUIT => " (SIGQUIT)",
        libc::SIGILL => " (SIGILL)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGFPE => " (SIGFPE)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// SIGINT and SIGTERM, caught: the number of the last one received (0 = none).
pub(super) struct Signals(Arc<AtomicUsize>);

impl Signals {
    pub(super) fn install() -> Result<Signals, LaunchError> {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in [libc::SIGINT, libc::SIGTERM] {
            signal_hook::flag::register_usize(sig, flag.clone(), sig as usize)
                .map_err(|e| LaunchError::Failed(format!("cannot catch signal {sig}: {e}")))?;
        }
        Ok(Signals(flag))
    }

    /// Whether a signal is pending, leaving it for [`Signals::take`].
    fn pending(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    pub(super) fn take(&self) -> Option<i32> {
        match self.0.swap(0, Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// How one attempt of the group ended.
pub(super) enum Outcome {
    Success,
    /// The launcher got this signal: no restart.
    Signalled(i32),
    /// The first rank to fail and its exit code (None: killed by a signal, or not waitable).
    Failed(Option<i32>),
}

/// One child: its global rank and pid, which is also its process group id.
struct Rank {
    rank: usize,
    pid: i32,
    /// The child itself has been reaped (other members of its group may remain).
    reaped: bool,
}

fn send(pgid: i32, sig: i32) {
    // SAFETY: kill(2) on a process group we created; a group that is gone gives ESRCH.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Reaps the zombies of a group whose leader is already reaped (they are ours as subreaper),
/// then says whether any member is left.
fn group_alive(r: &Rank) -> bool {
    if r.reaped {
        // SAFETY: waitpid on our own children of this group, none of them held by a `Child`.
        while unsafe { libc::waitpid(-r.pid, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-r.pid, 0) == 0 }
}

/// Stops every group that still has members: `sig` first, then SIGKILL after the grace period
/// (or at once when the launcher is signalled meanwhile; the signal stays pending for `run`);
/// returns when every child is reaped.
fn stop(
    ranks: &mut [Rank],
    exits: &Receiver<(usize, io::Result<ExitStatus>)>,
    sig: i32,
    grace: Duration,
    signals: &Signals,
) {
    for r in ranks.iter() {
        if !r.reaped || group_alive(r) {
            send(r.pid, sig);
        }
    }
    let deadline = Instant::now() + grace;
    let reap = |ranks: &mut [Rank], timeout: Duration| {
        if let Ok((i, _)) = exits.recv_timeout(timeout) {
            ranks[i].reaped = true;
        }
    };
    while ranks.iter().any(|r| !r.reaped || group_alive(r)) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || signals.pending() {
            for r in ranks.iter() {
                send(r.pid, libc::SIGKILL);
            }
            break;
        }
        reap(ranks, left.min(POLL));
    }
    while ranks.iter().any(|r| !r.reaped) {
        reap(ranks, POLL);
    }
    for r in ranks.iter() {
        group_alive(r);
    }
}

/// Where a stream's lines go.
#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// Copies `stream` line by line to the launcher's stdout or stderr with the rank prefix (one
/// write under the lock, so lines never mix) and, unprefixed, to the rank's log file.
fn forward(
    prefix: String,
    stream: impl Read,
    sink: Sink,
    log: Option<Arc<Mutex<File>>>,
    done: (Sender<usize>, usize),
) {
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if let Some(log) = &log {
            let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
            // A full disk must not stop the job: the line still reaches the console.
            let _ = f.write_all(&line[prefix.len()..]);
        }
        // A closed console (e.g. piped into `head`) must not stop the job either.
        let _ = match sink {
            Sink::Stdout => io::stdout().lock().write_all(&line),
            Sink::Stderr => io::stderr().lock().write_all(&line),
        };
    }
    let _ = done.0.send(done.1);
}

/// Waits until the streams of `ranks` (local indices) are closed or `deadline` passes;
/// `open[i]` counts rank i's streams still being forwarded.
fn drain(done: &Receiver<usize>, open: &mut [u8], ranks: &[usize], deadline: Instant) {
    while ranks.iter().any(|&i| open[i] > 0) {
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(i) => open[i] -= 1,
            Err(_) => return,
        }
    }
}

/// Starts one child in its own process group, with its output piped to forwarders.
fn spawn_rank(
    plan: &Plan,
    local: usize,
    attempt: u32,
    port: u16,
    done: &Sender<usize>,
) -> io::Result<std::process::Child> {
    let rank = plan.node_rank * plan.nproc + local;
    let mut cmd = Command::new(&plan.program);
    cmd.arg0(&plan.command[0])
        .args(&plan.command[1..])
        .envs(child_env(plan, local, attempt, port))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid has no preconditions.
        let launcher = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The death signal follows the thread that forks: `run` spawns from the
                // launcher's main thread, which lives as long as the launcher.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != launcher {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let log = match &plan.log_dir {
        Some(dir) => Some(Arc::new(Mutex::new(open_log(dir, rank)?))),
        None => None,
    };
    let mut child = cmd.spawn()?;
    let prefix = format!("[rank {rank}] ");
    if let Some(out) = child.stdout.take() {
        let (p, l, d) = (prefix.clone(), log.clone(), (done.clone(), local));
        thread::spawn(move || forward(p, out, Sink::Stdout, l, d));
    }
    if let Some(err) = child.stderr.take() {
        let d = (done.clone(), local);
        thread::spawn(move || forward(prefix, err, Sink::Stderr, log, d));
    }
    Ok(child)
}

/// Starts all ranks of this node and watches them until they all succeed, one fails, or the
/// launcher is signalled.
pub(super) fn run_attempt(
    plan: &Plan,
    attempt: u32,
    port: u16,
    signals: &Signals,
) -> Result<Outcome, LaunchError> {
    let (exit_tx, exits) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let mut ranks: Vec<Rank> = Vec::with_capacity(plan.nproc);
    for local in 0..plan.nproc {
        let rank = plan.node_rank * plan.nproc + local;
        let child = match spawn_rank(plan, local, attempt, port, &done_tx) {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks, &exits, libc::SIGTERM, plan.grace, signals);
                return Err(LaunchError::Failed(format!(
                    "cannot start rank {rank} ({}): {e}",
                    plan.program.display()
                )));
            }
        };
        ranks.push(Rank {
            rank,
            pid: child.id() as i32,
            reaped: false,
        });
        let tx = exit_tx.clone();
        let mut child = child;
        thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((local, status));
        });
    }
    drop(done_tx);
    let mut open = vec![2u8; plan.nproc];
    let outcome = loop {
        if let Some(sig) = signals.take() {
            eprintln!(
                "moeq-launch: got signal {sig}{}, stopping all ranks",
                signal_name(sig)
            );
            stop(&mut ranks, &exits, sig, plan.grace, signals);
            break Outcome::Signalled(sig);
        }
        match exits.recv_timeout(POLL) {
            Ok((i, status)) => {
                ranks[i].reaped = true;
                if !matches!(&status, Ok(s) if s.success()) {
                    drain(&done, &mut open, &[i], Instant::now() + LAST_WORDS);
                    eprintln!(
                        "moeq-launch: rank {} failed first: {}",
                        ranks[i].rank,
                        describe(&status)
                    );
                    stop(&mut ranks, &exits, libc::SIGTERM, plan.grace, signals);
                    break Outcome::Failed(status.ok().and_then(|s| s.code()));
                }
                if ranks.iter().all(|r| r.reaped) {
                    // Whatever the ranks left running in their groups goes too.
                    stop(&mut ranks, &exits, libc::SIGTERM, plan.grace, signals);
                    break Outcome::Success;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Outcome::Success,
        }
    };
    // Output still in the pipes is forwarded before the launcher says anything more; a pipe
    // held open by a process that left its group is not waited for.
    let all: Vec<usize> = (0..plan.nproc).collect();
    drain(&done, &mut open, &all, Instant::now() + DRAIN);
    Ok(outcome)
}
