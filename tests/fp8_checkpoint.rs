//! Block-scaled FP8 checkpoints (DeepSeek-V3's format, also Qwen3-MoE's `-FP8` releases): a tiny
//! DeepSeek-V3 and a tiny Qwen3-MoE written with every quantized weight as `float8_e4m3fn` plus
//! `weight_scale_inv` per block read back as `fp8 · scale` in bf16 — checked against an e4m3
//! decoder written here from the format's definition — attention and expert slices alike, and
//! train. (transformers' own dequantization is the reference in verify_hf.py, on the GPU.)

mod common;
use common::moeq;

use candle_core::{DType, Device, Tensor};
use moeq::arch::{Component, ModelType};
use moeq::model_files::{ExpertParam, ModelDir};
use moeq::synth::{self, SynthOptions};
use std::collections::HashMap;
use std::path::Path;

/// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals below 2^-6, NaN at
/// 0x7f/0xff, no infinities.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0xf, (b & 7) as f32);
    if e == 0xf && m == 7.0 {
        return f32::NAN;
    }
    sign * match e {
        0 => m / 8.0 * 2f32.powi(-6),
        _ => (1.0 + m / 8.0) * 2f32.powi(e as i32 - 7),
    }
}

const BLOCK: [usize; 2] = [16, 24];

/// Rewrites the f32 checkpoint in `src` into `dst` with every quantized 2-D weight in FP8: per
/// `BLOCK` block, scale = amax / 448, codes = w / scale rounded to e4m3 (by candle); scales in f32.
fn to_fp8(src: &Path, dst: &Path, quantized: &[String]) {
    std::fs::create_dir_all(dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") {
            let tensors = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
            let mut out: HashMap<String, Tensor> = HashMap::new();
            for (k, t) in tensors {
                if !quantized.contains(&k) {
                    out.insert(k, t);
                    continue;
                }
                let (r, c) = t.dims2().unwrap();
                let (sr, sc) = (r.div_ceil(BLOCK[0]), c.div_ceil(BLOCK[1]));
                let w: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let mut scale = vec![0f32; sr * sc];
                for i in 0..r {
                    for j in 0..c {
                        let s = &mut scale[(i / BLOCK[0]) * sc + j / BLOCK[1]];
                        *s = s.max(w[i * c + j].abs() / 448.0);
                    }
                }
                let scaled: Vec<f32> = (0..r * c)
                    .map(|x| w[x] / scale[(x / c / BLOCK[0]) * sc + (x % c) / BLOCK[1]])
                    .collect();
                let codes = Tensor::from_vec(scaled, (r, c), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F8E4M3)
                    .unwrap();
                out.insert(k.clone(), codes);
                out.insert(
                    format!("{k}_scale_inv"),
                    Tensor::from_vec(scale, (sr, sc), &Device::Cpu).unwrap(),
                );
            }
            candle_core::safetensors::save(&out, dst.join(&name)).unwrap();
        } else if name == "config.json" {
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            cfg["quantization_config"] = serde_json::json!({
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": BLOCK,
            });
            std::fs::write(dst.join(&name), cfg.to_string()).unwrap();
        } else {
            std::fs::copy(&f, dst.join(&name)).unwrap();
        }
    }
}

/// The weight the FP8 file stands for, decoded here: e4m3(code) · scale of its block, f32.
fn expected(dir: &Path, name: &str) -> Vec<f32> {
    let mut all = HashMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "safetensors") {
            all.extend(candle_core::safetensors::load(&f, &Device::Cpu).unwrap());
        }
    }
    let codes = &all[name];
    let (r, c) = codes.dims2().unwrap();
    let bytes: Vec<u8> = match &*codes.storage_and_layout().0 {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F8E4M3(v)) => {
            v.iter().map(|x| x.to_bits()).collect()
        }
        _ => panic!("{name} is not FP8"),
    };
    let scale: Vec<f32> = all[&format!("{name}_scale_inv")]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let sc = c.div_ceil(BLOCK[1]);
    (0..r * c)
        .map(|x| e4m3(bytes[x]) * scale[(x / c / BLOCK[0]) * sc + (x % c) / BLOCK[1]])
        .collect()
}

