//! One micro-batch through the model, by default with explicit per-layer recompute
//! (docs/ARCHITECTURE.md, decision 3).
//!
//! Forward: LoRA detached, no graph; only each layer's input `x_l [N, H]` is kept.
//! Head: final norm + chunked cross-entropy give `dL/dx_L` without the batch's logits.
//! Backward, layer by layer in reverse: run layer `l` again from `x_l`, taped (each op keeps
//! what its backward needs), then the layer's hand-written backward (`arch::backward`,
//! decision 27) from upstream `g = dL/dout` gives `dL/dx_l` and the layer's adapter gradients;
//! the tape is dropped. Peak activation memory: the L saved inputs plus one layer's tape.
//!
//! [`Activations::Keep`] (`gradient_checkpointing: false`) runs the forward taped and keeps
//! every layer's tape instead: no recompute (one forward pass in three of the frozen base's
//! work), for the activations of all L layers at once.

use crate::arch::{Inputs, LayerTape, LoraCtx, Model};
use crate::data::{Batch, IGNORE_INDEX};
use crate::lora::Adapters;
use crate::ops::delta_rule_op::keeping_checkpoints;
use crate::ops::offload::{Fetching, Offloader, Parked};
use crate::train::loss::chunked_cross_entropy;
use crate::util::phases::timed;
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{DType, Result, Tensor, TensorId, D};
use std::collections::{BTreeMap, HashMap};

/// Tokens per cross-entropy chunk: about 64 M logits (256 MB in f32) at a time.
pub fn loss_chunk(vocab: usize) -> usize {
    (64 * 1024 * 1024 / vocab.max(1)).max(1)
}

/// What a micro-batch contributes to the step's metrics.
#[derive(Debug, Default, Clone)]
pub struct MicroStats {
    /// Sum of per-token losses over labelled tokens.
    pub loss_sum: f64,
    pub labelled: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// [layer][global expert] tokens routed (empty rows for dense layers).
    pub expert_tokens: Vec<Vec<u64>>,
}

pub fn inputs(model: &Model, batch: &Batch) -> Result<Inputs> {
    model.inputs(
        &batch.input_ids,
        &batch.position_ids,
        &batch.segment_ids(),
        batch.batch_size,
        batch.seq_len,
    )
}

/// The device the model computes on.
fn batch_device(model: &Model) -> candle_core::Device {
    model.lm_head().device().clone()
}

fn real_tokens(batch: &Batch) -> usize {
    batch.seq_lens.iter().flatten().sum()
}

/// Adds `grad` into `acc[name]`.
fn accumulate(acc: &mut BTreeMap<String, Tensor>, name: &str, grad: &Tensor) -> Result<()> {
    let g = grad.to_dtype(DType::F32)?;
    let sum = match acc.remove(name) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    acc.insert(name.to_string(), sum);
    Ok(())
}

/// Whether a recomputed layer takes the attention output its first forward left
/// (`recompute_attention: false`; `MOEQ_KEEP_ATTENTION=1`/`0` overrides the key for A/B runs):
/// kept, each layer holds it to its backward (or parks it, with offloading) — at micro-batch 8
/// of Qwen3-30B-A3B 134 MB a layer — and the recompute skips the attention forward; dropped
/// (the default), the recompute runs it again (the same kernel on the same inputs: gpu-check
/// "attention forward rerun" and "attention rerun = kept"). Measured at micro-batch 8, 12
/// layers, one H100: rerun −2.4% tokens/s and −2.5 GB peak; with offloading +2.8% and −1.3 GB
/// (launch/bench/NOTES.md items 61 and 62).
pub static KEEP_ATTENTION: EnvSwitch = EnvSwitch::new("MOEQ_KEEP_ATTENTION", false, ON_OFF);

/// What the forward keeps for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Each layer's input; the backward recomputes the layer (gradient checkpointing).
    Recompute,
    /// As `Recompute`, with each layer's input and attention output (where kept:
    /// `KEEP_ATTENTION`) parked in page-locked host memory until its backward
    /// (`activation_offloading`; `ops::offload`).
    Offload,
    /// Each layer's whole tape; no recompute.
    Keep,
}

impl Activations {
    /// The axolotl/transformers keys `gradient_checkpointing` and `activation_offloading`.
    pub fn from_config(gradient_checkpointing: bool, activation_offloading: bool) -> Self {
        match (gradient_checkpointing, activation_offloading) {
            (true, true) => Activations::Offload,
            (true, false) => Activations::Recompute,
            (false, _) => Activations::Keep,
        }
    }

