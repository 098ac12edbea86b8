//! Every input a user controls fails cleanly through `moeq train`: exit code 2, one line that
//! names the file / key / variable and what to do, and no output directory left behind.
//!
//! Each case starts from a valid setup (a synthesized tiny Qwen3-MoE, a JSONL dataset, a
//! config) and breaks one thing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The valid model, synthesized once and copied by the cases that damage it.
fn model_src() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("moeq-bad-input-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = moeq::synth::SynthOptions {
            model_type: moeq::arch::ModelType::Qwen3Moe,
            layout: moeq::synth::DiskLayout::Hub,
            shard_bytes: 200_000,
            ..moeq::synth::SynthOptions::default()
        };
        moeq::synth::write(&opts, &dir).unwrap();
        dir
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

struct Setup {
    root: PathBuf,
    /// Config lines by key, in order; a case replaces or removes entries.
    lines: Vec<(String, String)>,
    env: Vec<(&'static str, String)>,
    /// Replaces the whole config text.
    raw: Option<String>,
    config_path: Option<PathBuf>,
}

impl Setup {
    fn new(root: &Path) -> Setup {
        let data = root.join("data.jsonl");
        let rows: Vec<String> = (0..40)
            .map(|i| {
                format!("{{\"text\": \"sample {i}: the quick brown fox jumps over the lazy dog\"}}")
            })
            .collect();
        std::fs::write(&data, rows.join("\n") + "\n").unwrap();
        let lines = [
            ("base_model", model_src().display().to_string()),
            ("device", "cpu".into()),
            ("adapter", "qlora".into()),
            ("load_in_4bit", "true".into()),
            ("lora_r", "4".into()),
            ("lora_alpha", "8".into()),
            ("lora_target_modules", "[q_proj, v_proj]".into()),
            (
                "datasets",
                format!("\n  - path: {}\n    type: completion", data.display()),
            ),
            ("sequence_len", "64".into()),
            ("micro_batch_size", "2".into()),
            ("max_steps", "2".into()),
            ("learning_rate", "1.0e-3".into()),
            ("output_dir", root.join("out").display().to_string()),
        ];
        Setup {
            root: root.to_path_buf(),
            lines: lines
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            env: Vec::new(),
            raw: None,
            config_path: None,
        }
    }

    fn set(&mut self, key: &str, value: &str) -> &mut Setup {
        match self.lines.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.lines.push((key.to_string(), value.to_string())),
        }
        self
    }

    fn remove(&mut self, key: &str) -> &mut Setup {
        self.lines.retain(|(k, _)| k != key);
        self
    }

    /// A private copy of the model to damage.
    fn own_model(&mut self) -> PathBuf {
        let dir = self.root.join("model");
        copy_dir(model_src(), &dir);
        self.set("base_model", &dir.display().to_string());
        dir
    }

