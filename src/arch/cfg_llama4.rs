//! Llama 4's attention keys: `no_rope_layers` (NoPE layers and their `attn_temperature_tuning`),
//! `attention_chunk_size` on the `layer_types` that say "chunked_attention", `use_qk_norm`, and
//! which layers are MoE (`moe_layers` or `interleave_moe_layer_step`).

use super::cfg::Cfg;
use super::spec::SpecError;
use serde_json::Value;

/// NoPE layers scale q by `1 + scale · ln(1 + ⌊(p + 1) / floor⌋)` at position p
/// (`attn_scale`, `floor_scale`; Llama 4's `attn_temperature_tuning`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NopeTemperature {
    pub scale: f64,
    pub floor: usize,
}

impl NopeTemperature {
    /// The factor on q at position `p`, in f32 as transformers computes it.
    pub fn at(&self, p: usize) -> f32 {
        let steps = ((p as f32 + 1.0) / self.floor as f32).floor();
        steps.ln_1p() * self.scale as f32 + 1.0
    }
}

/// What Llama 4's config says of each layer's attention.
pub(super) struct Llama4Attention {
    /// Whether each layer turns q and k (`no_rope_layers[l] == 1`).
    pub rope_layers: Vec<bool>,
    pub temperature: Option<NopeTemperature>,
    /// `attention_chunk_size` on the chunked layers.
    pub chunks: Vec<Option<usize>>,
    /// `use_qk_norm`: a weightless RMS norm of each head after the rotation, on rotary layers.
    pub qk_norm: bool,
}

pub(super) fn attention(cfg: &Cfg, num_layers: usize) -> Result<Llama4Attention, SpecError> {
    let rope_layers = match cfg.per_layer("no_rope_layers", num_layers, "0 or 1", |v| {
        match v.as_u64().or_else(|| v.as_bool().map(u64::from)) {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        }
    })? {
        Some(l) => l,
        None => {
            let interval = cfg.usize_opt("no_rope_layer_interval")?.unwrap_or(4);
            if interval == 0 {
                return Err(cfg.err("no_rope_layer_interval", "must be at least 1, got 0"));
            }
            (0..num_layers).map(|l| (l + 1) % interval != 0).collect()
        }
    };
    // Early Llama 4 configs wrote a number here (non-zero: on).
    let tuning = match cfg.present("attn_temperature_tuning") {
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        _ => cfg.bool_or("attn_temperature_tuning", true)?,
    };
    let temperature = match tuning {
        false => None,
        true => {
            let scale = cfg.f64_opt("attn_scale")?.unwrap_or(0.1);
            let floor = cfg.usize_opt("floor_scale")?.unwrap_or(8192);
            if floor == 0 || !scale.is_finite() {
                return Err(cfg.err(
                    "floor_scale",
                    format!("must be at least 1 with a finite attn_scale, got {floor} and {scale}"),
                ));
            }
            Some(NopeTemperature { scale, floor })
        }
    };
    let chunk = match cfg.present("attention_chunk_size") {
        None if cfg.map.contains_key("attention_chunk_size") => None, // null: no chunking
        None => Some(8192),
        Some(v) => match v.as_u64() {
            Some(c) if c > 0 => Some(c as usize),
            _ => {
                return Err(cfg.err(
                    "attention_chunk_size",
                    format!("must be a positive integer or null, got {v}"),
                ))
            }
        },
    };
    let chunked = match cfg.per_layer(
        "layer_types",
        num_layers,
        "\"chunked_attention\" or \"full_attention\"",
        |v| match v.as_str() {
            Some("chunked_attention") => Some(true),
            Some("full_attention") => Some(false),
            _ => None,
        },
    )? {
        Some(l) => l,
        None => rope_layers.clone(),
    };
    Ok(Llama4Attention {
        chunks: chunked.iter().map(|&c| chunk.filter(|_| c)).collect(),
        rope_layers,
        temperature,
        qk_norm: cfg.bool_or("use_qk_norm", true)?,
    })
}

/// The MoE layers: `moe_layers` (indices), else every `interleave_moe_layer_step`-th layer.
pub(super) fn moe_layers(cfg: &Cfg, num_layers: usize) -> Result<Vec<bool>, SpecError> {
    match cfg.present("moe_layers") {
        Some(Value::Array(items)) => {
            let mut moe = vec![false; num_layers];
            for v in items {
                match v.as_u64().map(|l| l as usize) {
                    Some(l) if l < num_layers => moe[l] = true,
                    _ => {
                        return Err(cfg.err(
                            "moe_layers",
                            format!("entries must be layer indices below {num_layers}, got {v}"),
                        ))
                    }
                }
            }
            Ok(moe)
        }
        Some(v) => Err(cfg.err(
            "moe_layers",
            format!("must be a list of layer indices, got {v}"),
        )),
        None => {
            let step = cfg.usize_opt("interleave_moe_layer_step")?.unwrap_or(1);
            if step == 0 {
                return Err(cfg.err("interleave_moe_layer_step", "must be at least 1, got 0"));
            }
            Ok((0..num_layers).map(|l| (l + 1) % step == 0).collect())
        }
    }
}
