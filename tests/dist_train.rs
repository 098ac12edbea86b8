//! Data + expert parallel training with real processes through `moeq-launch` and the CPU
//! collective: 1, 2, 3 and 4 ranks on the tiny Qwen3-MoE (8 experts: ranks own 8, 4+4,
//! 3+3+2, 2+2+2+2) train the same 20 steps as one process.
//!
//! The global batch is the same in every run (12 rows per step: micro_batch_size 12/W on each
//! of W ranks), so the runs differ only in the order of floating-point sums (each rank sums
//! its own rows, the ranks' sums are added after). Tolerances, f32:
//! - NF4 codes and statistics: identical bytes (quantization is deterministic and the
//!   statistics are computed from the all-gathered absmax).
//! - Loss per step: 1e-5 relative (observed ~1e-7).
//! - Adapters after 10 and 20 steps: ‖a − b‖ / ‖b‖ ≤ 1e-5 per tensor (observed ≤ 4e-6; Adam
//!   divides by √v, so summation-order noise in a gradient moves an element by a relative
//!   amount, not an absolute one).

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT: &str = include_str!("../configs/tiny-cpu.yaml");
const GLOBAL_ROWS: usize = 12;

/// The default config for `world` ranks; each line of `extra` replaces the line of its key, or
/// is added.
fn config(dir: &Path, world: usize, extra: &str) -> PathBuf {
    let mut base = DEFAULT.to_string();
    let mut added = String::new();
    for line in extra.lines() {
        let key = line.split(':').next().unwrap();
        match base.lines().find(|l| l.starts_with(&format!("{key}:"))) {
            Some(old) => base = base.replace(&old.to_string(), line),
            None => added += &format!("{line}\n"),
        }
    }
    let text = base
        .replace("output_dir: outputs/tiny-cpu", &format!("output_dir: {}", dir.join("out").display()))
        .replace("max_steps: 300", "max_steps: 20")
        .replace("micro_batch_size: 8", &format!("micro_batch_size: {}", GLOBAL_ROWS / world))
        .replace("sequence_len: 128", "sequence_len: 64")
        .replace("logging_steps: 10", "logging_steps: 1")
        .replace("eval_steps: 100", "eval_steps: 20")
        .replace("save_steps: 100", "save_steps: 10")
        .replace("warmup_steps: 20", "warmup_steps: 2")
        // Rows padded to the full length in every run, so the per-expert counts (which
        // include padding rows) can be compared too.
        + "pad_to_sequence_len: true\n"
        + &added;
    assert!(text.contains("max_steps: 20") && text.contains("save_steps: 10"));
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `world` ranks through moeq-launch (world 0: one plain process, no launcher) with
/// `extra` config lines; returns the run directory.
fn run(root: &Path, world: usize, extra: &str) -> PathBuf {
    let dir = root.join(format!(
        "w{world}{}",
        if extra.is_empty() { "" } else { "-x" }
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, world.max(1), extra);
    let mut cmd = if world == 0 {
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
    let out = cmd
        .args(["train", "--config"])
        .arg(&cfg)
        .env("MOEQ_NF4_DIGEST", dir.join("nf4"))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "world {world} failed:\n{err}");
    dir
}

/// Rank 0's log says whether it joined a job.
fn joined(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("out/moeq.log"))
        .unwrap()
        .contains("joined the job as rank 0")
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// The adapter tensors of an `adapter_model.safetensors`, with those of expert parts beside it
/// (checkpoints of expert-parallel runs) joined in.
fn adapter(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut tensors = moeq::lora::peft::read_f32(path).unwrap();
    let parts = moeq::lora::parts::join(path.parent().unwrap()).unwrap();
    for (name, t) in parts.unwrap_or_default() {
        if !name.ends_with(".exp_avg") && !name.ends_with(".exp_avg_sq") {
            assert!(tensors.insert(name.clone(), t).is_none(), "{name} twice");
        }
    }
    tensors
        .into_iter()
        .map(|(name, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (name, (t.dims().to_vec(), v))
        })
        .collect()
}

fn assert_adapters_close(a: &Path, b: &Path, what: &str) {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, (shape, x)) in &a {
        let (shape_b, y) = &b[name];
        assert_eq!(shape, shape_b, "{what} {name}");
        let norm = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| ((p - q) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 0.0, "{what} {name}: all zero");
        assert!(
            diff <= 1e-5 * norm,
            "{what} {name}: relative difference {:.2e}",
            diff / norm
        );
    }
}

/// Per parameter: statistics digest and, per global expert (or whole), the codes' digest.
fn nf4(dir: &Path, world: usize) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    nf4_of(dir, world, 0..world)
}

