//! LoRA adapters: PEFT shapes, names, initialisation, per-expert slicing and the saved files.

use candle_core::{Device, Tensor};
use moeq::arch::ArchSpec;
use moeq::lora::{peft, Adapters, LoraSettings};
use moeq::synth::config_json;

fn spec() -> ArchSpec {
    let cfg = config_json(moeq::arch::ModelType::Qwen3Moe, "tiny", None, "bfloat16").unwrap();
    ArchSpec::from_json(&cfg, "tiny").unwrap()
}

fn settings(params: &[&str]) -> LoraSettings {
    LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
        target_parameters: params.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn shapes_and_names_follow_peft() {
    let s = spec(); // hidden 64, 4 heads × 16 (q 64), 2 kv heads (kv 32), 8 experts, I 32
    let a = Adapters::new(
        &s,
        settings(&["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        0,
        &Device::Cpu,
    )
    .unwrap();
    let named: Vec<(String, Vec<usize>)> = a
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let get = |n: &str| {
        named
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let p = "base_model.model.model.layers.0";
    assert_eq!(get(&format!("{p}.self_attn.q_proj.lora_A.weight")), [4, 64]);
    assert_eq!(get(&format!("{p}.self_attn.q_proj.lora_B.weight")), [64, 4]);
    assert_eq!(get(&format!("{p}.self_attn.k_proj.lora_B.weight")), [32, 4]);
    assert_eq!(get(&format!("{p}.self_attn.o_proj.lora_A.weight")), [4, 64]);
    // gate_up_proj [E=8, 2I=64, H=64]: in=H, out=2I; registered first → nested one level deeper.
    assert_eq!(
        get(&format!("{p}.mlp.experts.base_layer.lora_A.weight")),
        [32, 64]
    );
    assert_eq!(
        get(&format!("{p}.mlp.experts.base_layer.lora_B.weight")),
        [64, 32]
    );
    // down_proj [E=8, H=64, I=32]: in=I, out=H.
    assert_eq!(get(&format!("{p}.mlp.experts.lora_A.weight")), [32, 32]);
    assert_eq!(get(&format!("{p}.mlp.experts.lora_B.weight")), [64, 32]);
    assert_eq!(named.len(), 2 * (4 * 2 + 2 * 2));
    // A single targeted parameter is not nested.
    let one = Adapters::new(&s, settings(&["mlp.experts.down_proj"]), 0, &Device::Cpu).unwrap();
    assert!(one
        .vars()
        .iter()
        .any(|(n, _)| n == &format!("{p}.mlp.experts.lora_A.weight")));
    assert!(!one.vars().iter().any(|(n, _)| n.contains("base_layer")));
}

#[test]
fn initialisation_is_peft_like_and_deterministic() {
    let s = spec();
    let a = Adapters::new(&s, settings(&["mlp.experts.gate_up_proj"]), 7, &Device::Cpu).unwrap();
    let b = Adapters::new(&s, settings(&["mlp.experts.gate_up_proj"]), 7, &Device::Cpu).unwrap();
    let c = Adapters::new(&s, settings(&["mlp.experts.gate_up_proj"]), 8, &Device::Cpu).unwrap();
    for ((n, va), ((_, vb), (_, vc))) in a.vars().iter().zip(b.vars().iter().zip(c.vars().iter())) {
        let (x, y, z): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            va.flatten_all().unwrap().to_vec1().unwrap(),
            vb.flatten_all().unwrap().to_vec1().unwrap(),
            vc.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(x, y, "{n}");
        if n.contains("lora_B") {
            assert!(x.iter().all(|v| *v == 0.0), "{n}: B starts at zero");
        } else {
            let bound = 1.0 / (va.dims()[1] as f32).sqrt();
            assert!(
                x.iter().all(|v| v.abs() <= bound),
                "{n}: A within U(±1/√in)"
            );
            assert!(
                x.iter().any(|v| v.abs() > 0.5 * bound),
                "{n}: A is not near zero"
            );
            assert_ne!(x, z, "{n}: seed changes A");
        }
    }
    assert_eq!(a.settings.scaling(), 2.0);
    let rs = LoraSettings {
        use_rslora: true,
        ..settings(&[])
    };
    assert_eq!(rs.scaling(), 4.0);
}

#[test]
fn per_expert_slices_follow_the_peft_layout() {
    let s = spec();
    let a = Adapters::new(&s, settings(&["mlp.experts.down_proj"]), 0, &Device::Cpu).unwrap();
    let e = &a.experts["model.layers.1.mlp.experts.down_proj"];
    // Fill B with its own column index so the expert-minor selection is visible.
    let cols: Vec<f32> = (0..64).flat_map(|_| (0..32).map(|c| c as f32)).collect();
    e.b.set(&Tensor::from_vec(cols, (64, 32), &Device::Cpu).unwrap())
        .unwrap();
    let b3: Vec<f32> = e
        .expert_b(3)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(b3, [3.0, 11.0, 19.0, 27.0]); // columns 3, 3+E, 3+2E, 3+3E with E = 8
    let a_all: Vec<f32> = e.a.flatten_all().unwrap().to_vec1().unwrap();
    let a3: Vec<f32> = e
        .expert_a(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a3, a_all[3 * 4 * 32..4 * 4 * 32]); // rows 3r..4r
}

#[test]
fn saved_adapter_has_peft_files() {
    let s = spec();
    let a = Adapters::new(
        &s,
        settings(&["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        0,
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft::save(&a, "synth://qwen3_moe/tiny?seed=0", dir.path()).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let keys: Vec<String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&cfg)
            .unwrap()
            .keys()
            .cloned()
            .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys sorted as PEFT writes them");
    assert!(
        cfg.contains("\"peft_type\": \"LORA\"") && cfg.contains("\"task_type\": \"CAUSAL_LM\""),
        "{cfg}"
    );
    assert!(cfg.contains("\"target_parameters\": [\n    \"mlp.experts.gate_up_proj\",\n    \"mlp.experts.down_proj\"\n  ]"), "{cfg}");
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), a.vars().len());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let t = st
        .tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight")
        .unwrap();
    assert_eq!(t.shape(), &[4, 64]);
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
}

/// Expert adapters written in parts (one file per rank's experts, `lora::parts`) join back into
/// the whole tensors: `lora_A` rows expert-major, `lora_B` columns expert-minor, moments alike;
/// a missing part is an error naming the damage.
#[test]
fn expert_parts_join_into_the_whole_tensors() {
    use moeq::lora::parts;
    let cpu = &Device::Cpu;
    let (e, r, inp, out) = (8usize, 3usize, 5usize, 7usize);
    let a = Tensor::randn(0f32, 1.0, (r * e, inp), cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (out, r * e), cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (na, nb) = ("m.experts.lora_A.weight", "m.experts.lora_B.weight");
    for experts in [0..3, 3..4, 4..8] {
        let held = experts.len();
        let pa = a.narrow(0, experts.start * r, held * r).unwrap();
        let pb = b
            .reshape((out, r, e))
            .unwrap()
            .narrow(2, experts.start, held)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, r * held))
            .unwrap();
        let tensors: std::collections::BTreeMap<String, Tensor> = [
            (na.to_string(), pa.clone()),
            (format!("{nb}.exp_avg"), pb.clone()),
            (nb.to_string(), pb),
        ]
        .into_iter()
        .collect();
        let path = dir.path().join(parts::file_name(&experts, e));
        peft::write_f32(&path, &tensors).unwrap();
    }
    let joined = parts::join(dir.path()).unwrap().unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&joined[na]), v(&a));
    assert_eq!(v(&joined[nb]), v(&b));
    assert_eq!(v(&joined[&format!("{nb}.exp_avg")]), v(&b));
    std::fs::remove_file(dir.path().join(parts::file_name(&(3..4), e))).unwrap();
    let err = parts::join(dir.path()).unwrap_err();
    assert!(err.contains("damaged"), "{err}");
}
