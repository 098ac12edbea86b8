//! `moeq eval` and PEFT adapter reading: a saved adapter reads back exactly, eval's loss
//! changes with an adapter and agrees with the dumped logits, bad input is one line + exit 2.

mod common;
use candle_core::{Device, Tensor, D};
use common::moeq;
use moeq::lora::{peft, Adapters, LoraSettings};
use moeq::model_files::ModelDir;
use moeq::synth::{self, SynthOptions};
use rand::{Rng, SeedableRng};

fn tiny(dir: &std::path::Path) -> ModelDir {
    synth::write(
        &SynthOptions {
            seed: 2,
            ..SynthOptions::default()
        },
        dir,
    )
    .unwrap();
    ModelDir::open(dir).unwrap()
}

/// An adapter on attention and both expert parameters with random A and B.
fn random_adapter(md: &ModelDir) -> Adapters {
    let s = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: true,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        target_parameters: vec![
            "mlp.experts.gate_up_proj".into(),
            "mlp.experts.down_proj".into(),
        ],
    };
    let a = Adapters::new(&md.spec, s, 1, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (_, v) in a.vars() {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    a
}

#[test]
fn adapter_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let md = tiny(&dir.path().join("m"));
    let a = random_adapter(&md);
    let out = dir.path().join("adapter");
    peft::save(&a, "m", &out).unwrap();
    let b = peft::load(&out, &md.spec, &Device::Cpu).unwrap();
    assert_eq!(a.settings, b.settings);
    let (va, vb) = (a.vars(), b.vars());
    assert_eq!(va.len(), vb.len());
    for ((na, ta), (nb, tb)) in va.iter().zip(&vb) {
        assert_eq!(na, nb);
        let x: Vec<f32> = ta.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = tb.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{na}");
    }
}

#[test]
fn eval_loss_logits_and_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    let md = tiny(&mdir);
    let a = random_adapter(&md);
    let adir = dir.path().join("adapter");
    peft::save(&a, "m", &adir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let data = dir.path().join("d.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|_| {
            let ids: Vec<u32> = (0..10).map(|_| rng.random_range(0..512)).collect();
            serde_json::json!({ "input_ids": ids }).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let logits = dir.path().join("l.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            mdir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = moeq(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let base = run(&["--dump-logits", logits.to_str().unwrap()]);
    let with = run(&["--adapter", adir.to_str().unwrap()]);
    assert_eq!(base["predicted_tokens"], 27);
    let (lb, la) = (
        base["loss"].as_f64().unwrap(),
        with["loss"].as_f64().unwrap(),
    );
    assert!(
        (lb - la).abs() > 1e-3,
        "the adapter changed nothing: {lb} vs {la}"
    );
    // The unquantized base (`--quant-type none`, as 16-bit LoRA trains it): a different loss
    // from the NF4 base's, by its quantization error only.
    let plain = run(&["--quant-type", "none"])["loss"].as_f64().unwrap();
    assert!(
        plain != lb && (plain - lb).abs() < 0.05 * lb,
        "{plain} vs {lb}"
    );
    // The dumped logits give the same loss (f32 log-softmax; 1e-5 relative).
    let t = candle_core::safetensors::load(&logits, &Device::Cpu).unwrap();
    let l = &t["logits"];
    assert_eq!(l.dims(), &[3, 10, 512]);
    let logp = candle_nn::ops::log_softmax(l, D::Minus1)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let mut sum = 0f64;
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ids: Vec<usize> = v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        for t in 0..9 {
            sum -= logp[i][t][ids[t + 1]] as f64;
        }
    }
    assert!(
        (sum / 27.0 - lb).abs() <= 1e-5 * lb,
        "{} vs {lb}",
        sum / 27.0
    );
}

#[test]
fn eval_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    tiny(&mdir);
    let cases = [
        (
            "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 99999]}",
            vec![],
            "outside the vocabulary",
        ),
        (
            "{\"input_ids\": [1, 2, 3]}\nnot json",
            vec![],
            "d.jsonl:2: not valid JSON",
        ),
        ("{\"ids\": [1, 2]}", vec![], "needs 'input_ids'"),
        (
            "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2]}",
            vec!["--dump-logits", "x.safetensors"],
            "equal length",
        ),
        (
            "{\"input_ids\": [1, 2, 3]}",
            vec!["--adapter", "/nonexistent"],
            "adapter_config.json",
        ),
        (
            "{\"input_ids\": [1, 2, 3]}",
            vec!["--blocksize", "48"],
            "blocksize",
        ),
        (
            "{\"input_ids\": [1, 2, 3]}",
            vec!["--quant-type", "int8"],
            "--quant-type 'int8': must be nf4, fp4 or none",
        ),
    ];
    for (text, extra, want) in cases {
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, text).unwrap();
        let mut args = vec![
            "eval",
            "--model",
            mdir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend(extra.iter().copied());
        let (code, _, err) = moeq(&args);
        assert_eq!(code, 2, "{want}: {err}");
        assert!(err.contains(want), "expected '{want}' in: {err}");
    }
}
