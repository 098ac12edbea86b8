//! `moeq generate` end to end on a tiny model: greedy decoding picks, at every step, the token
//! the training forward ranks first (checked by `moeq eval --dump-logits` over the prompt and
//! the generated tokens: teacher-forced argmax, exact), with and without an adapter; sampling
//! repeats with its seed; bad input is one line and exit 2. Against transformers' `generate`:
//! tests/fixtures/hf/verify_hf.py on the GPU machine.

mod common;
use candle_core::Device;
use common::{moeq, random_adapters};
use moeq::lora::peft;
use moeq::model_files::ModelDir;
use moeq::synth::{self, SynthOptions};
use rand::{Rng, SeedableRng};
use std::path::Path;

fn output_ids(path: &Path) -> Vec<Vec<u32>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["text"].is_string());
            v["output_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn greedy_follows_the_training_forward_and_sampling_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    synth::write(
        &SynthOptions {
            seed: 12,
            dtype: "float32".into(),
            ..SynthOptions::default()
        },
        &model,
    )
    .unwrap();
    let md = ModelDir::open(&model).unwrap();
    let adapter = tmp.path().join("a");
    let a = random_adapters(
        &md.spec,
        &["q_proj", "o_proj"],
        &["mlp.experts.gate_up_proj"],
        2,
        0.3,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    peft::save(&a, "m", &adapter).unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let lines: Vec<String> = (0..2)
        .map(|_| {
            let ids: Vec<u32> = (0..6).map(|_| rng.random_range(0..512)).collect();
            serde_json::json!({ "input_ids": ids }).to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let m = model.to_str().unwrap();
    for with_adapter in [false, true] {
        let out = tmp.path().join(format!("g{with_adapter}.jsonl"));
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--input",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "10",
            "--out",
            out.to_str().unwrap(),
        ];
        if with_adapter {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        let (code, _, err) = moeq(&args);
        assert_eq!(code, 0, "{err}");
        for (line, new) in lines.iter().zip(output_ids(&out)) {
            assert!(!new.is_empty() && new.len() <= 10, "{new:?}");
            let prompt: Vec<u32> = serde_json::from_str::<serde_json::Value>(line).unwrap()
                ["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let all: Vec<u32> = prompt.iter().chain(&new).copied().collect();
            let data = tmp.path().join("all.jsonl");
            std::fs::write(&data, serde_json::json!({ "input_ids": all }).to_string()).unwrap();
            let logits = tmp.path().join("l.st");
            let mut eval = vec![
                "eval",
                "--model",
                m,
                "--device",
                "cpu",
                "--data",
                data.to_str().unwrap(),
                "--dump-logits",
                logits.to_str().unwrap(),
            ];
            if with_adapter {
                eval.extend(["--adapter", adapter.to_str().unwrap()]);
            }
            let (code, _, err) = moeq(&eval);
            assert_eq!(code, 0, "{err}");
            let l = candle_core::safetensors::load(&logits, &Device::Cpu).unwrap()["logits"]
                .squeeze(0)
                .unwrap()
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            for (k, &t) in new.iter().enumerate() {
                assert_eq!(
                    l[prompt.len() - 1 + k],
                    t,
                    "adapter {with_adapter}, new token {k}"
                );
            }
        }
    }
    // Sampling: the same seed gives the same tokens.
    let sample = |seed: &str, out: &Path| {
        let (code, _, err) = moeq(&[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--input",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        output_ids(out)
    };
    let (s1, s2) = (tmp.path().join("s1.jsonl"), tmp.path().join("s2.jsonl"));
    assert_eq!(sample("7", &s1), sample("7", &s2));

    // Bad input: one line, exit 2.
    let bad_line = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_line, "{\"input_ids\": [1, 2]}\n{\"prompt\": 3}\n").unwrap();
    let outside = tmp.path().join("outside.jsonl");
    std::fs::write(&outside, "{\"input_ids\": [1, 99999]}\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "give a prompt"),
        (
            vec!["--prompt", "x", "--top-p", "1.5"],
            "--top-p 1.5: must be in (0, 1]",
        ),
        (
            vec!["--prompt", "x", "--temperature", "0"],
            "--temperature 0: must be above 0",
        ),
        (
            vec!["--prompt", "x", "--max-new-tokens", "0"],
            "--max-new-tokens 0",
        ),
        (
            vec!["--input", bad_line.to_str().unwrap()],
            "bad.jsonl:2: each prompt needs 'input_ids', 'text' or 'messages'",
        ),
        (
            vec!["--input", outside.to_str().unwrap()],
            "token id 99999 outside the vocabulary of 512",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["generate", "--model", m, "--device", "cpu"];
        args.extend(extra);
        let (code, _, err) = moeq(&args);
        assert_eq!(code, 2, "{want}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains(want), "expected '{want}' in: {err}");
    }
}
