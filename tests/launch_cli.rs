//! `moeq-launch` run for real with `sh -c` children: torchrun's variables, prefixed output and
//! log files, the whole group stopped on the first failure, restarts, exit code 2 passed on,
//! signals forwarded, and bad input refused in one line with exit 2.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn launcher(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_moeq-launch"))
        .args(args)
        // The test's own environment must not decide the port or the token.
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("MOEQ_JOB_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the launcher (killing it after `limit`, which fails the test) and collects its
/// output.
fn finish(mut child: Child, start: Instant, limit: Duration) -> Run {
    let pipe = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("moeq-launch still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

fn launch(args: &[&str]) -> Run {
    finish(launcher(args), Instant::now(), Duration::from_secs(30))
}

fn wait_for(paths: &[std::path::PathBuf]) {
    let start = Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{paths:?} never appeared"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn lines(s: &str) -> BTreeSet<&str> {
    s.lines().collect()
}

#[test]
fn ranks_get_torchrun_variables_and_prefixed_output() {
    let r = launch(&[
        "--nproc",
        "3",
        "--",
        "sh",
        "-c",
        r#"echo "$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $MOEQ_LAUNCHED $MASTER_ADDR"; echo "port $MASTER_PORT token $MOEQ_JOB_TOKEN ${#MOEQ_JOB_TOKEN}""#,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let out = lines(&r.stdout);
    for rank in 0..3 {
        assert!(
            out.contains(format!("[rank {rank}] {rank} {rank} 3 3 0 1 127.0.0.1").as_str()),
            "{}",
            r.stdout
        );
    }
    // Port and token: one value for all ranks; the token is 32 hex characters.
    let shared: BTreeSet<&str> = out
        .iter()
        .filter_map(|l| l.split_once("] port ").map(|(_, rest)| rest))
        .collect();
    assert_eq!(shared.len(), 1, "{}", r.stdout);
    let words: Vec<&str> = shared.first().unwrap().split(' ').collect();
    let (port, token, len) = (words[0], words[2], words[3]);
    assert!(port.parse::<u16>().unwrap() > 0);
    assert_eq!(len, "32");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    assert!(
        r.stderr.contains(&format!(
            "moeq-launch: 3 processes on node 0 of 1, master 127.0.0.1:{port}, attempt 0"
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn second_node_ranks_and_given_master() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeq-launch"));
    let out = child
        .args([
            "--nproc-per-node",
            "2",
            "--nnodes",
            "3",
            "--node-rank",
            "1",
            "--master-addr",
            "node0",
            "--master-port",
            "29555",
            "--",
            "sh",
            "-c",
            r#"echo "$RANK $LOCAL_RANK $WORLD_SIZE $GROUP_RANK $MASTER_ADDR:$MASTER_PORT $MOEQ_JOB_TOKEN""#,
        ])
        .env("MOEQ_JOB_TOKEN", "sharedtoken")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        lines(&stdout),
        BTreeSet::from([
            "[rank 2] 2 0 6 1 node0:29555 sharedtoken",
            "[rank 3] 3 1 6 1 node0:29555 sharedtoken",
        ])
    );
}

fn gone(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) != 0 }
}

#[test]
fn first_failure_stops_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Rank 0 dies on SIGTERM; rank 2 ignores it and needs the SIGKILL after the grace period.
    // Rank 1 fails once the others have written their pids (their traps are set by then).
    let script = format!(
        r#"if [ $RANK = 2 ]; then trap "" TERM; fi
        echo $$ > {d}/pid-$RANK.tmp && mv {d}/pid-$RANK.tmp {d}/pid-$RANK
        case $RANK in
          1) while [ ! -e {d}/pid-0 ] || [ ! -e {d}/pid-2 ]; do sleep 0.05; done
             echo "rank one fails" >&2; exit 3;;
          2) while :; do sleep 0.2; done;;
          *) exec sleep 60;;
        esac"#
    );
    let r = launch(&[
        "--nproc",
        "3",
        "--grace-seconds",
        "2",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(15), "{:?}", r.elapsed);
    assert!(
        r.stderr
            .contains("moeq-launch: rank 1 failed first: exit code 3"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("[rank 1] rank one fails"), "{}", r.stderr);
    assert!(!r.stderr.contains("rank 0 failed") && !r.stderr.contains("rank 2 failed"));
    for rank in [0, 2] {
        let pid: i32 = std::fs::read_to_string(dir.path().join(format!("pid-{rank}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid), "rank {rank} (pid {pid}) survived the launcher");
    }
}

#[test]
fn a_rank_killed_by_a_signal_is_reported() {
    let r = launch(&[
        "--nproc",
        "2",
        "--grace-seconds",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ $RANK = 0 ]; then kill -9 $$; fi; exec sleep 60"#,
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("rank 0 failed first: killed by signal 9"),
        "{}",
        r.stderr
    );
}

#[test]
fn exit_code_2_is_passed_on_and_never_restarted() {
    let r = launch(&[
        "--nproc",
        "2",
        "--max-restarts",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ $RANK = 1 ]; then echo "error: bad config" >&2; exit 2; fi; exec sleep 60"#,
    ]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("rank 1 failed first: exit code 2"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("restarting"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    // The failing rank's last words come before the launcher's verdict.
    let said = r.stderr.find("[rank 1] error: bad config").unwrap();
    assert!(
        said < r.stderr.find("failed first").unwrap(),
        "{}",
        r.stderr
    );
}

const FAIL_FIRST_ATTEMPT: &str = r#"if [ "$MOEQ_RESTART_COUNT" = 0 ]; then exit 1; fi
echo "attempt $MOEQ_RESTART_COUNT $TORCHELASTIC_RESTART_COUNT resume=${MOEQ_RESUME_FROM_CHECKPOINT:-none}""#;

#[test]
fn a_failed_group_is_restarted_and_resumes() {
    let r = launch(&[
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--",
        "sh",
        "-c",
        FAIL_FIRST_ATTEMPT,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        lines(&r.stdout),
        BTreeSet::from([
            "[rank 0] attempt 1 1 resume=auto",
            "[rank 1] attempt 1 1 resume=auto"
        ])
    );
    assert!(
        r.stderr
            .contains("moeq-launch: restarting the group (attempt 1 of 1)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("attempt 1\n"), "{}", r.stderr);

    let r = launch(&["--nproc", "2", "--", "sh", "-c", FAIL_FIRST_ATTEMPT]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("failed first: exit code 1"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("restarting"), "{}", r.stderr);
}

#[test]
fn log_dir_gets_each_ranks_unprefixed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs/run1");
    let r = launch(&[
        "--nproc",
        "2",
        "--log-dir",
        logs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        r#"echo "out $RANK"; echo "err $RANK" >&2; printf "no newline $RANK""#,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for rank in 0..2 {
        let log = std::fs::read_to_string(logs.join(format!("rank-{rank}.log"))).unwrap();
        let want = [
            format!("out {rank}"),
            format!("err {rank}"),
            format!("no newline {rank}"),
        ];
        assert_eq!(lines(&log), want.iter().map(|s| s.as_str()).collect());
        assert!(log.ends_with('\n'));
        assert!(r.stdout.contains(&format!("[rank {rank}] out {rank}\n")));
        assert!(r
            .stdout
            .contains(&format!("[rank {rank}] no newline {rank}\n")));
        assert!(r.stderr.contains(&format!("[rank {rank}] err {rank}\n")));
    }
}

#[test]
fn sigterm_is_forwarded_to_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        r#"trap "touch {d}/term-\$RANK; exit 0" TERM; touch {d}/ready-$RANK; sleep 30 & wait"#
    );
    let start = Instant::now();
    let child = launcher(&[
        "--nproc",
        "2",
        "--grace-seconds",
        "5",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    wait_for(&[dir.path().join("ready-0"), dir.path().join("ready-1")]);
    // SAFETY: kill(2) on the launcher this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let r = finish(child, start, Duration::from_secs(30));
    assert_eq!(r.code, Some(143), "{}", r.stderr);
    assert!(dir.path().join("term-0").exists() && dir.path().join("term-1").exists());
    assert!(!r.stderr.contains("restarting"), "{}", r.stderr);
}

/// Bad input: exit 2 and one line, `error: ...` naming the problem.
fn refused(args: &[&str], what: &str) {
    let r = launch(args);
    assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert!(
        r.stderr.contains(what),
        "{args:?}: want '{what}' in {}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let plain = plain.to_str().unwrap();
    let under_file = format!("{plain}/logs");

    refused(&["--nproc", "2", "--"], "no command to launch");
    refused(&["--nproc", "2"], "no command to launch");
    refused(&["--nproc", "0", "--", "true"], "--nproc 0");
    refused(
        &[
            "--nproc",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "2",
            "--",
            "true",
        ],
        "--node-rank 2 with --nnodes 2",
    );
    refused(
        &["--nproc", "1", "--", "moeq-no-such-command", "x"],
        "'moeq-no-such-command' not found on PATH",
    );
    refused(&["--nproc", "1", "--", plain], "is not executable");
    refused(
        &["--nproc", "1", "--log-dir", &under_file, "--", "true"],
        "--log-dir",
    );
    refused(
        &["--nproc", "1", "--nnodes", "2", "--", "true"],
        "export the same MOEQ_JOB_TOKEN on every node",
    );
}

#[test]
fn output_is_whole_lines() {
    // Two ranks each write 200 long lines to stdout at once: no line may be cut or mixed.
    let r = launch(&[
        "--nproc",
        "2",
        "--",
        "sh",
        "-c",
        r#"i=0; while [ $i -lt 200 ]; do echo "r$RANK-$i-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-end"; i=$((i+1)); done"#,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 400);
    for l in r.stdout.lines() {
        let (prefix, rest) = l.split_once("] ").unwrap();
        let rank = prefix.strip_prefix("[rank ").unwrap();
        assert!(
            rest.starts_with(&format!("r{rank}-")) && rest.ends_with("a-end"),
            "{l}"
        );
    }
}
