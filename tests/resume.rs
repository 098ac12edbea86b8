//! Checkpoints and resume with real processes: a run killed (SIGKILL) after its step-20
//! checkpoint and resumed (`resume_from_checkpoint: auto`) ends exactly where an
//! uninterrupted 40-step run ends — losses and final adapter bit for bit — with 1 rank and
//! with 2 ranks; a 2-rank checkpoint resumed with 1 and with 4 ranks (same global batch,
//! experts re-partitioned by global index) follows the 2-rank run within 1e-5 relative
//! (summation order differs between world sizes, as in tests/dist_train.rs).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const DEFAULT: &str = include_str!("../configs/tiny-cpu.yaml");
const GLOBAL_ROWS: usize = 12;

fn config(dir: &Path, world: usize) -> PathBuf {
    let text = DEFAULT
        .replace(
            "output_dir: outputs/tiny-cpu",
            &format!("output_dir: {}", dir.join("out").display()),
        )
        .replace("max_steps: 300", "max_steps: 40")
        .replace(
            "micro_batch_size: 8",
            &format!("micro_batch_size: {}", GLOBAL_ROWS / world),
        )
        .replace("sequence_len: 128", "sequence_len: 64")
        .replace("logging_steps: 10", "logging_steps: 1")
        .replace("eval_steps: 100", "eval_steps: 40")
        .replace("save_steps: 100", "save_steps: 20")
        .replace("warmup_steps: 20", "warmup_steps: 4")
        + "pad_to_sequence_len: true\nresume_from_checkpoint: auto\n";
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(dir: &Path, world: usize) -> Child {
    let cfg = config(dir, world);
    start_with(dir, world, &cfg)
}

fn start_with(dir: &Path, world: usize, cfg: &Path) -> Child {
    start_env(dir, world, cfg, &[])
}

fn start_env(dir: &Path, world: usize, cfg: &Path, env: &[(&str, &str)]) -> Child {
    let mut c = if world == 1 {
        Command::new(env!("CARGO_BIN_EXE_moeq"))
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_moeq-launch"));
        c.args([
            "--nproc",
            &world.to_string(),
            "--",
            env!("CARGO_BIN_EXE_moeq"),
        ]);
        c
    };
    c.args(["train", "--config"])
        .arg(cfg)
        .envs(env.iter().copied())
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(std::process::Stdio::null())
        // To a file: a pipe nobody reads while the run is killed could fill and stall it.
        .stderr(stderr_file(dir))
        .spawn()
        .unwrap()
}

fn stderr_file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap()
}

fn finish(mut child: Child, dir: &Path, what: &str) {
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{what}:\n{}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
    );
}

/// Starts a run and kills it (SIGKILL; with the launcher, its ranks die with it) as soon as
/// its step-20 checkpoint is complete.
fn run_killed_after_checkpoint(dir: &Path, world: usize) {
    let mut child = start(dir, world);
    let marker = dir.join("out/checkpoint-20/COMPLETE");
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before the end");
    // Children of the launcher go with it.
    std::thread::sleep(Duration::from_millis(300));
}

/// Loss per step from metrics.jsonl; a resumed run appends, so later records win.
fn losses(dir: &Path) -> Vec<f64> {
    let mut by_step = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(l).unwrap();
        if let (Some(s), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            by_step.insert(s, loss);
        }
    }
    by_step.into_values().collect()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("out/adapter_model.safetensors")).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A 2-rank run's checkpoints keep the expert adapters and moments in one part per rank
