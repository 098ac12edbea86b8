//! The whole training step on a device vs the CPU: for a tiny synthesized model of each
//! architecture, loss and every LoRA gradient of one micro-batch (per-layer recompute), on
//! `device` in f32 and bf16 against the CPU in the same dtype, and kept activations (no
//! recompute) against the recompute on `device`; the same step over the unquantized base (16-bit
//! LoRA) against the CPU too. Run by `moeq gpu-check`; the CPU test suite
//! runs it on the CPU to exercise the machinery.

use super::tolerance::{lookup, Pass};
use super::{compare, Comparison};
use crate::arch::{LoraCtx, Model, ModelType};
use crate::data::{Batch, IGNORE_INDEX};
use crate::lora::{Adapters, LoraSettings};
use crate::model_files::frozen::{self, CpuQuantizer, SingleProcess};
use crate::model_files::ModelDir;
use crate::ops::expert_chunks::{CHUNK_BUFFERS, EXPERT_CHUNKS};
use crate::ops::lora_joint::{wide_forwards, JOINT_IN_K, JOINT_LORA};
use crate::quant::QuantSettings;
use crate::synth::{self, SynthOptions};
use crate::train::step::{forward_backward, Activations, KEEP_ATTENTION};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Two rows of 24 tokens, the first packing two samples; deterministic pseudo-random ids.
fn batch(vocab: usize) -> Batch {
    let seq_lens = vec![vec![14, 10], vec![20]];
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    let mut position_ids = Vec::new();
    let mut k = 1u64;
    let mut next = || {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (k >> 33) as usize
    };
    for lens in &seq_lens {
        let used: usize = lens.iter().sum();
        for &len in lens {
            for p in 0..len {
                input_ids.push((next() % vocab) as u32);
                position_ids.push(p as u32);
                labels.push(if p + 1 == len {
                    IGNORE_INDEX
                } else {
                    (next() % vocab) as i32
                });
            }
        }
        for p in 0..24 - used {
            input_ids.push(0);
            position_ids.push(p as u32);
            labels.push(IGNORE_INDEX);
        }
    }
    Batch {
        input_ids,
        labels,
        position_ids,
        seq_lens,
        batch_size: 2,
        seq_len: 24,
    }
}

/// How the frozen base is held: 4-bit, or unquantized (`load_in_4bit: false`).
#[derive(Clone, Copy, PartialEq)]
enum Base {
    Nf4,
    SixteenBit,
}

/// The adapters of a row: their rank, and whether the experts have theirs.
#[derive(Clone, Copy)]
struct Lora {
    r: usize,
    experts: bool,
}

/// Every row but two: rank 4 keeps the adapters off `lora_in_k`'s path (it takes ranks that
/// are multiples of 8), so the separate adapter products run.
const RANK: Lora = Lora {
    r: 4,
    experts: true,
};
/// The bf16 row that runs the expert adapters inside the base products' K (unless
/// `MOEQ_LORA_IN_K=0`, ops/lora_in_k.rs).
const RANK_IN_K: Lora = Lora {
    r: 8,
    experts: true,
};
/// The row of the experts' recompute and backward by chunks (ops/expert_chunks.rs: a
/// recomputed layer without expert adapters).
const NO_EXPERT_ADAPTERS: Lora = Lora {
    r: 4,
    experts: false,
};

/// The tiny model on `device` in `dtype`, with `lora`'s adapters on every target (the experts'
/// where it says) and B random.
fn setup(
    dir: &ModelDir,
    (device, dtype, base): (&Device, DType, Base),
    lora: Lora,
) -> Result<(Model, Adapters)> {
    let base = match base {
        Base::Nf4 => frozen::load(
            dir,
            QuantSettings::default(),
            None,
            &mut CpuQuantizer,
            &mut SingleProcess,
        ),
        Base::SixteenBit => crate::model_files::dense::load(dir, None, device, dtype),
    }
    .map_err(err)?;
    let model = Model::new(&dir.spec, &base, dtype, device, 32)?;
    let target_parameters = match lora.experts {
        true => vec![
            "mlp.experts.gate_up_proj".into(),
            "mlp.experts.down_proj".into(),
        ],
        false => Vec::new(),
    };
    let settings = LoraSettings {
        r: lora.r,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: vec!["all-linear".into()],
        target_parameters,
    };
    let adapters = Adapters::new(&dir.spec, settings, 3, device)?;
    // B random (deterministic), so A gets gradients too.
    for (name, v) in adapters.vars() {
        if name.contains("lora_B") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|i| (((i * 2654435761) % 2001) as f32 / 1000.0 - 1.0) * 0.05)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), device)?)?;
        }
    }
    Ok((model, adapters))
}

