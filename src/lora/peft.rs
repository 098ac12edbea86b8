//! Saving adapters in PEFT's format: `adapter_config.json` (sorted keys, indent 2) and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), tensor names
//! `base_model.model.<module path>.lora_A.weight`. Expert adapters follow PEFT's
//! `ParamWrapper`: for `…mlp.experts` with one targeted parameter the keys are
//! `…mlp.experts.lora_A.weight`; with both, the wrappers nest in registration order, so the
//! first registered parameter (`gate_up_proj`) is `…mlp.experts.base_layer.lora_A.weight` and
//! the second (`down_proj`) `…mlp.experts.lora_A.weight` (to be confirmed by loading into
//! PEFT 0.21 on the GPU machine, with the trainer).

use super::Adapters;
use crate::checkpoint::writer::{StreamWriter, TensorDecl};
use candle_core::Var;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// PEFT registers target parameters in this order within a module.
const PARAM_ORDER: [&str; 2] = ["gate_up_proj", "down_proj"];

/// Every adapter tensor by its PEFT name.
pub fn named_tensors(a: &Adapters) -> BTreeMap<String, Var> {
    let mut out = BTreeMap::new();
    for (path, l) in &a.linear {
        out.insert(
            format!("base_model.model.{path}.lora_A.weight"),
            l.a.clone(),
        );
        out.insert(
            format!("base_model.model.{path}.lora_B.weight"),
            l.b.clone(),
        );
    }
    // Group expert parameters by module (`…mlp.experts`) to apply PEFT's nesting.
    let mut modules: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in a.experts.keys() {
        if let Some((module, param)) = name.rsplit_once('.') {
            modules.entry(module).or_default().push(param);
        }
    }
    for (module, mut params) in modules {
        params.sort_by_key(|p| {
            PARAM_ORDER
                .iter()
                .position(|o| o == p)
                .unwrap_or(usize::MAX)
        });
        let n = params.len();
        for (i, param) in params.iter().enumerate() {
            // The last registered wrapper is outermost; each earlier one sits one `base_layer` deeper.
            let depth = ".base_layer".repeat(n - 1 - i);
            let e = &a.experts[&format!("{module}.{param}")];
            out.insert(
                format!("base_model.model.{module}{depth}.lora_A.weight"),
                e.a.clone(),
            );
            out.insert(
                format!("base_model.model.{module}{depth}.lora_B.weight"),
                e.b.clone(),
            );
        }
    }
    out
}

/// `adapter_config.json` contents.
pub fn adapter_config(a: &Adapters, base_model: &str) -> Value {
    let s = &a.settings;
    let modules: Value = if s.target_modules.iter().any(|m| m == "all-linear") {
        json!("all-linear")
    } else {
        json!(s.target_modules)
    };
    // Inserted in key order (serde_json keeps insertion order here): sorted, as PEFT's
    // `json.dumps(..., sort_keys=True)` writes them.
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("base_model_name_or_path", json!(base_model));
    m.insert("bias", json!("none"));
    m.insert("fan_in_fan_out", json!(false));
    m.insert("inference_mode", json!(true));
    m.insert("init_lora_weights", json!(true));
    m.insert("lora_alpha", json!(s.alpha));
    m.insert("lora_dropout", json!(s.dropout));
    m.insert("peft_type", json!("LORA"));
    m.insert("r", json!(s.r));
    m.insert("target_modules", modules);
    m.insert("target_parameters", json!(s.target_parameters));
    m.insert("task_type", json!("CAUSAL_LM"));
    m.insert("use_dora", json!(false));
    m.insert("use_rslora", json!(s.use_rslora));
    json!(m)
}

/// Writes the adapter into `dir` (created if needed).
pub fn save(a: &Adapters, base_model: &str, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tensors = named_tensors(a);
    let decls: Vec<TensorDecl> = tensors
        .iter()
        .map(|(name, v)| TensorDecl::new(name.clone(), "F32", v.dims().to_vec()))
        .collect();
    let mut w = StreamWriter::create(&dir.join("adapter_model.safetensors"), &decls)?;
    for v in tensors.values() {
        let values: Vec<f32> = v
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(std::io::Error::other)?;
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(&bytes)?;
    }
    w.finish()?;
    let text = serde_json::to_string_pretty(&adapter_config(a, base_model))
        .map_err(std::io::Error::other)?;
    std::fs::write(dir.join("adapter_config.json"), text + "\n")
}
