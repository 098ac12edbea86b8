//! Faults with real processes: non-finite steps are skipped and, past the limit, stop the run
//! with a checkpoint of the last good state; a rank that dies or hangs stops every other rank
//! within the timeout, with the failing rank named.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT: &str = include_str!("../configs/tiny-cpu.yaml");

fn config(dir: &Path, mbs: usize, extra: &str) -> PathBuf {
    config_steps(dir, mbs, 10, extra)
}

fn config_steps(dir: &Path, mbs: usize, steps: usize, extra: &str) -> PathBuf {
    let text = DEFAULT
        .replace(
            "output_dir: outputs/tiny-cpu",
            &format!("output_dir: {}", dir.join("out").display()),
        )
        .replace("max_steps: 300", &format!("max_steps: {steps}"))
        .replace("micro_batch_size: 8", &format!("micro_batch_size: {mbs}"))
        .replace("sequence_len: 128", "sequence_len: 64")
        .replace("logging_steps: 10", "logging_steps: 1")
        .replace("eval_steps: 100", "eval_steps: 10")
        .replace("warmup_steps: 20", "warmup_steps: 2")
        + extra;
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The complete records of metrics.jsonl (read while the trainer may be appending: a last line
/// without its newline is not complete yet).
fn records(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train(cfg: &Path, inject: Option<&str>) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeq"));
    c.args(["train", "--config"]).arg(cfg);
    for k in [
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "MOEQ_INJECT_NONFINITE",
    ] {
        c.env_remove(k);
    }
    if let Some(steps) = inject {
        c.env("MOEQ_INJECT_NONFINITE", steps);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_non_finite_step_is_skipped_and_counted() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path(), 8, "");
    let (code, err) = train(&cfg, Some("3"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("step 3: non-finite loss"), "{err}");
    let r = records(root.path());
    assert!(r.iter().any(|v| v["step"] == 3 && v["skipped"] == true));
    let last = r.iter().rfind(|v| v["loss"].is_number()).unwrap();
    assert_eq!(last["skipped_steps"], 1);
    assert_eq!(last["step"], 10);
    assert!(root.path().join("out/adapter_model.safetensors").exists());
}

#[test]
fn too_many_non_finite_steps_stop_with_a_checkpoint_of_the_last_good_state() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path(), 8, "max_consecutive_skipped_steps: 3\n");
    let (code, err) = train(&cfg, Some("2,4,5,6"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("3 consecutive steps (up to step 6)"), "{err}");
    let ckpt = root.path().join("out/checkpoint-6");
    assert!(ckpt.join("COMPLETE").exists(), "{err}");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["optimizer_step"], 2, "steps 1 and 3 were applied");
    assert!(!root.path().join("out/adapter_model.safetensors").exists());
    // Resuming from it finishes the run.
    let cfg = config(root.path(), 8, "resume_from_checkpoint: auto\n");
    let (code, err) = train(&cfg, None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(step 6)"), "{err}");
    assert!(root.path().join("out/adapter_model.safetensors").exists());
}

/// Two ranks started as srun would start them (no launcher watching over them).
fn start_pair(dir: &Path, extra: &str, heartbeat_timeout: &str) -> Vec<Child> {
    let cfg = config_steps(dir, 4, 200, extra);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (0..2)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_moeq"))
                .args(["train", "--config"])
                .arg(&cfg)
                .env_remove("RANK")
                .env_remove("WORLD_SIZE")
                .env_remove("MOEQ_INJECT_NONFINITE")
                .env("SLURM_PROCID", r.to_string())
                .env("SLURM_LOCALID", r.to_string())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_NODEID", "0")
                .env("SLURM_JOB_NODELIST", "localhost")
                .env("MOEQ_JOB_TOKEN", "faults-test")
                .env("MASTER_PORT", port.to_string())
                .env("MOEQ_HEARTBEAT_TIMEOUT", heartbeat_timeout)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn wait_for_step(dir: &Path, step: u64) {
    let started = Instant::now();
    while !records(dir)
        .iter()
        .any(|v| v["step"].as_u64() >= Some(step))
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step {step}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for rank 0 to exit; returns its exit code, stderr and how long it took.
fn rank0_outcome(child: Child, since: Instant) -> (i32, String, Duration) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
        since.elapsed(),
    )
}

#[test]
fn a_killed_rank_stops_the_others_with_its_name() {
    let root = tempfile::tempdir().unwrap();
    let mut ranks = start_pair(root.path(), "collective_timeout_s: 5\n", "30");
    wait_for_step(root.path(), 2);
    ranks[1].kill().unwrap();
    let killed = Instant::now();
    let _ = ranks[1].wait();
    let r0 = ranks.remove(0);
    let (code, err, took) = rank0_outcome(r0, killed);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("rank 1 lost its connection"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_hung_rank_stops_the_others_within_the_timeout_with_its_name() {
    let root = tempfile::tempdir().unwrap();
    let mut ranks = start_pair(root.path(), "collective_timeout_s: 3\n", "60");
    wait_for_step(root.path(), 2);
    // SIGSTOP: rank 1 is alive (its connections stay open) but makes no progress.
    let pid = ranks[1].id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    let r0 = ranks.remove(0);
    let (code, err, took) = rank0_outcome(r0, stopped);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = ranks[0].wait();
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("still waiting for ranks [1]") || err.contains("rank 1 sent no heartbeat"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3 + 10), "took {took:?}");
}