    fn run(&self) -> (i32, String) {
        let text = self.raw.clone().unwrap_or_else(|| {
            self.lines
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect()
        });
        let cfg = self.root.join("config.yaml");
        std::fs::write(&cfg, text).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_moeq"));
        c.args(["train", "--config"])
            .arg(self.config_path.as_ref().unwrap_or(&cfg));
        for k in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "MOEQ_RESUME_FROM_CHECKPOINT",
            "MOEQ_INJECT_NONFINITE",
        ] {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

type Break = fn(&mut Setup);

fn rewrite(path: &Path, f: impl Fn(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

/// (name, what breaks, a piece of the expected message).
fn cases() -> Vec<(&'static str, Break, &'static str)> {
    vec![
        // --- config ---
        (
            "yaml syntax",
            |s| s.raw = Some("base_model: [unclosed\n".into()),
            "config.yaml",
        ),
        (
            "wrong type",
            |s| {
                s.set("lora_r", "abc");
            },
            "lora_r",
        ),
        (
            "out of range",
            |s| {
                s.set("learning_rate", "5");
            },
            "learning_rate",
        ),
        (
            "unknown key",
            |s| {
                s.set("lora_targt_modules", "[q_proj]");
            },
            "did you mean 'lora_target_modules'",
        ),
        (
            "conflicting keys",
            |s| {
                s.set("warmup_steps", "1").set("warmup_ratio", "0.1");
            },
            "warmup",
        ),
        (
            "zero micro batch",
            |s| {
                s.set("micro_batch_size", "0");
            },
            "micro_batch_size",
        ),
        (
            "no datasets",
            |s| {
                s.remove("datasets");
            },
            "datasets",
        ),
        (
            "val_set_size above 1",
            |s| {
                s.set("val_set_size", "1.5");
            },
            "val_set_size",
        ),
        (
            "lora_dropout above 1",
            |s| {
                s.set("lora_dropout", "2");
            },
            "lora_dropout",
        ),
        (
            "deepspeed",
            |s| {
                s.set("deepspeed", "ds.json");
            },
            "deepspeed",
        ),
        (
            "negative max_steps",
            |s| {
                s.set("max_steps", "-3");
            },
            "max_steps",
        ),
        (
            "bf16 not a choice",
            |s| {
                s.set("bf16", "maybe");
            },
            "bf16",
        ),
        (
            "config file missing",
            |s| s.config_path = Some(s.root.join("nope.yaml")),
            "nope.yaml",
        ),
        (
            "empty config",
            |s| s.raw = Some(String::new()),
            "config.yaml",
        ),
        (
            "cuda in a CPU build",
            |s| {
                s.set("device", "cuda");
            },
            "cuda",
        ),
        (
            "expert_parallel_size without expert_parallel",
            |s| {
                s.set("expert_parallel", "false")
                    .set("expert_parallel_size", "2");
            },
            "expert_parallel_size",
        ),
        (
            "no LoRA target matches",
            |s| {
                s.set("lora_target_modules", "[nothing_like_this]");
            },
            "no LoRA targets matched",
        ),
        // --- model directory ---
        (
            "model dir missing",
            |s| {
                let p = s.root.join("absent").display().to_string();
                s.set("base_model", &p);
            },
            "does not exist",
        ),
        (
            "no config.json",
            |s| {
                let d = s.own_model();
                std::fs::remove_file(d.join("config.json")).unwrap();
            },
            "config.json",
        ),
        (
            "config.json not JSON",
            |s| {
                let d = s.own_model();
                std::fs::write(d.join("config.json"), "{ not json").unwrap();
            },
            "config.json",
        ),
        (
            "unsupported model_type",
            |s| {
                let d = s.own_model();
                rewrite(&d.join("config.json"), |t| {
                    t.replace("\"qwen3_moe\"", "\"llama\"")
                });
            },
            "llama",
        ),
        (
            "missing shard",
            |s| {
                let d = s.own_model();
                std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
            },
            "model-00002-of-00002.safetensors",
        ),
        (
            "truncated shard",
            |s| {
                let d = s.own_model();
                let p = d.join("model-00001-of-00002.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            "model-00001-of-00002.safetensors",
        ),
        (
            "header size lies",
            |s| {
                let d = s.own_model();
                let p = d.join("model-00001-of-00002.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&p, b).unwrap();
            },
            "model-00001-of-00002.safetensors",
        ),
        (
            "unsupported dtype",
            |s| {
                let d = s.own_model();
                let p = d.join("model-00001-of-00002.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let header = String::from_utf8(b[8..8 + n].to_vec())
                    .unwrap()
                    .replace("\"BF16\"", "\"U16\" ");
                b[8..8 + n].copy_from_slice(header.as_bytes());
                std::fs::write(&p, b).unwrap();
            },
            "U16",
        ),
        (
            "shapes inconsistent with config.json",
            |s| {
                let d = s.own_model();
                rewrite(&d.join("config.json"), |t| {
                    t.replace(
                        "\"moe_intermediate_size\": 32",
                        "\"moe_intermediate_size\": 48",
                    )
                });
            },
            "shape",
        ),
        (
            "no weights",
            |s| {
                let d = s.own_model();
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    if e.file_name().to_string_lossy().contains("safetensors") {
                        std::fs::remove_file(e.path()).unwrap();
                    }
                }
            },
            "no safetensors weights",
        ),
        // --- tokenizer ---
        (
            "tokenizer missing",
            |s| {
                let d = s.own_model();
                std::fs::remove_file(d.join("tokenizer.json")).unwrap();
            },
            "tokenizer",
        ),
        (
            "tokenizer corrupt",
            |s| {
                let d = s.own_model();
                std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap();
            },
            "tokenizer.json",
        ),
        (
            "tokenizer larger than the vocabulary",
            |s| {
                let d = s.own_model();
                rewrite(&d.join("tokenizer.json"), |t| {
                    let mut v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    v["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
                    "id": 700, "content": "<|extra|>", "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }));
                    v.to_string()
                });
            },
            "vocab_size is 512",
        ),
        // --- data ---
        (
            "dataset missing",
            |s| {
                let p = s.root.join("absent.jsonl");
                s.set(
                    "datasets",
                    &format!("\n  - path: {}\n    type: completion", p.display()),
                );
            },
            "absent.jsonl",
        ),
        (
            "dataset empty",
            |s| {
                std::fs::write(s.root.join("data.jsonl"), "").unwrap();
            },
            "data.jsonl",
        ),
        (
            "malformed JSONL",
            |s| {
                std::fs::write(
                    s.root.join("data.jsonl"),
                    "{\"text\": \"ok\"}\n{\"text\": oops\n",
                )
                .unwrap();
            },
            "data.jsonl:2",
        ),
        (
            "field missing",
            |s| {
                std::fs::write(s.root.join("data.jsonl"), "{\"body\": \"no text field\"}\n")
                    .unwrap();
            },
            "text",
        ),
        (
            "sequence_len beyond the model",
            |s| {
                s.set("sequence_len", "100000");
            },
            "max_position_embeddings",
        ),
        // --- output directory ---
        (
            "output_dir under a file",
            |s| {
                std::fs::write(s.root.join("a-file"), "x").unwrap();
                let p = s.root.join("a-file/out").display().to_string();
                s.set("output_dir", &p);
            },
            "not a directory",
        ),
        // --- resume ---
        (
            "resume path missing",
            |s| {
                let p = s.root.join("no-checkpoint").display().to_string();
                s.set("resume_from_checkpoint", &p);
            },
            "does not exist",
        ),
        (
            "resume without marker",
            |s| {
                let p = s.root.join("ckpt");
                std::fs::create_dir_all(&p).unwrap();
                s.set("resume_from_checkpoint", &p.display().to_string());
            },
            "COMPLETE",
        ),
        (
            "resume from another model",
            |s| {
                let p = s.root.join("ckpt");
                std::fs::create_dir_all(&p).unwrap();
                std::fs::write(p.join("COMPLETE"), "ok\n").unwrap();
                std::fs::write(p.join("trainer_state.json"), r#"{"step": 5, "optimizer_step": 5, "tokens_seen": 10, "cursor": {"epoch": 0, "position": 10}, "world_size": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "seed": 0, "model_type": "mixtral", "num_layers": 2, "num_experts": 4, "hidden_size": 64}"#).unwrap();
                s.set("resume_from_checkpoint", &p.display().to_string());
            },
            "was written for a mixtral model",
        ),
        // --- pre-quantized checkpoint ---
        (
            "pre-quantized with other settings",
            |s| {
                let q = s.root.join("quantized");
                let st = Command::new(env!("CARGO_BIN_EXE_moeq"))
                    .args(["quantize", "--model"])
                    .arg(model_src())
                    .arg("--out")
                    .arg(&q)
                    .args(["--blocksize", "128"])
                    .status()
                    .unwrap();
                assert!(st.success());
                s.set("base_model", &q.display().to_string());
            },
            "pre-quantized",
        ),
        // --- launch environment ---
        (
            "WORLD_SIZE without RANK",
            |s| s.env.push(("WORLD_SIZE", "2".into())),
            "RANK",
        ),
        (
            "RANK beyond WORLD_SIZE",
            |s| {
                s.env
                    .extend([("RANK", "3".into()), ("WORLD_SIZE", "2".into())])
            },
            "disagree",
        ),
        (
            "SLURM_PROCID without SLURM_NTASKS",
            |s| s.env.push(("SLURM_PROCID", "0".into())),
            "SLURM_NTASKS",
        ),
        (
            "bad MASTER_PORT",
            |s| {
                s.env.extend([
                    ("RANK", "0".into()),
                    ("WORLD_SIZE", "1".into()),
                    ("MASTER_PORT", "http".into()),
                ])
            },
            "MASTER_PORT",
        ),
    ]
}

#[test]
fn every_bad_input_exits_2_with_one_clear_line_and_writes_nothing() {
    let all = cases();
    assert!(all.len() >= 40, "{} cases", all.len());
    let mut failures = Vec::new();
    for (name, brk, expect) in all {
        let root = tempfile::tempdir().unwrap();
        let mut s = Setup::new(root.path());
        brk(&mut s);
        let (code, err) = s.run();
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        let problem = if code != 2 {
            Some(format!("exit code {code}"))
        } else if errors.len() != 1 {
            Some(format!("{} error lines", errors.len()))
        } else if !errors[0].contains(expect) {
            Some(format!("message lacks '{expect}'"))
        } else if root.path().join("out").exists() || root.path().join("a-file/out").exists() {
            Some("an output directory was created".to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            failures.push(format!(
                "{name}: {p}\n    {}",
                err.trim().replace('\n', "\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// output_dir on a read-only and on a nearly full filesystem (tmpfs mounts). Needs the
/// privilege to mount, which the CI container has; without it the test says so and returns.
#[test]
fn output_dir_on_a_read_only_or_full_filesystem() {
    for (opts, expect) in [
        ("ro,size=1m", "cannot write in"),
        ("size=64k", "MB free on its filesystem"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!(
                "cannot mount a tmpfs here (no privilege): read-only/full output_dir not checked"
            );
            return;
        }
        let mut s = Setup::new(root.path());
        s.set("output_dir", &mnt.join("out").display().to_string());
        let (code, err) = s.run();
        let leftover: Vec<_> = std::fs::read_dir(&mnt)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let _ = Command::new("umount").arg(&mnt).status();
        assert_eq!(code, 2, "{opts}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains(expect), "{opts}: {}", errors[0]);
        assert!(leftover.is_empty(), "{opts}: left {leftover:?}");
    }
}

/// A config with several problems reports each on its own `error:` line, exit 2, no output.
#[test]
fn every_config_problem_is_reported_at_once() {
    let root = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(root.path());
    setup
        .set("lora_r", "sixteen")
        .set("learning_rate", "-1")
        .set("lr_sheduler", "cosine");
    let (code, err) = setup.run();
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    for text in [
        "'lora_r' must be an integer",
        "'learning_rate' must be in",
        "unknown key 'lr_sheduler'",
    ] {
        assert!(lines.iter().any(|l| l.contains(text)), "{text}\n{err}");
    }
    assert!(!root.path().join("out").exists());
}
