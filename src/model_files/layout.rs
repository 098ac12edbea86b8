//! On-disk expert layouts and their mapping to the canonical one.
//!
//! Canonical (transformers v5 runtime), per MoE layer `l`:
//!   `model.layers.{l}.mlp.experts.gate_up_proj [E, 2I, H]` — rows `0..I` gate, `I..2I` up
//!   `model.layers.{l}.mlp.experts.down_proj    [E, H, I]`
//! On disk we meet:
//!   Fused     — exactly the canonical names (a v5 checkpoint saved without reverting).
//!   PerExpert — the hub layout: `mlp.experts.{e}.{gate,up,down}_proj.weight` ([I,H], [I,H], [H,I]).
//!   Mixtral   — `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (w1 gate, w3 up, w2 down) and the
//!               rest of the block under `block_sparse_moe.` (canonical `mlp.`: the router's
//!               `gate.weight`, MiniMax-M2's `e_score_correction_bias`).
//!   Transposed — gpt-oss: the canonical names holding `[E, in, out]` (`gate_up_proj [E, H, 2I]`,
//!               its gate and up columns interleaved, as moeq keeps them: `swiglu::Glu`);
//!               Llama 4: the same under the canonical or the hub names
//!               (`feed_forward.experts.gate_up_proj`, gate columns `0..I`, up `I..2I`).
//!   Mxfp4     — gpt-oss as released: `{name}_blocks [E, out, in/32, 16]` and `{name}_scales
//!               [E, out, in/32]` (`model_files::mxfp4`), decoded one expert at a time.

use super::{ModelDir, ModelFilesError};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    Fused,
    PerExpert,
    Mixtral,
    Transposed,
    Mxfp4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertParam {
    GateUp,
    Down,
}

impl ExpertParam {
    /// `model.layers.{l}.mlp.experts.gate_up_proj` → `(l, GateUp)`.
    pub fn parse(canonical: &str) -> Option<(usize, ExpertParam)> {
        let rest = canonical.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let which = match tail {
            "mlp.experts.gate_up_proj" => ExpertParam::GateUp,
            "mlp.experts.down_proj" => ExpertParam::Down,
            _ => return None,
        };
        Some((layer.parse().ok()?, which))
    }

    pub fn canonical_name(self, layer: usize) -> String {
        match self {
            ExpertParam::GateUp => crate::arch::gate_up_name(layer),
            ExpertParam::Down => crate::arch::down_name(layer),
        }
    }
}

impl ExpertLayout {
    pub fn label(self) -> &'static str {
        match self {
            ExpertLayout::Fused => "fused (transformers v5: mlp.experts.gate_up_proj / down_proj)",
            ExpertLayout::PerExpert => {
                "per-expert (hub: mlp.experts.{e}.gate_proj/up_proj/down_proj)"
            }
            ExpertLayout::Mixtral => "per-expert Mixtral (block_sparse_moe.experts.{e}.w1/w3/w2)",
            ExpertLayout::Transposed => {
                "fused [E, in, out] (gpt-oss, Llama 4: experts.gate_up_proj / down_proj)"
            }
            ExpertLayout::Mxfp4 => "MXFP4 (gpt-oss: mlp.experts.gate_up_proj_blocks / _scales)",
        }
    }

    /// On-disk name of a non-expert canonical parameter.
    pub fn disk_name(self, canonical: &str) -> String {
        match self {
            ExpertLayout::Mixtral => canonical.replace(".mlp.", ".block_sparse_moe."),
            _ => canonical.to_string(),
        }
    }

    /// On-disk names of the tensors that make up one canonical parameter.
    pub fn disk_names(self, canonical: &str, num_experts: usize) -> Vec<String> {
        match ExpertParam::parse(canonical) {
            Some(_) if self == ExpertLayout::Mxfp4 => {
                vec![
                    super::mxfp4::blocks_name(canonical),
                    super::mxfp4::scales_name(canonical),
                ]
            }
            Some((layer, which))
                if !matches!(self, ExpertLayout::Fused | ExpertLayout::Transposed) =>
            {
                (0..num_experts)
                    .flat_map(|e| self.expert_parts(layer, which, e))
                    .collect()
            }
            _ => vec![self.disk_name(canonical)],
        }
    }

    /// On-disk tensors of expert `e`, in the order they are stacked into the canonical rows.
    fn expert_parts(self, layer: usize, which: ExpertParam, e: usize) -> Vec<String> {
        let (prefix, gate, up, down) = match self {
            ExpertLayout::Mixtral => (
                format!("model.layers.{layer}.block_sparse_moe.experts.{e}"),
                "w1",
                "w3",
                "w2",
            ),
            _ => (
                format!("model.layers.{layer}.mlp.experts.{e}"),
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
        };
        match which {
            ExpertParam::GateUp => vec![
                format!("{prefix}.{gate}.weight"),
                format!("{prefix}.{up}.weight"),
            ],
            ExpertParam::Down => vec![format!("{prefix}.{down}.weight")],
        }
    }
}

