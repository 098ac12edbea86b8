//! `moeq eval`: loss and perplexity of a (4-bit) base model, optionally with a LoRA adapter
//! (moeq's or PEFT's), on JSONL data: `{"input_ids": [...]}` lines (pre-tokenized) or
//! `{"text": "..."}` lines (tokenized with the model's tokenizer). Every next-token prediction
//! of a line counts. `--dump-logits` writes the f32 logits `[lines, tokens, vocab]`.

use super::{CliError, QuantFlags};
use crate::arch::Model;
use crate::data::{Batch, TokenizerBundle};
use crate::lora::{peft, Adapters, LoraSettings};
use crate::model_files::{ModelDir, ModelFilesError};
use crate::train::{setup, step};
use candle_core::DType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model directory (Hugging Face layout, or a `moeq quantize` output).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL: `{"input_ids": [...]}` or `{"text": "..."}` per line.
    #[arg(long)]
    data: PathBuf,
    /// Write the logits as one f32 tensor `logits` [lines, tokens, vocab] (equal-length lines).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Write the gradients of the mean loss (all lines together) w.r.t. every adapter tensor,
    /// f32, by PEFT name (needs --adapter).
    #[arg(long)]
    dump_grads: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype: `auto` (bf16 on a GPU, f32 on the CPU), `f32` or `bf16`.
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[command(flatten)]
    quant: QuantFlags,
}

fn read_lines(args: &EvalArgs, dir: &std::path::Path) -> Result<Vec<Vec<u32>>, CliError> {
    let path = &args.data;
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    let mut tok: Option<TokenizerBundle> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| CliError::Input(format!("{at}: not valid JSON: {e}")))?;
        let ids: Vec<u32> = if let Some(ids) = v.get("input_ids") {
            ids.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect::<Option<Vec<u32>>>()
                })
                .ok_or_else(|| {
                    CliError::Input(format!("{at}: 'input_ids' must be a list of token ids"))
                })?
        } else if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
            if tok.is_none() {
                tok = Some(TokenizerBundle::load(dir, None).map_err(CliError::input)?);
            }
            let bundle = tok
                .as_ref()
                .ok_or_else(|| CliError::Failed("tokenizer".into()))?;
            bundle
                .encode(t, true)
                .map_err(|e| CliError::Input(format!("{at}: {e}")))?
                .0
        } else {
            return Err(CliError::Input(format!(
                "{at}: each line needs 'input_ids' (a list of ids) or 'text'"
            )));
        };
        if ids.len() < 2 {
            return Err(CliError::Input(format!(
                "{at}: a line needs at least 2 tokens to predict one"
            )));
        }
        lines.push(ids);
    }
    if lines.is_empty() {
        return Err(CliError::Input(format!(
            "{}: no lines to evaluate",
            path.display()
        )));
    }
    Ok(lines)
}