/// (experts 0..4 and 4..8 of 8), not in the whole files; read as an adapter, its step-20
/// checkpoint is the 1-rank run's (whole files) within 1e-4 of each tensor's largest value —
/// the two runs differ by summation order only (1e-5 in the losses), a misplaced expert by
/// the whole value.
fn assert_split(out: &Path, one_rank_out: &Path) {
    let ckpt = out.join("checkpoint-20");
    let mut parts: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("experts-"))
        .collect();
    parts.sort();
    assert_eq!(
        parts,
        [
            "experts-00000-00004-of-00008.safetensors",
            "experts-00004-00008-of-00008.safetensors"
        ]
    );
    let names = |f: &Path| -> Vec<String> {
        let bytes = std::fs::read(f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.names().into_iter().map(String::from).collect()
    };
    let whole = names(&ckpt.join("adapter_model.safetensors"));
    assert!(whole.iter().all(|n| !n.contains("experts")), "{whole:?}");
    let part = names(&ckpt.join(&parts[0]));
    assert!(
        part.iter().any(|n| n.ends_with("lora_B.weight.exp_avg_sq")),
        "{part:?}"
    );
    let cfg = moeq::synth::config_json(moeq::arch::ModelType::Qwen3Moe, "tiny", None, "bfloat16")
        .unwrap();
    let spec = moeq::arch::ArchSpec::from_json(&cfg, "tiny").unwrap();
    let cpu = &candle_core::Device::Cpu;
    let joined = moeq::lora::peft::load(&ckpt, &spec, cpu).unwrap();
    let single = moeq::lora::peft::load(&one_rank_out.join("checkpoint-20"), &spec, cpu).unwrap();
    let (a, b) = (joined.vars(), single.vars());
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(n, _)| n.contains("experts")));
    for ((n, x), (m, y)) in a.iter().zip(&b) {
        assert_eq!(n, m);
        let v = |t: &candle_core::Var| {
            t.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (x, y) = (v(x), v(y));
        let top = y.iter().fold(0f32, |m, t| m.max(t.abs()));
        let err = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(top > 0.0 && err <= 1e-4 * top, "{n}: {err} of {top}");
    }
}

fn straight_and_resumed(root: &Path, world: usize) -> (PathBuf, PathBuf) {
    let straight = root.join(format!("straight{world}"));
    let resumed = root.join(format!("resumed{world}"));
    std::fs::create_dir_all(&straight).unwrap();
    std::fs::create_dir_all(&resumed).unwrap();
    finish(start(&straight, world), &straight, "straight run");
    run_killed_after_checkpoint(&resumed, world);
    (straight, resumed)
}

#[test]
fn resumed_runs_end_where_uninterrupted_runs_end() {
    let root = tempfile::tempdir().unwrap();
    for world in [1, 2] {
        let (straight, resumed) = straight_and_resumed(root.path(), world);
        let interrupted = root.path().join(format!("interrupted{world}"));
        copy_dir(&resumed, &interrupted);
        finish(start(&resumed, world), &resumed, "resumed run");
        let (a, b) = (losses(&straight), losses(&resumed));
        assert_eq!(a.len(), 40);
        assert_eq!(a, b, "world {world}: losses of the resumed run");
        assert_eq!(
            adapter_bytes(&straight),
            adapter_bytes(&resumed),
            "world {world}: final adapter"
        );
        let log = std::fs::read_to_string(resumed.join("out/moeq.log")).unwrap();
        assert!(
            log.contains("resuming from") && log.contains("(step 20)"),
            "{log}"
        );
        // The steps logged after the checkpoint by the killed run are replaced, not repeated.
        let records = std::fs::read_to_string(resumed.join("out/metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .count();
        assert_eq!(records, 40, "world {world}: one loss record per step");
        if world == 2 {
            assert_split(&straight.join("out"), &root.path().join("straight1/out"));
            // The 2-rank checkpoint on 1 and 4 ranks: the same global batch of 12 rows.
            for other in [1, 4] {
                let dir = root.path().join(format!("w2-on-{other}"));
                copy_dir(&interrupted, &dir);
                finish(start(&dir, other), &dir, "resumed on another world size");
                let c = losses(&dir);
                assert_eq!(c.len(), 40);
                for (step, (x, y)) in c.iter().zip(&a).enumerate().skip(20) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs(),
                        "2 ranks resumed on {other}, step {}: {x} vs {y}",
                        step + 1
                    );
                }
            }
        }
    }
}