    /// For the run's log.
    pub fn describe(self) -> &'static str {
        match self {
            Activations::Recompute => {
                "each layer recomputed in the backward (gradient_checkpointing: true)"
            }
            Activations::Offload => {
                "each layer recomputed in the backward, its input (and attention output, where kept: recompute_attention: false) waiting in host memory, but the last layer's (activation_offloading: true)"
            }
            Activations::Keep => {
                "every layer's kept for the backward (gradient_checkpointing: false)"
            }
        }
    }
}

/// A layer's attention output and its log-sum-exp (`ops::attention_block::Memo`), parked or
/// on the way back.
type ParkedMemo = Option<(Parked, Option<Parked>)>;
type FetchingMemo = Option<(Fetching, Option<Fetching>)>;

/// What the forward left for one layer's backward.
enum Saved {
    /// The layer's input x_l [N, H]; the backward runs the layer again, taped.
    Input(Tensor),
    /// The layer's input and attention output in host memory.
    Parked(Parked, ParkedMemo),
    /// The same on their way back to the device.
    Fetching(Fetching, FetchingMemo),
    /// The layer's tape from the forward.
    Tape(Box<LayerTape>),
}

/// Parks layer `l`'s input and the attention output its forward left in the memo.
fn park_layer(off: &mut Offloader, x: Tensor, inputs: &Inputs, l: usize) -> Result<Saved> {
    let memo = inputs.attention[l].borrow_mut().take();
    let memo = match memo {
        Some((out, lse)) => Some((off.park(out)?, lse.map(|t| off.park(t)).transpose()?)),
        None => None,
    };
    Ok(Saved::Parked(off.park(x)?, memo))
}

/// Starts bringing back the last parked layer of `saved` (the next the backward walks), so
/// its copy overlaps the work before it.
fn fetch_next(off: &mut Offloader, saved: &mut Vec<Saved>) -> Result<()> {
    if !matches!(saved.last(), Some(Saved::Parked(..))) {
        return Ok(());
    }
    if let Some(Saved::Parked(x, memo)) = saved.pop() {
        let memo = match memo {
            Some((out, lse)) => Some((off.fetch(out)?, lse.map(|t| off.fetch(t)).transpose()?)),
            None => None,
        };
        saved.push(Saved::Fetching(off.fetch(x)?, memo));
    }
    Ok(())
}

/// Forward and backward of one micro-batch. The loss is normalised by `denom` labelled
/// tokens (all micro-batches of the optimizer step together), so accumulated gradients
/// equal those of one big batch. Adds the adapter gradients into `grads` (by PEFT name).
pub fn forward_backward(
    model: &Model,
    adapters: &Adapters,
    batch: &Batch,
    denom: usize,
    dropout_key: Option<(u64, u64)>,
    activations: Activations,
    grads: &mut BTreeMap<String, Tensor>,
) -> Result<MicroStats> {
    let mut inputs = inputs(model, batch)?;
    // The recompute reuses the forward's attention output where `KEEP_ATTENTION` is on;
    // without a recompute nothing does.
    inputs.keep_attention = activations != Activations::Keep && KEEP_ATTENTION.get();
    let mut off = Offloader::new(&batch_device(model))?;
    // LoRA enters detached: the layers' hand-written backward (`arch::backward`) computes the
    // adapter gradients.
    let lora = LoraCtx {
        adapters,
        live: false,
        dropout: dropout_key,
    };
    let layers = model.num_layers();
    let mut saved = Vec::with_capacity(layers);
    let mut expert_tokens = Vec::with_capacity(layers);
    let device = batch_device(model);
    let mut x = timed("embed", &device, || model.embed(&inputs))?;
    for l in 0..layers {
        let (out, stats) = match activations {
            // The last layer stays: its backward comes first, right after the head (parking it
            // only sent it out and straight back).
            Activations::Offload if l + 1 < layers => {
                let (out, stats) = model.layer(l, &x, &inputs, &lora)?;
                saved.push(park_layer(&mut off, x, &inputs, l)?);
                (out, stats)
            }
            Activations::Recompute | Activations::Offload => {
                let (out, stats) = model.layer(l, &x, &inputs, &lora)?;
                saved.push(Saved::Input(x));
                (out, stats)
            }
            Activations::Keep => {
                let (out, stats, tape) = model.layer_taped(l, &x, &inputs, &lora)?;
                saved.push(Saved::Tape(Box::new(tape)));
                (out, stats)
            }
        };
        expert_tokens.push(stats.expert_tokens);
        x = out;
    }

    off.release_finished()?;
    fetch_next(&mut off, &mut saved)?;
    crate::util::phases::mark_memory("3 forward", &device);
    // Head: dL/dx_L through the final norm.
    let normed = model.final_norm(&x)?;
    let ce = timed("head + cross-entropy", &device, || {
        chunked_cross_entropy(
            &normed,
            model.lm_head(),
            &batch.labels,
            loss_chunk(model.spec.vocab_size),
        )
    })?;
    crate::util::phases::mark_memory("4 head + cross-entropy", &device);
    let scale = ce.labelled as f64 / denom.max(1) as f64;
    let grad_normed = (ce.grad_h * scale)?;
    drop(normed);
    let mut g_out = model.final_norm_backward(&x, &grad_normed)?;
    drop(x);

    let names: HashMap<TensorId, String> = adapters
        .vars()
        .into_iter()
        .map(|(name, v)| (v.as_tensor().id(), name))
        .collect();
    for l in (0..layers).rev() {
        // Normally started already (by the forward's end or the layer before): then a no-op.
        fetch_next(&mut off, &mut saved)?;
        let entry = match saved.pop() {
            Some(Saved::Fetching(x, memo)) => {
                *inputs.attention[l].borrow_mut() = match memo {
                    Some((out, lse)) => Some((out.ready()?, lse.map(|t| t.ready()).transpose()?)),
                    None => None,
                };
                Some(Saved::Input(x.ready()?))
            }
            other => other,
        };
        // The layer below starts coming back while this one runs.
        fetch_next(&mut off, &mut saved)?;
        let tape = match entry {
            Some(Saved::Input(x)) => {
                // The layer's backward follows at once: ops may keep what it reads.
                let tape = timed("layer recompute", &device, || {
                    keeping_checkpoints(|| model.layer_tape(l, &x, &inputs, &lora))
                })?;
                crate::util::phases::mark_memory("5a layer recompute", &device);
                tape
            }
            Some(Saved::Tape(tape)) => *tape,
            Some(Saved::Parked(..) | Saved::Fetching(..)) | None => {
                candle_core::bail!("layer {l} has nothing saved for its backward")
            }
        };
        let (dx, layer_grads) = timed("layer backward", &device, || {
            model.layer_backward(l, tape, &g_out, &lora)
        })?;
        timed("gradient accumulation", &device, || -> Result<()> {
            for (id, g) in &layer_grads {
                match names.get(id) {
                    Some(name) => accumulate(grads, name, g)?,
                    None => candle_core::bail!("layer {l}: a gradient for no adapter"),
                }
            }
            Ok(())
        })?;
        g_out = dx;
        crate::util::phases::mark_memory("5d gradient accumulation", &device);
    }
    Ok(MicroStats {
        loss_sum: ce.loss as f64 * ce.labelled as f64,
        labelled: ce.labelled,
        tokens: real_tokens(batch),
        expert_tokens,
    })
}

