//! A head's geometry from config.json: its size, latent attention's dims, the rotated dims
//! and the softmax scale.

use super::cfg::Cfg;
use super::rows::Row;
use super::spec::{LatentSpec, RopeSpec, Rotary, SpecError};

/// `head_dim` (or Hunyuan's `attention_head_dim`), or `hidden_size / num_attention_heads`
/// when absent.
pub(super) fn heads_dim(
    cfg: &Cfg,
    row: &Row,
    hidden_size: usize,
    num_heads: usize,
) -> Result<usize, SpecError> {
    let given = match (cfg.usize_opt("head_dim")?, row.hunyuan_keys) {
        (None, true) => cfg.usize_opt("attention_head_dim")?,
        (d, _) => d,
    };
    match given {
        Some(d) if d > 0 => Ok(d),
        _ if hidden_size % num_heads != 0 => Err(cfg.err(
            "head_dim",
            format!("is absent and hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads})"),
        )),
        _ => Ok(hidden_size / num_heads),
    }
}

pub(super) fn latent_spec(cfg: &Cfg) -> Result<LatentSpec, SpecError> {
    let q_lora_rank = cfg.usize_opt("q_lora_rank")?.filter(|&r| r > 0);
    let rope_dim = cfg.usize_req("qk_rope_head_dim")?;
    if rope_dim % 2 != 0 {
        return Err(cfg.err("qk_rope_head_dim", format!("must be even, got {rope_dim}")));
    }
    Ok(LatentSpec {
        q_lora_rank,
        kv_lora_rank: cfg.usize_req("kv_lora_rank")?,
        nope_dim: cfg.usize_req("qk_nope_head_dim")?,
        rope_dim,
        v_head_dim: cfg.usize_req("v_head_dim")?,
    })
}

/// The rotated dims: `partial_rotary_factor` (in `rope_parameters`, else at the top level, else
/// the row's default) of an ordinary head, the `qk_rope_head_dim` part of a latent one.
pub(super) fn rotary(
    cfg: &Cfg,
    row: &Row,
    rope: &RopeSpec,
    head_dim: usize,
    latent: Option<LatentSpec>,
) -> Result<Rotary, SpecError> {
    let interleaved = match row.reads_rope_interleave {
        true => cfg.bool_or("rope_interleave", row.default_rope_interleave)?,
        false => row.default_rope_interleave,
    };
    let factor = match rope.extra.get("partial_rotary_factor") {
        Some(v) => v.as_f64(),
        None => cfg.f64_opt("partial_rotary_factor")?,
    };
    let factor = match (factor, row.reads_rotary_dim) {
        (None, true) => cfg
            .usize_opt("rotary_dim")?
            .map(|d| d as f64 / head_dim as f64),
        _ => factor,
    };
    let factor = match (row.default_partial_rotary, latent) {
        (Some(default), None) => factor.unwrap_or(default),
        _ => 1.0,
    };
    let base = latent.map_or(head_dim, |l| l.rope_dim);
    let dim = (base as f64 * factor) as usize;
    if dim == 0 || dim % 2 != 0 || dim > base {
        return Err(cfg.err(
            "partial_rotary_factor",
            format!(
                "{factor} of {base} dims gives {dim} rotated dims: must be even and at least 2"
            ),
        ));
    }
    Ok(Rotary { dim, interleaved })
}

/// `head_dim^-1/2`; latent attention with YaRN multiplies it by `mscale(factor,
/// mscale_all_dim)²` (transformers' `yarn_apply_mscale`).
pub(super) fn attention_scale(rope: &RopeSpec, head_dim: usize, latent: bool) -> f64 {
    let base = 1.0 / (head_dim as f64).sqrt();
    let all_dim = rope
        .extra
        .get("mscale_all_dim")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    match (latent, rope.rope_type.as_str(), rope.factor) {
        (true, t, Some(factor)) if t != "default" && all_dim != 0.0 && factor > 1.0 => {
            let m = 0.1 * all_dim * factor.ln() + 1.0;
            base * m * m
        }
        _ => base,
    }
}
