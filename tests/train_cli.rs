//! `moeq train` end to end on the CPU: the embedded default learns its task and draws its
//! curves, runs are deterministic, and bad LoRA targets are refused.

mod common;
use common::moeq;
use serde_json::Value;
use std::path::Path;

const DEFAULT: &str = include_str!("../configs/tiny-cpu.yaml");

/// The default config with `output_dir` in `dir` and top-level keys replaced by `extra`'s.
fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let overridden: Vec<&str> = extra.lines().filter_map(|l| l.split(':').next()).collect();
    let kept: Vec<&str> = DEFAULT
        .lines()
        .filter(|l| !overridden.iter().any(|k| l.starts_with(&format!("{k}:"))))
        .collect();
    let text = kept.join("\n").replace(
        "output_dir: outputs/tiny-cpu",
        &format!("output_dir: {}", dir.join("out").display()),
    );
    assert!(
        text.contains(&dir.display().to_string()),
        "default config has an output_dir line"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("{text}\n{extra}\n")).unwrap();
    path
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Acceptance: the embedded default (300 steps) lowers the training loss by at least half and
/// reaches a held-out token accuracy far above chance (9.1%: uniform over the 10 symbols and
/// EOS) within 5 minutes on 2 cores, and leaves a PEFT adapter plus the periodic checkpoints.
#[test]
fn default_config_learns_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let started = std::time::Instant::now();
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}");
    assert!(secs < 300.0, "took {secs:.0} s");
    let m = metrics(dir.path());
    let losses: Vec<f64> = m.iter().filter_map(|r| r["loss"].as_f64()).collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last <= 0.5 * first, "training loss {first:.3} -> {last:.3}");
    let acc = m
        .iter()
        .rev()
        .find_map(|r| r["eval_accuracy"].as_f64())
        .unwrap();
    assert!(acc >= 0.4, "held-out accuracy {acc:.3}");
    for r in m.iter().filter(|r| r.get("loss").is_some()) {
        for key in ["step", "lr", "grad_norm", "tokens_per_s", "expert_tokens"] {
            assert!(r.get(key).is_some(), "metrics record without {key}: {r}");
        }
    }
    let out = dir.path().join("out");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-100/adapter_model.safetensors",
        "checkpoint-200/adapter_config.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // The curves: a 1,600 × 1,000 PNG at the end of training, and again from `moeq plot`.
    assert_eq!(png_size(&out.join("training.png")), (1600, 1000));
    let again = dir.path().join("again.png");
    let (code, stdout, err) = moeq(&[
        "plot",
        out.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(stdout.trim(), again.display().to_string());
    assert_eq!(png_size(&again), (1600, 1000));
    // The README's question to the adapter: `moeq generate` reverses letter lists well above
    // chance (1 in 10 letters) — at least 30% of 25 letters in their place.
    let prompts = dir.path().join("prompts.jsonl");
    let lists = [
        "b d f h j",
        "a c e g i",
        "j i h g f",
        "c a d b e",
        "g j a f c",
    ];
    let lines: Vec<String> = lists
        .iter()
        .map(|l| serde_json::json!({ "text": format!(" {l}:") }).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let answers = dir.path().join("answers.jsonl");
    let base = "synth://qwen3_moe/tiny?seed=0";
    let (code, _, err) = moeq(&[
        "generate",
        "--model",
        base,
        "--adapter",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--input",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--out",
        answers.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&answers).unwrap();
    let mut right = 0;
    for (list, line) in lists.iter().zip(text.lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let got: Vec<&str> = v["text"].as_str().unwrap().split_whitespace().collect();
        let want: Vec<&str> = list.split(' ').rev().collect();
        right += want.iter().zip(&got).filter(|(w, g)| w == g).count();
    }
    assert!(right >= 8, "{right} of 25 letters reversed:\n{text}");
    eprintln!(
        "default config: {secs:.1} s, loss {first:.3} -> {last:.3}, held-out accuracy {acc:.3}, generate: {right}/25 letters"
    );
}

/// Width and height of a PNG file (its signature and IHDR chunk checked).
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() > 1000, "{}: {} bytes", path.display(), b.len());
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

/// `moeq plot` on what is not a run: one line naming the problem and the fix, exit 2.
#[test]
fn plot_refuses_what_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (d.join("missing"), None, "not a directory"),
        (d.to_path_buf(), None, "no metrics.jsonl"),
        (
            d.to_path_buf(),
            Some(d.join("no/such/folder/x.png")),
            "its folder does not exist",
        ),
    ];
    for (run, out, want) in cases {
        let mut args = vec!["plot".to_string(), run.display().to_string()];
        if let Some(o) = &out {
            args.extend(["--out".to_string(), o.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = moeq(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A metrics file with no step recorded yet (a run stopped before its first log line).
    std::fs::write(d.join("metrics.jsonl"), "").unwrap();
    let (code, _, err) = moeq(&["plot", d.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no training steps recorded yet"), "{err}");
    assert!(!d.join("training.png").exists());
}

fn losses_of(extra: &str) -> Vec<String> {
    losses_and_log(extra).0
}

/// The logged losses of a run and its stderr.
fn losses_and_log(extra: &str) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), extra);
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let losses = metrics(dir.path())
        .iter()
        .filter_map(|r| r.get("loss").map(|l| l.to_string()))
        .collect();
    (losses, err)
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let short = "max_steps: 6\nwarmup_steps: 2\nlogging_steps: 1\neval_steps: 100\nsave_steps: 100\nlora_dropout: 0.1\ngradient_accumulation_steps: 2";
    let a = losses_of(short);
    let b = losses_of(short);
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "same seed, different losses");
    let c = losses_of(&format!("{short}\nseed: 1"));
    assert_ne!(a, c, "another seed gave the same losses");
}

/// `gradient_checkpointing: false` keeps every layer's graph instead of recomputing it: the
/// same arithmetic, so the same losses bit for bit (with LoRA dropout and accumulation on).
#[test]
fn kept_activations_train_exactly_like_the_recompute() {
    let short = "max_steps: 6\nwarmup_steps: 2\nlogging_steps: 1\neval_steps: 100\nsave_steps: 100\nlora_dropout: 0.1\ngradient_accumulation_steps: 2";
    let (recomputed, log) = losses_and_log(short);
    assert!(log.contains("activations: each layer recomputed"), "{log}");
    let (kept, log) = losses_and_log(&format!("{short}\ngradient_checkpointing: false"));
    assert!(log.contains("activations: every layer's kept"), "{log}");
    assert_eq!(recomputed.len(), 6);
    assert_eq!(recomputed, kept);
}

/// `recompute_attention: false` keeps each layer's attention output (and takes the experts a
/// chunk at a time) instead of running the attention again: the same losses bit for bit, with
/// offloading too; the log says which runs.
#[test]
fn kept_attention_outputs_train_exactly_like_the_rerun() {
    let short = "max_steps: 6\nwarmup_steps: 2\nlogging_steps: 1\neval_steps: 100\nsave_steps: 100\nlora_dropout: 0.1\ngradient_accumulation_steps: 2";
    let (rerun, log) = losses_and_log(short);
    assert!(
        log.contains("attention: run again in each layer's recompute"),
        "{log}"
    );
    let (kept, log) = losses_and_log(&format!("{short}\nrecompute_attention: false"));
    assert!(log.contains("attention: each layer's output kept"), "{log}");
    let offload = "recompute_attention: false\nactivation_offloading: true";
    let (parked, _) = losses_and_log(&format!("{short}\n{offload}"));
    assert_eq!(rerun.len(), 6);
    assert_eq!(rerun, kept);
    assert_eq!(rerun, parked);
}

/// `model_config` overrides what moeq reads of config.json (a changed rope base changes the
/// losses), and refuses a key that sets a weight's shape before training, with exit 2.
#[test]
fn model_config_overrides_config_json() {
    let (base, _) = losses_and_log("max_steps: 3\nwarmup_steps: 1");
    let (over, log) =
        losses_and_log("max_steps: 3\nwarmup_steps: 1\nmodel_config:\n  rope_theta: 50.0");
    assert!(
        log.contains("model_config overrides config.json: rope_theta"),
        "{log}"
    );
    assert_eq!(base.len(), over.len());
    assert_ne!(base, over, "a rope base of 50 trained like the file's");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "max_steps: 3\nwarmup_steps: 1\nmodel_config:\n  hidden_size: 4096",
    );
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model_config.hidden_size: it sets the shape of the checkpoint's weights"),
        "{err}"
    );
}

/// The tiny preset of each DeepSeek/GLM-family type and of the later grouped-query types
/// trains from the CLI (dense first layer, grouped or sigmoid routing, latent or partially
/// rotated attention, summed shared experts; FlexOlmo's post-norm layers, MiniMax-M2's heads
/// wider than the hidden size): adapters on every attention projection it has, the dense MLP
/// and shared experts, and the experts; over 40 steps the logged loss falls by a third.
#[test]
fn deepseek_glm_and_later_tiny_presets_learn() {
    for (arch, layers) in [
        ("glm4_moe", 3),
        ("glm4_moe_lite", 3),
        ("deepseek_v2", 3),
        ("deepseek_v3", 3),
        ("kimi_k2", 3),
        ("flex_olmo", 2),
        ("minimax_m2", 2),
        ("ernie4_5_moe", 3),
        ("granitemoe", 2),
        ("hunyuan_v1_moe", 2),
        ("granitemoeshared", 2),
    ] {
        let extra = format!(
            "base_model: synth://{arch}/tiny?seed=0\n\
             lora_target_modules: [q_proj, k_proj, v_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj, down_proj]\n\
             max_steps: 40\nwarmup_steps: 4\nlogging_steps: 5\neval_steps: 100\nsave_steps: 100"
        );
        let (losses, log) = losses_and_log(&extra);
        let losses: Vec<f64> = losses.iter().map(|l| l.parse().unwrap()).collect();
        assert_eq!(losses.len(), 8, "{arch}: {log}");
        assert!(
            losses[7] < losses[0] * 2.0 / 3.0,
            "{arch}: losses {losses:?}"
        );
        assert!(
            log.contains(&format!("({arch}, {layers} layers)")),
            "{arch}: {log}"
        );
    }
}

/// gpt-oss's tiny preset trains from the CLI (a sliding-window layer with sinks, biased
/// experts with the clamped GLU): adapters on attention and the experts; its expert outputs
/// carry the `(up + 1)` term and biases, so it learns more slowly than the others — over 80
/// steps the logged loss falls by a third.
#[test]
fn gpt_oss_tiny_preset_learns() {
    let extra = "base_model: synth://gpt_oss/tiny?seed=0\n\
                 max_steps: 80\nwarmup_steps: 4\nlogging_steps: 10\neval_steps: 100\nsave_steps: 100";
    let (losses, log) = losses_and_log(extra);
    let losses: Vec<f64> = losses.iter().map(|l| l.parse().unwrap()).collect();
    assert_eq!(losses.len(), 8, "{log}");
    assert!(losses[7] < losses[0] * 2.0 / 3.0, "losses {losses:?}");
    assert!(log.contains("(gpt_oss, 2 layers)"), "{log}");
}

#[test]
fn lora_targets_that_match_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = DEFAULT
        .replace(
            "output_dir: outputs/tiny-cpu",
            &format!("output_dir: {}", dir.path().join("out").display()),
        )
        .replace(
            "lora_target_modules: [q_proj, k_proj, v_proj, o_proj]",
            "lora_target_modules: [c_attn]",
        )
        .replace(
            "lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]",
            "lora_target_parameters: []",
        );
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no LoRA targets matched"), "{err}");
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "max_steps: 7\nwarmup_steps: 1\nsave_steps: 2\neval_steps: 7\nsave_total_limit: 2",
    );
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("out");
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-4", "checkpoint-6"]);
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// `init=device`: the frozen weights are drawn at load time (here on the CPU) instead of read
/// from a synthesized checkpoint; runs are deterministic and differ from the disk weights'.
#[test]
fn weights_drawn_at_load_time_train_deterministically() {
    let short = "max_steps: 4\nwarmup_steps: 1\nlogging_steps: 1\neval_steps: 100\nsave_steps: 100";
    let drawn = format!("{short}\nbase_model: synth://qwen3_moe/tiny?seed=0&init=device");
    let a = losses_of(&drawn);
    assert_eq!(a.len(), 4);
    assert!(
        a.iter().all(|l| l.parse::<f64>().is_ok_and(f64::is_finite)),
        "{a:?}"
    );
    assert_eq!(a, losses_of(&drawn), "drawn weights, different losses");
    assert_ne!(
        a,
        losses_of(short),
        "drawn weights equal the disk checkpoint's"
    );
}