/// Evaluation of one micro-batch: summed loss, labelled tokens and correct argmax
/// predictions, a vocabulary chunk of tokens at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct EvalStats {
    pub loss_sum: f64,
    pub labelled: usize,
    pub correct: usize,
}

/// Final hidden states after the final norm: [N, H], no graph.
pub fn hidden(model: &Model, adapters: &Adapters, inputs: &Inputs) -> Result<Tensor> {
    let ctx = LoraCtx {
        adapters,
        live: false,
        dropout: None,
    };
    let mut x = model.embed(inputs)?;
    for l in 0..model.num_layers() {
        x = model.layer(l, &x, inputs, &ctx)?.0;
    }
    model.final_norm(&x)
}

pub fn evaluate(model: &Model, adapters: &Adapters, batch: &Batch) -> Result<EvalStats> {
    evaluate_inputs(model, adapters, &inputs(model, batch)?, batch)
}

/// `evaluate` on prepared inputs (which replay the routing of their first pass).
pub fn evaluate_inputs(
    model: &Model,
    adapters: &Adapters,
    inputs: &Inputs,
    batch: &Batch,
) -> Result<EvalStats> {
    evaluate_hidden(model, &hidden(model, adapters, inputs)?, batch)
}

/// Loss and accuracy of `batch` from its final hidden states h [N, H].
pub fn evaluate_hidden(model: &Model, h: &Tensor, batch: &Batch) -> Result<EvalStats> {
    let w = model.lm_head().to_dtype(DType::F32)?;
    let chunk = loss_chunk(model.spec.vocab_size);
    let mut out = EvalStats::default();
    let n = batch.labels.len();
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let labels = &batch.labels[start..start + len];
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            continue;
        }
        let logits = h
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .matmul(&w.t()?)?; // [len, V]
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let targets: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
        let targets = Tensor::from_vec(targets, (len, 1), h.device())?;
        let nll: Vec<f32> = (lse - logits.gather(&targets, 1)?)?
            .flatten_all()?
            .to_vec1()?;
        let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        for (i, &label) in labels.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            out.loss_sum += nll[i] as f64;
            out.labelled += 1;
            out.correct += usize::from(argmax[i] == label as u32);
        }
    }
    Ok(out)
}