/// `nf4` over the ranks `ranks` of a world of `world` (one expert-parallel group).
fn nf4_of(
    dir: &Path,
    world: usize,
    ranks: std::ops::Range<usize>,
) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    let mut out: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
    for r in ranks {
        let text =
            std::fs::read_to_string(dir.join(format!("nf4/nf4-rank{r}-of-{world}.json"))).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        for (name, e) in v.as_object().unwrap() {
            let stats = e["stats"].as_str().unwrap().to_string();
            let entry = out
                .entry(name.clone())
                .or_insert_with(|| (stats.clone(), BTreeMap::new()));
            assert_eq!(
                entry.0, stats,
                "{name}: statistics differ between ranks of world {world}"
            );
            match e.get("experts") {
                Some(ex) => {
                    for (k, d) in ex.as_object().unwrap() {
                        let prev = entry.1.insert(k.clone(), d.as_str().unwrap().to_string());
                        assert!(prev.is_none(), "{name}: expert {k} held by two ranks");
                    }
                }
                None => {
                    entry
                        .1
                        .insert("all".into(), e["codes"].as_str().unwrap().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn one_to_four_ranks_train_like_one_process() {
    let root = tempfile::tempdir().unwrap();
    let one = run(root.path(), 0, "");
    assert!(!joined(&one));
    let base_losses = losses(&one);
    assert_eq!(base_losses.len(), 20);
    assert!(base_losses[19] < base_losses[0], "{base_losses:?}");
    let base_nf4 = nf4(&one, 1);
    assert!(
        base_nf4.values().any(|(_, e)| e.len() == 8),
        "expert parameters digested per expert"
    );
    // One rank through the launcher takes the distributed path too (exchanges with itself).
    for world in [1, 2, 3, 4] {
        let dir = run(root.path(), world, "");
        assert_eq!(
            nf4(&dir, world),
            base_nf4,
            "NF4 bytes differ with {world} ranks"
        );
        let l = losses(&dir);
        assert_eq!(l.len(), base_losses.len());
        for (step, (a, b)) in l.iter().zip(&base_losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "world {world} step {}: loss {a} vs {b}",
                step + 1
            );
        }
        assert_adapters_close(
            &dir.join("out/adapter_model.safetensors"),
            &one.join("out/adapter_model.safetensors"),
            &format!("world {world} final"),
        );
        assert_adapters_close(
            &dir.join("out/checkpoint-10/adapter_model.safetensors"),
            &one.join("out/checkpoint-10/adapter_model.safetensors"),
            &format!("world {world} step 10"),
        );
        // Per-expert load is global: the same counts as one process sees.
        let last = |d: &Path| -> Value {
            std::fs::read_to_string(d.join("out/metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .rfind(|v| v["loss"].is_number())
                .unwrap()
        };
        assert_eq!(last(&dir)["expert_tokens"], last(&one)["expert_tokens"]);
        assert_eq!(last(&dir)["world_size"], world);
        assert!(joined(&dir), "world {world}: rank 0 joined a job");
    }
    // Data parallel only: every rank holds all experts, expert gradients are summed too.
    let dir = run(root.path(), 2, "expert_parallel: false\n");
    for (step, (a, b)) in losses(&dir).iter().zip(&base_losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "expert_parallel false, step {}: loss {a} vs {b}",
            step + 1
        );
    }
    assert_adapters_close(
        &dir.join("out/adapter_model.safetensors"),
        &one.join("out/adapter_model.safetensors"),
        "expert_parallel false",
    );
}

/// Latent attention and grouped sigmoid routing (DeepSeek-V3's tiny preset: 8 experts in 4
/// groups, a dense first layer, a shared expert) over 2 ranks of 4 experts each train like one
/// process, to the same NF4 bytes (tolerances as above).
#[test]
fn two_ranks_train_deepseek_v3_like_one_process() {
    let root = tempfile::tempdir().unwrap();
    let extra = "base_model: synth://deepseek_v3/tiny?seed=0\n\
                 lora_target_modules: [q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj, down_proj]";
    let one = run(&root.path().join("one"), 0, extra);
    let two = run(&root.path().join("two"), 2, extra);
    assert_eq!(nf4(&two, 2), nf4(&one, 1), "NF4 bytes differ with 2 ranks");
    let (a, b) = (losses(&two), losses(&one));
    assert_eq!(a.len(), 20);
    assert!(b[19] < b[0], "{b:?}");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs(),
            "step {}: loss {x} vs {y}",
            step + 1
        );
    }
    assert_adapters_close(
        &two.join("out/adapter_model.safetensors"),
        &one.join("out/adapter_model.safetensors"),
        "deepseek_v3, 2 ranks",
    );
}

/// Granite's µP multipliers and experts fused under its own names, FlexOlmo's post-norm layers
/// and gpt-oss's biased experts (each rank adds its own experts' biases) and windowed attention
/// with sinks, over 2 ranks of 4 experts each train like one process, to the same NF4 bytes
/// (tolerances as above); the expert-parallel checkpoint's adapter carries Granite's PEFT names.
#[test]
fn two_ranks_train_granite_flex_olmo_and_gpt_oss_like_one_process() {
    for arch in [
        "granitemoe",
        "flex_olmo",
        "gpt_oss",
        "llama4_text",
        "qwen3_next",
        "qwen3_5_moe_text",
    ] {
        let root = tempfile::tempdir().unwrap();
        let extra = format!("base_model: synth://{arch}/tiny?seed=0");
        let one = run(&root.path().join("one"), 0, &extra);
        let two = run(&root.path().join("two"), 2, &extra);
        assert_eq!(
            nf4(&two, 2),
            nf4(&one, 1),
            "{arch}: NF4 bytes differ with 2 ranks"
        );
        let (a, b) = (losses(&two), losses(&one));
        assert_eq!(a.len(), 20);
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "{arch} step {}: loss {x} vs {y}",
                step + 1
            );
        }
        let adapter = two.join("out/adapter_model.safetensors");
        assert_adapters_close(&adapter, &one.join("out/adapter_model.safetensors"), arch);
        if arch == "granitemoe" {
            let bytes = std::fs::read(&adapter).unwrap();
            let names = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .names()
                .join(" ");
            assert!(
                names.contains("layers.0.block_sparse_moe.experts.base_layer.lora_A"),
                "{names}"
            );
            assert!(!names.contains(".mlp."), "{names}");
        }
    }
}

/// `expert_parallel_size` smaller than the world: 4 ranks as 2 groups of 2 (experts 4 + 4 in
/// each) and 6 ranks as 2 groups of 3 (3 + 3 + 2): each group quantizes every expert once, to
/// the same bytes as one process, and the run trains like one process (tolerances as above;
/// the replicas' expert gradients are summed).
#[test]
fn expert_parallel_groups_train_like_one_process() {
    let root = tempfile::tempdir().unwrap();
    let one = run(root.path(), 0, "");
    let base_losses = losses(&one);
    let base_nf4 = nf4(&one, 1);
    for (world, size) in [(4, 2), (6, 3)] {
        let at = root.path().join(format!("groups-{world}"));
        let dir = run(&at, world, &format!("expert_parallel_size: {size}"));
        for g in 0..world / size {
            assert_eq!(
                nf4_of(&dir, world, g * size..(g + 1) * size),
                base_nf4,
                "world {world}, group {g}: NF4 bytes differ"
            );
        }
        for (step, (a, b)) in losses(&dir).iter().zip(&base_losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "world {world}, groups of {size}, step {}: loss {a} vs {b}",
                step + 1
            );
        }
        assert_eq!(losses(&dir).len(), base_losses.len());
        for file in [
            "adapter_model.safetensors",
            "checkpoint-10/adapter_model.safetensors",
        ] {
            assert_adapters_close(
                &dir.join("out").join(file),
                &one.join("out").join(file),
                &format!("world {world}, groups of {size}: {file}"),
            );
        }
        let log = std::fs::read_to_string(dir.join("out/moeq.log")).unwrap();
        assert!(
            log.contains(&format!("{} groups of {size} ranks", world / size)),
            "{log}"
        );
    }
    // A size that does not divide the ranks stops before training, naming the fix.
    let at = root.path().join("bad");
    std::fs::create_dir_all(&at).unwrap();
    let cfg = config(&at, 3, "expert_parallel_size: 2");
    let out = Command::new(env!("CARGO_BIN_EXE_moeq-launch"))
        .args([
            "--nproc",
            "3",
            "--",
            env!("CARGO_BIN_EXE_moeq"),
            "train",
            "--config",
        ])
        .arg(&cfg)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("expert_parallel_size 2 does not divide the 3 ranks"),
        "{err}"
    );
}