fn step(
    dir: &ModelDir,
    on: (&Device, DType, Base),
    lora: Lora,
    b: &Batch,
    activations: Activations,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let (model, adapters) = setup(dir, on, lora)?;
    let mut grads = BTreeMap::new();
    let s = forward_backward(
        &model,
        &adapters,
        b,
        b.num_targets(),
        None,
        activations,
        &mut grads,
    )?;
    let grads = grads
        .into_iter()
        .map(|(k, g)| Ok((k, g.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok((s.loss_sum / s.labelled as f64, grads))
}

/// Logits of cached decoding (`Model::decode`, `moeq generate`): the first 5 tokens of `b` as a
/// prompt, then 3 tokens one at a time → `[4, V]` on the CPU.
fn decode(dir: &ModelDir, device: &Device, dtype: DType, b: &Batch) -> Result<Tensor> {
    let (model, adapters) = setup(dir, (device, dtype, Base::Nf4), RANK)?;
    let ctx = LoraCtx {
        adapters: &adapters,
        live: false,
        dropout: None,
    };
    let mut cache = model.kv_cache();
    let ids = &b.input_ids;
    let mut rows = vec![model.decode(&ids[..5], &mut cache, &ctx)?];
    for i in 5..8 {
        rows.push(model.decode(&ids[i..i + 1], &mut cache, &ctx)?);
    }
    Tensor::stack(&rows, 0)?.to_device(&Device::Cpu)
}

/// The mean loss of `b` from one autograd graph through every layer (live LoRA, candle's
/// backward through `Layer::forward`) and whole f32 logits: the reference the layers'
/// hand-written backward (`arch::backward`) is tested against, here and in tests/trainer_grads.rs.
pub fn autograd_loss(model: &Model, adapters: &Adapters, b: &Batch) -> Result<Tensor> {
    let device = model.lm_head().device();
    let inputs = crate::train::step::inputs(model, b)?;
    let ctx = LoraCtx {
        adapters,
        live: true,
        dropout: None,
    };
    let mut x = model.embed(&inputs)?;
    for l in 0..model.num_layers() {
        x = model.layer(l, &x, &inputs, &ctx)?.0;
    }
    let h = model.final_norm(&x)?.to_dtype(DType::F32)?;
    let logits = h.matmul(&model.lm_head().to_dtype(DType::F32)?.t()?)?; // [N, V]
    let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = b
        .labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip();
    let n = rows.len();
    let rows = Tensor::new(rows.as_slice(), device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let picked = logp.index_select(&rows, 0)?.gather(&targets, 1)?;
    picked.sum_all()?.neg()? / n as f64
}

/// The reference for the layers' hand-written backward (`arch::backward`): the LoRA
/// gradients of one autograd graph through every layer (live LoRA, candle's backward), the
/// loss from whole f32 logits.
fn autograd_step(
    dir: &ModelDir,
    device: &Device,
    dtype: DType,
    b: &Batch,
) -> Result<BTreeMap<String, Tensor>> {
    let (model, adapters) = setup(dir, (device, dtype, Base::Nf4), RANK)?;
    let store = autograd_loss(&model, &adapters, b)?.backward()?;
    adapters
        .vars()
        .into_iter()
        .map(|(name, v)| {
            let g = store
                .get(v.as_tensor())
                .ok_or_else(|| err(format!("{name}: no autograd gradient")))?;
            Ok((name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
        })
        .collect()
}

/// Each layer's taped forward (`arch::backward`) from the plain forward's input against the
/// plain forward's output: the worst layer.
fn taped_forward_agrees(
    dir: &ModelDir,
    device: &Device,
    dtype: DType,
    b: &Batch,
) -> Result<Option<Comparison>> {
    let (model, adapters) = setup(dir, (device, dtype, Base::Nf4), RANK)?;
    let inputs = crate::train::step::inputs(&model, b)?;
    let ctx = LoraCtx {
        adapters: &adapters,
        live: false,
        dropout: None,
    };
    let name = dir.spec.model_type.as_str();
    let tol = lookup("taped = plain forward", "any", Pass::Exact)?;
    let mut worst: Option<Comparison> = None;
    let mut x = model.embed(&inputs)?;
    for l in 0..model.num_layers() {
        let plain = model.layer(l, &x, &inputs, &ctx)?.0;
        let taped = model.layer_taped(l, &x, &inputs, &ctx)?.0;
        let label = format!("train step {name} {dtype:?} taped = plain forward (layer {l})");
        let c = compare(&label, &taped, &plain, tol)?;
        if worst.as_ref().is_none_or(|w| c.worst_ratio > w.worst_ratio) {
            worst = Some(c);
        }
        x = plain;
    }
    Ok(worst)
}

/// The worst of `got` against `want` over every gradient tensor, labelled `label`.
fn worst_of(
    label: &str,
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
    tol: &'static super::tolerance::Tolerance,
) -> Result<Option<Comparison>> {
    let mut worst: Option<Comparison> = None;
    for (name, w) in want {
        let g = got
            .get(name)
            .ok_or_else(|| err(format!("{name}: no gradient ({label})")))?;
        let c = compare(
            &format!("{label} (worst of {}: {name})", want.len()),
            g,
            w,
            tol,
        )?;
        if worst.as_ref().is_none_or(|w| c.worst_ratio > w.worst_ratio) {
            worst = Some(c);
        }
    }
    Ok(worst)
}

/// Per architecture and dtype: the loss (the step's forward) and the worst LoRA gradient tensor
/// (its backward), against the CPU in the same dtype. bf16 is not compared with f32: top-k
/// routing flips between the two for near-tied tokens, which moves expert gradients by O(1).
pub fn run_all(device: &Device) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for arch in [
        ModelType::Qwen3Moe,
        ModelType::Qwen2Moe,
        ModelType::Mixtral,
        ModelType::Olmoe,
        ModelType::Glm4Moe,
        ModelType::Glm4MoeLite,
        ModelType::DeepseekV2,
        ModelType::DeepseekV3,
        ModelType::FlexOlmo,
        ModelType::MinimaxM2,
        ModelType::Ernie45Moe,
        ModelType::GraniteMoe,
        ModelType::HunyuanV1Moe,
        ModelType::GptOss,
        ModelType::GraniteMoeShared,
        ModelType::Llama4Text,
        ModelType::Qwen3Next,
        ModelType::Qwen35MoeText,
    ] {
        let tmp = std::env::temp_dir().join(format!(
            "moeq-train-check-{}-{}",
            arch.as_str(),
            std::process::id()
        ));
        let opts = SynthOptions {
            model_type: arch,
            seed: 5,
            dtype: "float32".into(),
            force: true,
            ..Default::default()
        };
        synth::write(&opts, &tmp).map_err(err)?;
        let dir = ModelDir::open(&tmp).map_err(err)?;
        let b = batch(dir.spec.vocab_size);
        for dtype in [DType::F32, DType::BF16] {
            let row = |op, pass| lookup(op, dtype.as_str(), pass);
            let name = arch.as_str();
            let mut grads = BTreeMap::new();
            // The unquantized base (16-bit LoRA) runs the same ops without dequantizing.
            for (base, what) in [(Base::Nf4, ""), (Base::SixteenBit, " 16-bit base")] {
                let (loss_ref, grads_ref) = step(
                    &dir,
                    (&Device::Cpu, dtype, base),
                    RANK,
                    &b,
                    Activations::Recompute,
                )?;
                let on = (device, dtype, base);
                let (loss, got) = step(&dir, on, RANK, &b, Activations::Recompute)?;
                let l = Tensor::new(&[loss as f32], &Device::Cpu)?;
                let lr = Tensor::new(&[loss_ref as f32], &Device::Cpu)?;
                out.push(compare(
                    &format!("train step {name} {dtype:?}{what} loss"),
                    &l,
                    &lr,
                    row("train step", Pass::Forward)?,
                )?);
                out.extend(worst_of(
                    &format!("train step {name} {dtype:?}{what} grads"),
                    &got,
                    &grads_ref,
                    row("train step", Pass::Backward)?,
                )?);
                if base == Base::Nf4 {
                    grads = got;
                }
            }
            if dtype == DType::BF16 {
                // Rank 8: the expert adapters inside the base products' K where switched on,
                // on the CPU and the device alike (`lora_in_k::fits`; Llama 4's scaled rows take
                // the separate update). Every token goes to every expert (k = E, no group
                // limit): at rank 8 this batch has tokens whose top-k the two devices' bf16
                // roundings choose differently (7 of 18 architectures, 2026-12-05, the same
                // with the thin kernels off), which moves an expert's gradients by O(1); with
                // no choice to make, none flips.
                let mut every = ModelDir::open(&tmp).map_err(err)?;
                every.spec.router.top_k = every.spec.num_experts;
                every.spec.router.group_limit = None;
                // q, k and v's adapters joined with their updates inside the base products' K
                // (rank 8: the hiddens take whole packs) — the defaults, held on here whatever
                // the environment says: Qwen3-MoE's q/k/v must take the wide rows (the others'
                // may not: biases, post-norms, latent or gated attention; tests/joint_lora.rs
                // names them).
                let _joint = (JOINT_LORA.scoped(true), JOINT_IN_K.scoped(true));
                let recompute = Activations::Recompute;
                let cpu = (&Device::Cpu, dtype, Base::Nf4);
                let (_, grads_ref) = step(&every, cpu, RANK_IN_K, &b, recompute)?;
                let on = (device, dtype, Base::Nf4);
                let wide = wide_forwards();
                let (_, got) = step(&every, on, RANK_IN_K, &b, recompute)?;
                if arch == ModelType::Qwen3Moe && wide_forwards() == wide {
                    candle_core::bail!("joint in K: {name}'s q/k/v took no wide rows");
                }
                let (_, kept) = step(&every, on, RANK_IN_K, &b, Activations::Keep)?;
                out.extend(worst_of(
                    &format!(
                        "train step {name} {dtype:?} r{} every expert kept = recomputed",
                        RANK_IN_K.r
                    ),
                    &kept,
                    &got,
                    row("kept = recomputed", Pass::Exact)?,
                )?);
                out.extend(worst_of(
                    &format!(
                        "train step {name} {dtype:?} r{} every expert grads",
                        RANK_IN_K.r
                    ),
                    &got,
                    &grads_ref,
                    row("train step", Pass::Backward)?,
                )?);
            }
            // The experts' recompute and backward a chunk of experts at a time against the
            // separate passes: the same products in the same order, equal bit for bit.
            let on_device = (device, dtype, Base::Nf4);
            let chunks = |on, buffers| {
                let _chunks = (EXPERT_CHUNKS.scoped(on), CHUNK_BUFFERS.scoped(buffers));
                step(
                    &dir,
                    on_device,
                    NO_EXPERT_ADAPTERS,
                    &b,
                    Activations::Recompute,
                )
            };
            let separate = chunks(false, false)?.1;
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} chunks = separate passes"),
                &chunks(true, false)?.1,
                &separate,
                row("chunks = separate passes", Pass::Exact)?,
            )?);
            // The chunks' buffers reused and dgu written over gu (`MOEQ_CHUNK_BUFFERS`): the
            // same products and activations' backward, so the same bits.
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} chunks in reused buffers = separate passes"),
                &chunks(true, true)?.1,
                &separate,
                row("chunks = separate passes", Pass::Exact)?,
            )?);
            // q, k and v's adapters apart (`MOEQ_JOINT_LORA=0`; joined is the default the rows
            // above run): the device against the CPU, both apart, and kept = recomputed on the
            // device (the plain forward and the recompute take the same path).
            let apart = |device, activations| {
                let _apart = JOINT_LORA.scoped(false);
                step(&dir, (device, dtype, Base::Nf4), RANK, &b, activations)
            };
            let apart_grads = apart(device, Activations::Recompute)?.1;
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} q/k/v adapters apart grads"),
                &apart_grads,
                &apart(&Device::Cpu, Activations::Recompute)?.1,
                row("train step", Pass::Backward)?,
            )?);
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} q/k/v adapters apart kept = recomputed"),
                &apart(device, Activations::Keep)?.1,
                &apart_grads,
                row("kept = recomputed", Pass::Exact)?,
            )?);
            // gradient_checkpointing: false runs the same kernels on the same values on the
            // device: equal bit for bit.
            // Generation's cached decoding on the device against the CPU's.
            out.push(compare(
                &format!("decode {name} {dtype:?} (prompt 5, then 3 tokens)"),
                &decode(&dir, device, dtype, &b)?,
                &decode(&dir, &Device::Cpu, dtype, &b)?,
                row("decode", Pass::Forward)?,
            )?);
            out.extend(taped_forward_agrees(&dir, device, dtype, &b)?);
            let (_, kept) = step(&dir, on_device, RANK, &b, Activations::Keep)?;
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} kept = recomputed"),
                &kept,
                &grads,
                row("kept = recomputed", Pass::Exact)?,
            )?);
            // The recompute's attention run again instead of taken from the first forward
            // (`recompute_attention`, the default), with and without offloading, against it taken: the
            // same gradients bit for bit.
            let attention = |keep, activations| {
                let _keep = KEEP_ATTENTION.scoped(keep);
                step(&dir, on_device, RANK, &b, activations)
            };
            let taken = attention(true, Activations::Recompute)?.1;
            for (activations, what) in [
                (Activations::Recompute, ""),
                (Activations::Offload, ", offloaded"),
            ] {
                out.extend(worst_of(
                    &format!("train step {name} {dtype:?} attention rerun{what} = kept"),
                    &attention(false, activations)?.1,
                    &taken,
                    row("attention rerun = kept", Pass::Exact)?,
                )?);
            }
            // Activation offloading parks the same tensors in host memory and brings them
            // back: equal bit for bit.
            let (_, offloaded) = step(&dir, on_device, RANK, &b, Activations::Offload)?;
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} offloaded = recomputed"),
                &offloaded,
                &grads,
                row("offloaded = recomputed", Pass::Exact)?,
            )?);
            // The hand-written layer backward against candle's autograd on the device.
            let reference = autograd_step(&dir, device, dtype, &b)?;
            out.extend(worst_of(
                &format!("train step {name} {dtype:?} written = autograd"),
                &grads,
                &reference,
                row("written = autograd", Pass::Backward)?,
            )?);
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(out)
}