#[test]
fn incomplete_checkpoints_are_ignored_and_removed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    run_killed_after_checkpoint(&dir, 1);
    // A later checkpoint whose write was interrupted: files but no marker, and a temporary dir.
    let fake = dir.join("out/checkpoint-30");
    copy_dir(&dir.join("out/checkpoint-20"), &fake);
    std::fs::remove_file(fake.join("COMPLETE")).unwrap();
    std::fs::write(fake.join("adapter_model.safetensors"), b"truncated").unwrap();
    std::fs::create_dir_all(dir.join("out/.checkpoint-35.tmp")).unwrap();
    // Another tool's checkpoint in the same output_dir is not moeq's to remove.
    let foreign = dir.join("out/checkpoint-99");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("pytorch_model.bin"), b"not ours").unwrap();
    finish(start(&dir, 1), &dir, "resume past an incomplete checkpoint");
    assert!(!fake.exists(), "the incomplete checkpoint was removed");
    assert!(!dir.join("out/.checkpoint-35.tmp").exists());
    assert!(
        foreign.join("pytorch_model.bin").exists(),
        "a foreign checkpoint was removed"
    );
    let log = std::fs::read_to_string(dir.join("out/moeq.log")).unwrap();
    assert!(
        log.contains("(step 20)"),
        "resumed from the complete one: {log}"
    );
    assert_eq!(losses(&dir).len(), 40);
}

/// PIDs of the processes whose parent is `pid` and whose environment has `RANK=<rank>`.
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 4 (after the parenthesised name) is the parent pid.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A rank killed with SIGKILL mid-run: the launcher names it, stops the other rank, restarts
/// the group (`--max-restarts 1`), which resumes from the last complete checkpoint, and the
/// job ends with the adapter of an uninterrupted run, bit for bit.
#[test]
fn a_killed_rank_restarts_the_group_from_the_last_checkpoint() {
    for world in [2, 4] {
        killed_rank_restart(world);
    }
}

fn killed_rank_restart(world: usize) {
    let root = tempfile::tempdir().unwrap();
    let straight = root.path().join("straight");
    std::fs::create_dir_all(&straight).unwrap();
    finish(start(&straight, world), &straight, "straight run");

    let dir = root.path().join("restarted");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, world);
    let child = Command::new(env!("CARGO_BIN_EXE_moeq-launch"))
        .args([
            "--nproc",
            &world.to_string(),
            "--max-restarts",
            "1",
            "--grace-seconds",
            "5",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_moeq"))
        .args(["train", "--config"])
        .arg(&cfg)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marker = dir.join("out/checkpoint-20/COMPLETE");
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = rank_pid(child.id(), 1).expect("rank 1 is running");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "world {world}: {err}");
    assert!(err.contains("rank 1 failed first"), "{err}");
    assert!(err.contains("restarting the group"), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(
        adapter_bytes(&straight),
        adapter_bytes(&dir),
        "final adapter after the restart"
    );
    assert_eq!(losses(&straight), losses(&dir));
}

/// Every directory that looks complete must read completely: the adapter and the optimizer
/// state parse as safetensors with every tensor's bytes, the state parses as JSON.
fn assert_complete_ones_are_whole(out: &Path) -> usize {
    let mut complete = 0;
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("checkpoint-") || !e.path().join("COMPLETE").exists() {
            continue;
        }
        complete += 1;
        for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
            let bytes = std::fs::read(e.path().join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|err| panic!("{name}/{f} is marked complete but corrupt: {err}"));
            assert!(!st.is_empty(), "{name}/{f}");
        }
        let state = std::fs::read_to_string(e.path().join("trainer_state.json")).unwrap();
        let v: Value = serde_json::from_str(&state).unwrap();
        assert_eq!(
            v["step"].as_u64().map(|s| format!("checkpoint-{s}")),
            Some(name.clone())
        );
        serde_json::from_str::<Value>(
            &std::fs::read_to_string(e.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
    }
    complete
}

/// SIGKILL at 20 random moments of a run that checkpoints every step: never a checkpoint that
/// looks complete but is not, and each restart resumes from the newest complete one.
#[test]
fn kill_during_checkpoint_writes_never_leaves_a_corrupt_complete_checkpoint() {
    use rand::{Rng, SeedableRng};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, 1);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("save_steps: 20", "save_steps: 1")
        // Far more steps than 20 runs of at most 2.5 s reach (≈ 20 steps/s on an idle machine:
        // 400 were done by the 18th kill once), so every kill lands mid-run.
        .replace("max_steps: 40", "max_steps: 4000")
        + "save_total_limit: 3\n";
    std::fs::write(&cfg, text).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut newest_before = 0u64;
    for kill in 0..20 {
        let mut child = start_with(&dir, 1, &cfg);
        let wait = Duration::from_millis(rng.random_range(600..2500));
        std::thread::sleep(wait);
        assert!(
            child.try_wait().unwrap().is_none(),
            "kill {kill}: the run ended early"
        );
        child.kill().unwrap();
        let _ = child.wait();
        let out = dir.join("out");
        assert_complete_ones_are_whole(&out);
        let newest = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("COMPLETE").exists())
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("checkpoint-")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        assert!(newest >= newest_before, "kill {kill}: progress went back");
        if newest_before > 0 {
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
            assert!(
                log.contains(&format!(
                    "checkpoint-{newest_before} (step {newest_before})"
                )),
                "kill {kill}: the run did not resume from checkpoint-{newest_before}"
            );
        }
        newest_before = newest;
    }
    assert!(
        newest_before > 0,
        "no checkpoint was completed in 20 runs: {}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
    );
}