/// A 16-bit base (`adapter: lora`, `load_in_4bit: false`) under expert parallelism: each of
/// 3 ranks reads only its experts (3+3+2) unquantized, and the run trains like one process
/// (tolerances as above) — and not like the 4-bit base (its first loss differs).
#[test]
fn sixteen_bit_base_trains_like_one_process_on_three_ranks() {
    let root = tempfile::tempdir().unwrap();
    let sixteen = "adapter: lora\nload_in_4bit: false";
    let quantized = losses(&run(root.path(), 0, ""));
    let sixteen_root = root.path().join("16");
    let one = run(&sixteen_root, 0, sixteen);
    let three = run(&sixteen_root, 3, sixteen);
    let (l1, l3) = (losses(&one), losses(&three));
    assert_eq!(l1.len(), 20);
    assert!(l1[19] < l1[0], "{l1:?}");
    assert_ne!(
        l1[0], quantized[0],
        "the 16-bit base trained like the 4-bit one"
    );
    for (step, (a, b)) in l3.iter().zip(&l1).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "16-bit, 3 ranks, step {}: loss {a} vs {b}",
            step + 1
        );
    }
    assert_adapters_close(
        &three.join("out/adapter_model.safetensors"),
        &one.join("out/adapter_model.safetensors"),
        "16-bit, 3 ranks",
    );
    let log = std::fs::read_to_string(three.join("out/moeq.log")).unwrap();
    assert!(log.contains("unquantized"), "{log}");
}

