//! `moeq export-adapter --layout per-expert`: every expert's per-projection LoRA gives the same
//! outputs as the 3-D expert adapter through moeq's own grouped LoRA op (random adapter, random
//! inputs); linear adapters are copied; the config names the projections; bad input is one line.

mod common;
use candle_core::{Device, Tensor};
use common::moeq;
use moeq::arch::ModelType;
use moeq::lora::{peft, Adapters, LoraSettings};
use moeq::model_files::ModelDir;
use moeq::ops::experts::grouped_lora;
use moeq::synth::{self, SynthOptions};
use rand::{Rng, SeedableRng};

fn tiny(dir: &std::path::Path, model_type: ModelType) -> ModelDir {
    let opts = SynthOptions {
        model_type,
        seed: 2,
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).unwrap();
    ModelDir::open(dir).unwrap()
}

fn random_adapter(md: &ModelDir) -> Adapters {
    let s = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        target_parameters: vec![
            "mlp.experts.gate_up_proj".into(),
            "mlp.experts.down_proj".into(),
        ],
    };
    let a = Adapters::new(&md.spec, s, 1, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (_, v) in a.vars() {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    a
}

fn max_diff(x: &Tensor, y: &Tensor) -> f32 {
    common::max_abs(&(x - y).unwrap())
}

#[test]
fn per_expert_tensors_give_the_3d_adapters_outputs() {
    for (model_type, module, [gate, up, down]) in [
        (
            ModelType::Qwen3Moe,
            "mlp.experts",
            ["gate_proj", "up_proj", "down_proj"],
        ),
        (
            ModelType::Mixtral,
            "block_sparse_moe.experts",
            ["w1", "w3", "w2"],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let md = tiny(&tmp.path().join("m"), model_type);
        let a = random_adapter(&md);
        let src = tmp.path().join("adapter");
        peft::save(&a, "m", &src).unwrap();
        let out = tmp.path().join("exported");
        let export = || {
            moeq(&[
                "export-adapter",
                "--model",
                tmp.path().join("m").to_str().unwrap(),
                "--adapter",
                src.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
        };
        let (code, _, stderr) = export();
        assert_eq!(code, 0, "{stderr}");
        let got =
            candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        let t = |k: &str| {
            got.get(k)
                .unwrap_or_else(|| {
                    panic!(
                        "{k} missing from {:?}",
                        got.keys().take(4).collect::<Vec<_>>()
                    )
                })
                .clone()
        };
        // Linear adapters as they were.
        for (path, l) in &a.linear {
            let key = format!("base_model.model.{path}.lora_A.weight");
            assert_eq!(max_diff(&t(&key), l.a.as_tensor()), 0.0, "{key}");
        }
        // Each expert's rows through the 3-D adapter (moeq's grouped op, scaling 1) against
        // x · A_eᵀ · B_eᵀ of its exported projections.
        let r = 4;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (name, e) in &a.experts {
            let layer = name.split(".mlp.experts.").next().unwrap();
            let n = e.num_experts;
            let (inp, outd) = (
                e.a.as_tensor().dim(1).unwrap(),
                e.b.as_tensor().dim(0).unwrap(),
            );
            let rows = 3;
            let xv: Vec<f32> = (0..n * rows * inp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let x = Tensor::from_vec(xv, (n * rows, inp), &Device::Cpu).unwrap();
            let y = grouped_lora(
                &x,
                e.a.as_tensor(),
                e.b.as_tensor(),
                &vec![rows; n],
                0,
                r,
                1.0,
            )
            .unwrap();
            for ex in 0..n {
                let xe = x.narrow(0, ex * rows, rows).unwrap();
                let ye = y.narrow(0, ex * rows, rows).unwrap();
                let via = |proj: &str| {
                    let k = |p: &str| {
                        format!("base_model.model.{layer}.{module}.{ex}.{proj}.lora_{p}.weight")
                    };
                    xe.matmul(&t(&k("A")).t().unwrap())
                        .unwrap()
                        .matmul(&t(&k("B")).t().unwrap())
                        .unwrap()
                };
                let want = if name.ends_with("gate_up_proj") {
                    Tensor::cat(&[via(gate), via(up)], 1).unwrap()
                } else {
                    via(down)
                };
                assert_eq!(want.dims(), [rows, outd]);
                // f32 sums of ≤ 64 products in another order: 1e-5 of values ≈ 1.
                let d = max_diff(&want, &ye);
                assert!(d < 1e-5, "{name} expert {ex}: {d}");
            }
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["target_parameters"], serde_json::json!([]));
        let modules: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        for m in ["q_proj", "v_proj", gate, up, down] {
            assert!(modules.contains(&m), "{modules:?}");
        }
        assert_eq!(cfg["r"], 4);
        // An existing --out is refused in one line, nothing written.
        let (code, _, stderr) = export();
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("already exists"), "{stderr}");
    }
}
