//! Serving layouts of an adapter. `per_expert` rewrites each 3-D expert adapter (PEFT's
//! `ParamWrapper` layout, docs/ARCHITECTURE.md "The expert layout") as 2-D LoRA tensors of every
//! expert's own projections — `…mlp.experts.{e}.gate_proj/up_proj/down_proj` (Mixtral:
//! `…block_sparse_moe.experts.{e}.w1/w3/w2`) — the layout servers expect for models whose
//! experts are separate linear layers. Rank and scaling stay: expert `e`'s delta `s·B_e·A_e`
//! splits into gate rows `0..I` and up rows `I..2I` of `B_e` over the same `A_e`.

use super::Adapters;
use crate::arch::ArchSpec;
use candle_core::{Result, Tensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The module names of expert `e`'s three projections in layer-relative form (gate, up, down).
fn projections(spec: &ArchSpec) -> (&'static str, [&'static str; 3]) {
    match spec.model_type.mixtral_hub_names() {
        true => ("block_sparse_moe.experts", ["w1", "w3", "w2"]),
        false => ("mlp.experts", ["gate_proj", "up_proj", "down_proj"]),
    }
}

/// Every tensor of the per-expert layout by its PEFT name (f32, CPU), linear adapters as they
/// are.
pub fn per_expert(a: &Adapters, spec: &ArchSpec) -> Result<BTreeMap<String, Tensor>> {
    if spec.model_type.moe_module() != "mlp" && !a.experts.is_empty() {
        candle_core::bail!(
            "{} checkpoints keep each layer's experts as one fused tensor: there are no per-expert projections to export adapters for (use the adapter as it is)",
            spec.model_type.as_str()
        );
    }
    let mut out = BTreeMap::new();
    for (path, l) in &a.linear {
        let prefix = format!("base_model.model.{path}");
        out.insert(format!("{prefix}.lora_A.weight"), l.a.as_tensor().clone());
        out.insert(format!("{prefix}.lora_B.weight"), l.b.as_tensor().clone());
    }
    let (module, [gate, up, down]) = projections(spec);
    for (name, e) in &a.experts {
        // `model.layers.{l}.mlp.experts.gate_up_proj` → the layer prefix and the parameter.
        let Some((layer, param)) = name
            .rsplit_once('.')
            .and_then(|(m, p)| Some((m.strip_suffix(".mlp.experts")?, p)))
        else {
            candle_core::bail!("export: unexpected expert parameter name {name}");
        };
        let (a3, b3) = (e.a.as_tensor(), e.b.as_tensor());
        let (r, n) = (e.r, e.num_experts);
        let out_dim = b3.dim(0)?;
        // B's column j·E + x belongs to expert x: view [out, r, E].
        let b_view = b3.reshape((out_dim, r, n))?;
        for x in 0..n {
            let ax = a3.narrow(0, x * r, r)?.contiguous()?;
            let bx = b_view.narrow(2, x, 1)?.squeeze(2)?.contiguous()?;
            let key = |proj: &str, part: &str| {
                format!("base_model.model.{layer}.{module}.{x}.{proj}.lora_{part}.weight")
            };
            match param {
                "gate_up_proj" => {
                    let half = out_dim / 2;
                    for (proj, rows) in [(gate, 0), (up, half)] {
                        out.insert(key(proj, "A"), ax.clone());
                        out.insert(key(proj, "B"), bx.narrow(0, rows, half)?.contiguous()?);
                    }
                }
                "down_proj" => {
                    out.insert(key(down, "A"), ax);
                    out.insert(key(down, "B"), bx);
                }
                other => candle_core::bail!("export: unexpected expert parameter {other}"),
            }
        }
    }
    Ok(out)
}

/// `adapter_config.json` for the per-expert layout: the original with the expert projections
/// added to `target_modules` (unless that is `all-linear`) and no `target_parameters`.
pub fn per_expert_config(original: &Value, spec: &ArchSpec, has_experts: bool) -> Value {
    let mut cfg = original.clone();
    if !has_experts {
        return cfg;
    }
    let (_, names) = projections(spec);
    if let Some(Value::Array(modules)) = cfg.get_mut("target_modules") {
        for n in names {
            if !modules.iter().any(|m| m == n) {
                modules.push(json!(n));
            }
        }
    } else if !cfg.get("target_modules").is_some_and(|m| m == "all-linear") {
        cfg["target_modules"] = json!(names);
    }
    cfg["target_parameters"] = json!([]);
    cfg
}