/// 8-bit AdamW (`adamw_bnb_8bit`) checkpoints resume like fp32 ones: a run resumed from its
/// step-20 checkpoint ends where the uninterrupted run ends, losses and adapter bit for bit, on
/// 1 rank and on 2 — there with whole checkpoints (`MOEQ_GATHER_CHECKPOINTS=1`: expert moments
/// gathered by global expert index by rank 0, then cut again).
#[test]
fn eight_bit_adamw_checkpoints_resume_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    for world in [1, 2] {
        let straight = root.path().join(format!("straight8-{world}"));
        let resumed = root.path().join(format!("resumed8-{world}"));
        std::fs::create_dir_all(&straight).unwrap();
        let cfg = config(&straight, world);
        let text = std::fs::read_to_string(&cfg).unwrap() + "optimizer: adamw_bnb_8bit\n";
        std::fs::write(&cfg, text).unwrap();
        let gather = [("MOEQ_GATHER_CHECKPOINTS", "1")];
        finish(
            start_env(&straight, world, &cfg, &gather),
            &straight,
            "8-bit straight run",
        );
        let whole = std::fs::read_dir(straight.join("out/checkpoint-20"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("experts-"));
        assert!(
            whole,
            "world {world}: expert parts in a gathered checkpoint"
        );
        let log = std::fs::read_to_string(straight.join("out/moeq.log")).unwrap();
        assert!(log.contains("8-bit blockwise moments"), "{log}");
        copy_dir(
            &straight.join("out/checkpoint-20"),
            &resumed.join("out/checkpoint-20"),
        );
        let cfg = std::fs::read_to_string(&cfg).unwrap().replace(
            &straight.display().to_string(),
            &resumed.display().to_string(),
        );
        std::fs::write(resumed.join("config.yaml"), cfg).unwrap();
        finish(
            start_with(&resumed, world, &resumed.join("config.yaml")),
            &resumed,
            "8-bit resumed run",
        );
        let log = std::fs::read_to_string(resumed.join("out/moeq.log")).unwrap();
        assert!(log.contains("(step 20)"), "{log}");
        let (a, b) = (losses(&straight), losses(&resumed));
        assert_eq!((a.len(), b.len()), (40, 20), "world {world}");
        assert_eq!(a[20..], b[..], "world {world}: losses after the checkpoint");
        assert_eq!(
            adapter_bytes(&straight),
            adapter_bytes(&resumed),
            "world {world}: final adapter"
        );
    }
}