/// axolotl's schedule keys reach the optimizer: a fractional `warmup_steps` is a ratio of the
/// run (0.25 of 8 steps: 2), and the cosine ends at `cosine_min_lr_ratio` of the peak. The
/// metrics record each step's learning rate.
#[test]
fn axolotl_schedule_keys_set_the_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "max_steps: 8\nwarmup_steps: 0.25\ncosine_min_lr_ratio: 0.5\nlogging_steps: 1\neval_steps: 100\nsave_steps: 100",
    );
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let lrs: Vec<f64> = metrics(dir.path())
        .iter()
        .filter_map(|r| r["lr"].as_f64())
        .collect();
    let peak = 3.0e-3;
    // Steps 0 and 1 warm up (0, peak/2); then cosine from the peak down towards peak/2.
    let want: Vec<f64> = (0..8)
        .map(|k| {
            if k < 2 {
                peak * k as f64 / 2.0
            } else {
                let progress = (k - 2) as f64 / 6.0;
                peak * (0.5 + 0.5 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
            }
        })
        .collect();
    assert_eq!(lrs.len(), 8, "{lrs:?}");
    for (got, want) in lrs.iter().zip(&want) {
        assert!((got - want).abs() < 1e-12, "{lrs:?} vs {want:?}");
    }
}

