//! Qwen3-Next's and Qwen3.5's hybrid layout, read from config.json: which decoder layers are
//! Gated DeltaNet (linear attention) layers, and those layers' shapes (docs/ARCHITECTURE.md
//! decision 34).

use super::cfg::Cfg;
use super::spec::SpecError;

/// How a Gated DeltaNet layer's input projections are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearProjections {
    /// Qwen3-Next: `in_proj_qkvz [2·Kd + 2·Vd, H]` and `in_proj_ba [2·Hv, H]`, their rows
    /// grouped per key head — each group holds that head's q, k, then its value heads' v and z
    /// (and b then a).
    Grouped,
    /// Qwen3.5: `in_proj_qkv` (all of q, then k, then v), `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Split,
}

/// A Gated DeltaNet layer's shapes (`linear_*` config keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinearAttnSpec {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// The depthwise causal convolution's width over time (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
    pub projections: LinearProjections,
}

impl LinearAttnSpec {
    /// All key heads' width (`Kd`), also q's.
    pub fn key_dim(&self) -> usize {
        self.key_heads * self.key_head_dim
    }

    /// All value heads' width (`Vd`), also z's and the output projection's input.
    pub fn value_dim(&self) -> usize {
        self.value_heads * self.value_head_dim
    }

    /// The convolved channels: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// Value heads per key head (q and k are repeated this many times).
    pub fn group(&self) -> usize {
        self.value_heads / self.key_heads
    }
}

/// The Gated DeltaNet shapes and, per layer, whether it is a linear-attention layer:
/// `layer_types` (`linear_attention` / `full_attention`), else every layer but each
/// `full_attention_interval`-th (default 4), as transformers' config classes fill it.
pub(super) fn linear_attention(
    cfg: &Cfg,
    num_layers: usize,
    projections: LinearProjections,
) -> Result<(LinearAttnSpec, Vec<bool>), SpecError> {
    let get = |key: &str, default: usize| -> Result<usize, SpecError> {
        match cfg.usize_opt(key)?.unwrap_or(default) {
            0 => Err(cfg.err(key, "must be at least 1, got 0")),
            v => Ok(v),
        }
    };
    let spec = LinearAttnSpec {
        key_heads: get("linear_num_key_heads", 16)?,
        value_heads: get("linear_num_value_heads", 32)?,
        key_head_dim: get("linear_key_head_dim", 128)?,
        value_head_dim: get("linear_value_head_dim", 128)?,
        conv_kernel: get("linear_conv_kernel_dim", 4)?,
        projections,
    };
    if spec.value_heads % spec.key_heads != 0 {
        return Err(cfg.err(
            "linear_num_value_heads",
            format!(
                "({}) must be a multiple of linear_num_key_heads ({})",
                spec.value_heads, spec.key_heads
            ),
        ));
    }
    let kinds = cfg.per_layer(
        "layer_types",
        num_layers,
        "\"linear_attention\" or \"full_attention\"",
        |v| match v.as_str()? {
            "linear_attention" => Some(true),
            "full_attention" => Some(false),
            _ => None,
        },
    )?;
    let linear = match kinds {
        Some(k) => k,
        None => {
            let every = get("full_attention_interval", 4)?;
            (0..num_layers).map(|l| (l + 1) % every != 0).collect()
        }
    };
    Ok((spec, linear))
}