/// Looks at the first MoE layer to tell the layouts apart.
pub(super) fn detect(dir: &ModelDir) -> Result<ExpertLayout, ModelFilesError> {
    let Some(layer) = dir.spec.moe_layers.iter().position(|m| *m) else {
        return Ok(ExpertLayout::Fused);
    };
    let model_type = dir.spec.model_type;
    let fused = ExpertParam::GateUp.canonical_name(layer);
    let whole = match model_type.experts_transposed() {
        true => ExpertLayout::Transposed,
        false => ExpertLayout::Fused,
    };
    let mut candidates = Vec::new();
    if model_type.ships_mxfp4() {
        candidates.push((ExpertLayout::Mxfp4, super::mxfp4::blocks_name(&fused)));
    }
    // Granite's and Llama 4's hub checkpoints hold the fused experts under names of their own.
    let hub_fused = model_type.hub_name(&fused);
    candidates.push((whole, fused));
    candidates.extend(hub_fused.map(|name| (whole, name)));
    if !model_type.experts_transposed() {
        candidates.extend([
            (
                ExpertLayout::PerExpert,
                format!("model.layers.{layer}.mlp.experts.0.gate_proj.weight"),
            ),
            (
                ExpertLayout::Mixtral,
                format!("model.layers.{layer}.block_sparse_moe.experts.0.w1.weight"),
            ),
        ]);
    }
    for (layout, name) in &candidates {
        if dir.locate(name).is_some() {
            return Ok(*layout);
        }
    }
    Err(ModelFilesError::Format {
        path: dir.root.display().to_string(),
        problem: format!(
            "no expert weights found for layer {layer}: expected one of {}",
            candidates
                .iter()
                .map(|(_, n)| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

pub(super) fn read_experts(
    dir: &ModelDir,
    layout: ExpertLayout,
    layer: usize,
    which: ExpertParam,
    range: std::ops::Range<usize>,
) -> Result<Tensor, ModelFilesError> {
    let spec = &dir.spec;
    let (h, i) = (spec.hidden_size, spec.expert_intermediate_size);
    let per_expert: [usize; 2] = match which {
        ExpertParam::GateUp => [2 * i, h],
        ExpertParam::Down => [h, i],
    };
    let n = range.end - range.start;
    let out_shape = [n, per_expert[0], per_expert[1]];
    match layout {
        ExpertLayout::Transposed => return read_transposed(dir, layer, which, range, per_expert),
        ExpertLayout::Mxfp4 => return read_mxfp4(dir, layer, which, range, per_expert),
        _ => {}
    }
    if layout == ExpertLayout::Fused {
        let name = dir.disk_name(layout, &which.canonical_name(layer));
        let (_, dtype, shape) = dir.raw(&name, Some(0..0))?;
        if dtype == DType::F8E4M3 {
            return Err(ModelFilesError::Format {
                path: dir.root.display().to_string(),
                problem: format!("'{name}': FP8 fused expert tensors are not supported (moeq reads FP8 experts stored one tensor per expert, as the hub releases are)"),
            });
        }
        dir.check_shape(
            &name,
            &shape,
            &[spec.num_experts, per_expert[0], per_expert[1]],
        )?;
        let expert_bytes = per_expert[0] * per_expert[1] * dtype.size_in_bytes();
        let (bytes, _, _) = dir.raw(
            &name,
            Some(range.start * expert_bytes..range.end * expert_bytes),
        )?;
        return Ok(Tensor::from_raw_buffer(
            bytes,
            dtype,
            &out_shape,
            &Device::Cpu,
        )?);
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut dtype: Option<DType> = None;
    for e in range {
        let parts = layout.expert_parts(layer, which, e);
        let rows = per_expert[0] / parts.len();
        for name in &parts {
            let (bytes, dt, shape) = dir.raw(name, None)?;
            dir.check_shape(name, &shape, &[rows, per_expert[1]])?;
            // FP8 parts come back in bf16 (`model_files::fp8`), one expert at a time.
            let (bytes, dt): (std::borrow::Cow<[u8]>, DType) = match dt {
                DType::F8E4M3 => (raw_bytes(&dir.tensor(name)?)?.into(), DType::BF16),
                _ => (bytes.into(), dt),
            };
            match dtype {
                None => {
                    dtype = Some(dt);
                    buffer.reserve(n * per_expert[0] * per_expert[1] * dt.size_in_bytes());
                }
                Some(first) if first != dt => {
                    return Err(ModelFilesError::Format {
                        path: dir.root.display().to_string(),
                        problem: format!(
                            "expert tensors of layer {layer} mix dtypes ({first:?} and {dt:?} in '{name}')"
                        ),
                    })
                }
                Some(_) => {}
            }
            buffer.extend_from_slice(&bytes);
        }
    }
    let dtype = dtype.unwrap_or(DType::F32);
    Ok(Tensor::from_raw_buffer(
        &buffer,
        dtype,
        &out_shape,
        &Device::Cpu,
    )?)
}

/// Experts `range` of a gpt-oss or Llama 4 parameter stored `[E, in, out]` (under the canonical
/// name or the hub's), as `[n, out, in]`.
fn read_transposed(
    dir: &ModelDir,
    layer: usize,
    which: ExpertParam,
    range: std::ops::Range<usize>,
    [out, inp]: [usize; 2],
) -> Result<Tensor, ModelFilesError> {
    let name = dir.disk_name(ExpertLayout::Transposed, &which.canonical_name(layer));
    let (_, dtype, shape) = dir.raw(&name, Some(0..0))?;
    dir.check_shape(&name, &shape, &[dir.spec.num_experts, inp, out])?;
    let per = out * inp * dtype.size_in_bytes();
    let (bytes, _, _) = dir.raw(&name, Some(range.start * per..range.end * per))?;
    let stored = Tensor::from_raw_buffer(bytes, dtype, &[range.len(), inp, out], &Device::Cpu)?;
    Ok(stored.transpose(1, 2)?.contiguous()?)
}

/// Experts `range` of a gpt-oss parameter stored as MXFP4 blocks and scales, decoded to bf16
/// `[n, out, in]` one expert at a time.
fn read_mxfp4(
    dir: &ModelDir,
    layer: usize,
    which: ExpertParam,
    range: std::ops::Range<usize>,
    [out, inp]: [usize; 2],
) -> Result<Tensor, ModelFilesError> {
    let name = which.canonical_name(layer);
    let (blocks, scales) = (
        super::mxfp4::blocks_name(&name),
        super::mxfp4::scales_name(&name),
    );
    let groups = inp / 32;
    let e = dir.spec.num_experts;
    let (_, _, shape) = dir.raw(&blocks, Some(0..0))?;
    dir.check_shape(&blocks, &shape, &[e, out, groups, 16])?;
    let (_, _, shape) = dir.raw(&scales, Some(0..0))?;
    dir.check_shape(&scales, &shape, &[e, out, groups])?;
    let (per_blocks, per_scales) = (out * groups * 16, out * groups);
    let mut experts = Vec::with_capacity(range.len());
    for x in range {
        let (b, _, _) = dir.raw(&blocks, Some(x * per_blocks..(x + 1) * per_blocks))?;
        let (s, _, _) = dir.raw(&scales, Some(x * per_scales..(x + 1) * per_scales))?;
        let w =
            super::mxfp4::dequantize(b, s, out, inp).map_err(|err| ModelFilesError::Format {
                path: dir.root.display().to_string(),
                problem: format!("'{blocks}' expert {x}: {}", without_backtrace(err)),
            })?;
        experts.push(w);
    }
    Ok(Tensor::stack(&experts, 0)?)
}

/// An error's message without the backtrace candle may carry (one line for the user).
pub(super) fn without_backtrace(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
        e => e.to_string(),
    }
}

/// The little-endian bytes of a CPU tensor (contiguous).
fn raw_bytes(t: &Tensor) -> Result<Vec<u8>, ModelFilesError> {
    use half::bf16;
    Ok(match t.dtype() {
        DType::BF16 => t
            .flatten_all()?
            .to_vec1::<bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F32 => t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.flatten_all()?.to_vec1::<u8>()?,
        other => {
            return Err(ModelFilesError::Format {
                path: String::new(),
                problem: format!("expert tensor of dtype {other:?}"),
            })
        }
    })
}