/// `lora_model_dir`: a second run starting from the first run's adapter begins at the first
/// run's loss, not at the untrained one; an adapter of another rank is refused in one line.
#[test]
fn training_continues_from_an_adapter() {
    let first = tempfile::tempdir().unwrap();
    let cfg = config(
        first.path(),
        "max_steps: 40\nlogging_steps: 1\nwarmup_steps: 5",
    );
    let (code, _, stderr) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    // Training records (the others are evaluations and the run header).
    let steps = |dir: &Path| -> Vec<f64> {
        metrics(dir)
            .iter()
            .filter(|r| r.get("tokens_per_s").is_some())
            .map(|r| r["loss"].as_f64().unwrap())
            .collect()
    };
    let m1 = steps(first.path());
    let (start, end) = (m1[0], m1[m1.len() - 1]);
    assert!(end < start - 1.0, "the first run learns: {start} → {end}");
    let adapter = first.path().join("out");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let second = tempfile::tempdir().unwrap();
    let extra = format!(
        "max_steps: 5\nlogging_steps: 1\nwarmup_steps: 1\nlora_model_dir: {}",
        adapter.display()
    );
    let cfg = config(second.path(), &extra);
    let (code, _, stderr) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("starting from the adapter"), "{stderr}");
    let again = steps(second.path())[0];
    assert!(
        again < (start + end) / 2.0,
        "the second run starts from the first's adapter: {again} vs {start} → {end}"
    );
    let third = tempfile::tempdir().unwrap();
    let cfg = config(
        third.path(),
        &format!(
            "lora_r: 4\nlora_alpha: 8\nlora_model_dir: {}",
            adapter.display()
        ),
    );
    let (code, _, stderr) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("set lora_r: "), "{stderr}");
}