pub fn run(args: EvalArgs) -> Result<(), CliError> {
    let input_err = |e: ModelFilesError| match e {
        ModelFilesError::Io { .. } => CliError::failed(e),
        other => CliError::input(other),
    };
    let dir = ModelDir::open(&args.model).map_err(input_err)?;
    let lines = read_lines(&args, &args.model)?;
    let spec = &dir.spec;
    if let Some(bad) = lines
        .iter()
        .flatten()
        .find(|&&t| t as usize >= spec.vocab_size)
    {
        return Err(CliError::Input(format!(
            "{}: token id {bad} outside the vocabulary of {}",
            args.data.display(),
            spec.vocab_size
        )));
    }
    let seq_max = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    if args.dump_logits.is_some() && lines.iter().any(|l| l.len() != seq_max) {
        return Err(CliError::Input(
            "--dump-logits needs lines of equal length".into(),
        ));
    }
    let (model, adapters) = open_model(
        &dir,
        args.adapter.as_deref(),
        (&args.device, &args.dtype, &args.quant),
        seq_max,
    )?;
    if args.dump_grads.is_some() && args.adapter.is_none() {
        return Err(CliError::Input(
            "--dump-grads needs --adapter (the gradients are the adapter's)".into(),
        ));
    }
    let total_predicted: usize = lines.iter().map(|l| l.len() - 1).sum();
    let mut grads = std::collections::BTreeMap::new();
    let mut loss_sum = 0f64;
    let mut predicted = 0usize;
    let mut dump = Vec::new();
    for ids in &lines {
        let n = ids.len();
        let mut labels: Vec<i32> = ids[1..].iter().map(|&t| t as i32).collect();
        labels.push(crate::data::IGNORE_INDEX);
        let batch = Batch {
            input_ids: ids.clone(),
            labels,
            position_ids: (0..n as u32).collect(),
            seq_lens: vec![vec![n]],
            batch_size: 1,
            seq_len: n,
        };
        if args.dump_grads.is_some() {
            step::forward_backward(
                &model,
                &adapters,
                &batch,
                total_predicted,
                None,
                step::Activations::Recompute,
                &mut grads,
            )
            .map_err(CliError::failed)?;
        }
        let inputs = step::inputs(&model, &batch).map_err(CliError::failed)?;
        let h = step::hidden(&model, &adapters, &inputs).map_err(CliError::failed)?;
        if args.dump_logits.is_some() {
            let logits = h
                .to_dtype(DType::F32)
                .and_then(|h| h.matmul(&model.lm_head().to_dtype(DType::F32)?.t()?))
                .and_then(|l| l.flatten_all()?.to_vec1::<f32>())
                .map_err(CliError::failed)?;
            dump.extend(logits);
        }
        let s = step::evaluate_hidden(&model, &h, &batch).map_err(CliError::failed)?;
        loss_sum += s.loss_sum;
        predicted += s.labelled;
    }
    if let Some(path) = &args.dump_logits {
        let shape = vec![lines.len(), seq_max, spec.vocab_size];
        let bytes: Vec<u8> = dump.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
            .map_err(CliError::failed)?;
        safetensors::serialize_to_file([("logits", view)], None, path)
            .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
    }
    if let Some(path) = &args.dump_grads {
        let mut data = Vec::new();
        for (name, g) in &grads {
            let v: Vec<f32> = g
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(CliError::failed)?;
            data.push((
                name.clone(),
                g.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, shape, bytes)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytes,
                    )
                    .map_err(CliError::failed)?,
                ))
            })
            .collect::<Result<_, CliError>>()?;
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
    }
    let loss = loss_sum / predicted.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"lines": lines.len(), "predicted_tokens": predicted, "loss": loss, "perplexity": loss.exp()})
    );
    Ok(())
}

/// The model of `dir` on `device` in `dtype` (`auto`, `f32` or `bf16`) over the base the
/// quantization flags ask for (4-bit, or unquantized with `--quant-type none`), for sequences
/// of up to `positions` tokens, and the adapter in `adapter` (none: no adapter) — shared by
/// `eval` and `generate`.
pub(super) fn open_model(
    dir: &ModelDir,
    adapter: Option<&std::path::Path>,
    (device, dtype, quant): (&str, &str, &QuantFlags),
    positions: usize,
) -> Result<(Model, Adapters), CliError> {
    let spec = &dir.spec;
    let device =
        crate::util::device::device(&super::parse_device(device)?).map_err(CliError::Input)?;
    let dtype = match dtype {
        "auto" => crate::util::device::compute_dtype(crate::config::Bf16Mode::Auto, &device),
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => {
            return Err(CliError::Input(format!(
                "--dtype '{other}': use auto, f32 or bf16"
            )))
        }
    };
    let base = match quant.base()? {
        Some(settings) => setup::load_base(
            dir,
            settings,
            &device,
            None,
            &mut crate::model_files::frozen::SingleProcess,
        ),
        None => {
            crate::model_files::dense::load(dir, None, &device, dtype).map_err(|e| e.to_string())
        }
    }
    .map_err(CliError::Input)?;
    let model = Model::new(spec, &base, dtype, &device, positions).map_err(CliError::input)?;
    drop(base);
    let adapters = match adapter {
        Some(a) => peft::load(a, spec, &device).map_err(CliError::Input)?,
        None => Adapters::new(
            spec,
            LoraSettings {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                use_rslora: false,
                target_modules: vec![],
                target_parameters: vec![],
            },
            0,
            &device,
        )
        .map_err(CliError::failed)?,
    };
    Ok((model, adapters))
}