fn bf16_of(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

#[test]
fn fp8_block_scaled_weights_read_as_bf16_and_train() {
    check(
        ModelType::DeepseekV3,
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "[q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj]",
    );
}

/// Qwen3-MoE's `-FP8` releases use the same format (per-expert hub keys).
#[test]
fn qwen3_moe_fp8_checkpoints_read_and_train() {
    check(
        ModelType::Qwen3Moe,
        "model.layers.1.self_attn.k_proj.weight",
        "[q_proj, k_proj, v_proj, o_proj]",
    );
}

/// A tiny `model_type` checkpoint in FP8: `attn` (an attention weight) and the first MoE
/// layer's experts read back as the decoded FP8 in bf16; it trains with LoRA on `targets`.
fn check(model_type: ModelType, attn: &str, targets: &str) {
    let root = tempfile::tempdir().unwrap();
    let (src, dst) = (root.path().join("f32"), root.path().join("fp8"));
    let opts = SynthOptions {
        model_type,
        dtype: "float32".into(),
        seed: 3,
        ..SynthOptions::default()
    };
    synth::write(&opts, &src).unwrap();
    let spec = ModelDir::open(&src).unwrap().spec;
    // Every quantized linear weight on disk: attention, dense MLP, shared expert, and the hub
    // layout's per-expert projections.
    let mut quantized: Vec<String> = spec
        .params()
        .iter()
        .filter(|p| p.quantized && p.component != Component::Experts)
        .map(|p| p.name.clone())
        .collect();
    let first_moe = spec.moe_layers.iter().position(|m| *m).unwrap();
    for l in first_moe..spec.num_layers {
        for e in 0..spec.num_experts {
            for part in ["gate", "up", "down"] {
                quantized.push(format!(
                    "model.layers.{l}.mlp.experts.{e}.{part}_proj.weight"
                ));
            }
        }
    }
    to_fp8(&src, &dst, &quantized);
    let dir = ModelDir::open(&dst).unwrap();

    let got: Vec<f32> = dir
        .read(attn)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(dir.read(attn).unwrap().dtype(), DType::BF16);
    assert_eq!(got, bf16_of(&expected(&dst, attn)), "{attn}");

    // Experts 2..5 of the first MoE layer's gate_up: gate rows then up rows per expert.
    let gu = dir
        .read_experts(first_moe, ExpertParam::GateUp, 2..5)
        .unwrap();
    let i = spec.expert_intermediate_size;
    for (slot, e) in (2..5).enumerate() {
        let rows = gu.get(slot).unwrap();
        for (part, at) in [("gate", 0), ("up", i)] {
            let name = format!("model.layers.{first_moe}.mlp.experts.{e}.{part}_proj.weight");
            let got: Vec<f32> = rows
                .narrow(0, at, i)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, bf16_of(&expected(&dst, &name)), "{name}");
        }
    }

    // FP8 rounding of the random weights is small against their scale (e4m3 keeps 3 mantissa
    // bits: ≤ 1/16 relative to the block's largest value).
    let orig: Vec<f32> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap()[attn]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    let amax = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = orig
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst > 0.0 && worst <= amax / 16.0, "{worst} vs {amax}");

    // And the checkpoint trains.
    let cfg = root.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndevice: cpu\nadapter: qlora\nload_in_4bit: true\nlora_r: 4\nlora_alpha: 8\n\
             lora_target_modules: {targets}\n\
             lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n\
             datasets:\n  - path: synth://reverse?n=200\n    type: input_output\n\
             sequence_len: 64\nmicro_batch_size: 4\nmax_steps: 3\nlearning_rate: 1.0e-3\n\
             output_dir: {}\n",
            dst.display(),
            root.path().join("out").display()
        ),
    )
    .unwrap();
    let (code, _, err) = moeq(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}