/// `moeq train` started directly by SLURM (`srun`, one task per GPU) finds its rank, the world
/// and the master from SLURM's variables alone; without MOEQ_JOB_TOKEN the store's token is
/// derived from the job id. Same for torchrun's variables. Two tasks here, as two processes.
#[test]
fn ranks_started_by_srun_or_torchrun_find_each_other() {
    let root = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (launcher, vars) in [
        (
            "srun",
            vec![
                ("SLURM_PROCID", "{r}"),
                ("SLURM_LOCALID", "{r}"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NTASKS_PER_NODE", "2"),
                ("SLURM_NODEID", "0"),
                ("SLURM_JOB_NODELIST", "localhost"),
                ("SLURM_JOB_ID", "4242"),
            ],
        ),
        (
            "torchrun",
            vec![
                ("RANK", "{r}"),
                ("LOCAL_RANK", "{r}"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("TORCHELASTIC_RUN_ID", "run-7"),
            ],
        ),
    ] {
        let dir = root.path().join(launcher);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, 2, "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("max_steps: 20", "max_steps: 3")
            .replace("save_steps: 10", "save_steps: 100")
            .replace("eval_steps: 20", "eval_steps: 3");
        std::fs::write(&cfg, text).unwrap();
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut c = Command::new(env!("CARGO_BIN_EXE_moeq"));
                c.args(["train", "--config"]).arg(&cfg);
                for k in [
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                    "LOCAL_WORLD_SIZE",
                    "MOEQ_JOB_TOKEN",
                    "SLURM_PROCID",
                    "TORCHELASTIC_RUN_ID",
                ] {
                    c.env_remove(k);
                }
                for (k, v) in &vars {
                    c.env(k, v.replace("{r}", &r.to_string()));
                }
                c.env("MASTER_PORT", port.to_string());
                c.stderr(std::process::Stdio::piped());
                c.spawn().unwrap()
            })
            .collect();
        for (r, ch) in children.into_iter().enumerate() {
            let out = ch.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{launcher} rank {r}:\n{err}");
            assert!(
                err.contains(&format!("joined the job as rank {r} of 2")),
                "{err}"
            );
            assert!(err.contains("MOEQ_JOB_TOKEN is not set"), "{err}");
        }
        let l = losses(&dir);
        assert_eq!(l.len(), 3, "{launcher}");
        assert!(dir.join("out/adapter_model.safetensors").exists());
    }
}
