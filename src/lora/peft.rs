//! Saving adapters in PEFT's format: `adapter_config.json` (sorted keys, indent 2) and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), tensor names
//! `base_model.model.<module path>.lora_A.weight`. Expert adapters follow PEFT's
//! `ParamWrapper`: for `…mlp.experts` with one targeted parameter the keys are
//! `…mlp.experts.lora_A.weight`; with both, the wrappers nest in registration order, so the
//! first registered parameter (`gate_up_proj`) is `…mlp.experts.base_layer.lora_A.weight` and
//! the second (`down_proj`) `…mlp.experts.lora_A.weight` (to be confirmed by loading into
//! PEFT 0.21 on the GPU machine, with the trainer).

use super::Adapters;
use crate::model_files::writer::{StreamWriter, TensorDecl};
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
        let path = a.model_type.transformers_name(path);
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
            let module = a.model_type.transformers_name(module);
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
    // Only the module names that matched: PEFT ≥ 0.21 rewrites `gate_proj`/`up_proj`/
    // `down_proj` that name no module of a fused-expert model (qwen3_moe, olmoe…) into expert
    // targets with a doubled rank, which would not be this adapter.
    let modules: Value = if s.target_modules.iter().any(|m| m == "all-linear") {
        json!("all-linear")
    } else {
        let matched: std::collections::BTreeSet<&str> = a
            .linear
            .keys()
            .filter_map(|path| path.rsplit('.').next())
            .collect();
        json!(s
            .target_modules
            .iter()
            .filter(|m| matched.contains(m.as_str()))
            .collect::<Vec<_>>())
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
    let parameters: Vec<String> = s
        .target_parameters
        .iter()
        .map(|t| a.model_type.transformers_name(t))
        .collect();
    m.insert("target_parameters", json!(parameters));
    m.insert("task_type", json!("CAUSAL_LM"));
    m.insert("use_dora", json!(false));
    m.insert("use_rslora", json!(s.use_rslora));
    json!(m)
}

/// Writes f32 tensors (any device) into a safetensors file, in name order; synced.
pub fn write_f32(
    path: &Path,
    tensors: &BTreeMap<String, candle_core::Tensor>,
) -> std::io::Result<()> {
    let decls: Vec<TensorDecl> = tensors
        .iter()
        .map(|(name, t)| TensorDecl::new(name.clone(), "F32", t.dims().to_vec()))
        .collect();
    let mut w = StreamWriter::create(path, &decls)?;
    for t in tensors.values() {
        let values: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(std::io::Error::other)?;
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(&bytes)?;
    }
    w.finish()
}

/// Writes the adapter into `dir` (created if needed); files are synced.
pub fn save(a: &Adapters, base_model: &str, dir: &Path) -> std::io::Result<()> {
    let tensors: BTreeMap<String, candle_core::Tensor> = named_tensors(a)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    save_with(a, base_model, dir, &tensors)
}

/// Writes `a`'s `adapter_config.json` and `tensors` (all of `a`'s, or part of them when the
/// rest goes to expert parts: `lora::parts`) as `adapter_model.safetensors` into `dir`.
pub fn save_with(
    a: &Adapters,
    base_model: &str,
    dir: &Path,
    tensors: &BTreeMap<String, candle_core::Tensor>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_f32(&dir.join("adapter_model.safetensors"), tensors)?;
    let text = serde_json::to_string_pretty(&adapter_config(a, base_model))
        .map_err(std::io::Error::other)?;
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, text + "\n")?;
    std::fs::File::open(&path)?.sync_all()
}

/// An adapter file, memory-mapped: its bytes are page cache, not a second copy of the adapter
/// beside the tensors made from it (merging a 48-layer expert adapter holds 2.6 GB of them).
fn map(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: read only; an adapter rewritten while it is read is the caller's race, as with
    // the checkpoint's own memory-mapped shards.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))
}

/// The tensors of a safetensors file written by [`write_f32`] (f32 only), by name, on the CPU.
pub fn read_f32(path: &Path) -> Result<BTreeMap<String, candle_core::Tensor>, String> {
    let io = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let bytes = map(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| io(&format!("not a readable safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(io(&format!("'{name}' is {:?}, expected F32", t.dtype())));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let tensor = candle_core::Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu)
            .map_err(|e| io(&e))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Reads a PEFT LoRA adapter (written by moeq or by PEFT) for a model of `spec`: the settings
/// from `adapter_config.json`, every tensor from `adapter_model.safetensors` by its PEFT
/// name. Keys the model has no place for, missing keys and shape mismatches are errors.
pub fn load(
    dir: &Path,
    spec: &crate::arch::ArchSpec,
    device: &candle_core::Device,
) -> Result<Adapters, String> {
    let cfg_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", cfg_path.display()))?;
    let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());
    let bad = |k: &str, why: &str| format!("{}: '{k}' {why}", cfg_path.display());
    if field("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(bad("peft_type", "must be \"LORA\""));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                k,
                "is not supported (one rank and alpha for every target)",
            ));
        }
    }
    if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err(bad("use_dora", "is not supported"));
    }
    let r = field("r")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("r", "must be a positive integer"))? as usize;
    let alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    let settings = super::LoraSettings {
        r,
        alpha,
        dropout: field("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        use_rslora: field("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        target_modules: strings(field("target_modules")),
        target_parameters: strings(field("target_parameters")),
    };
    let adapters = Adapters::new(spec, settings, 0, device).map_err(|e| e.to_string())?;
    let st_path = dir.join("adapter_model.safetensors");
    let bytes = map(&st_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", st_path.display()))?;
    let ours = named_tensors(&adapters);
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in &names {
        let key = name.replace(".default.", ".");
        let Some(var) = ours.get(&key) else {
            return Err(format!("{}: tensor '{name}' matches no LoRA target of this {} model (targets from adapter_config.json)", st_path.display(), spec.model_type.as_str()));
        };
        let view = st.tensor(name).map_err(|e| e.to_string())?;
        if view.shape() != var.dims() {
            return Err(format!(
                "{}: '{name}' has shape {:?}, the model needs {:?} (r = {r})",
                st_path.display(),
                view.shape(),
                var.dims()
            ));
        }
        let t = candle_core::Tensor::from_raw_buffer(
            view.data(),
            dtype_of(view.dtype())?,
            view.shape(),
            &candle_core::Device::Cpu,
        )
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_device(device))
        .map_err(|e| format!("{}: '{name}': {e}", st_path.display()))?;
        var.set(&t).map_err(|e| e.to_string())?;
    }
    let mut have: std::collections::BTreeSet<String> =
        names.iter().map(|n| n.replace(".default.", ".")).collect();
    // A checkpoint of an expert-parallel run keeps the expert adapters in parts.
    let parts = super::parts::join(dir)?.unwrap_or_default();
    for (name, t) in parts {
        if name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq") {
            continue;
        }
        let Some(var) = ours.get(&name) else {
            return Err(format!(
                "{}: expert part '{name}' matches no LoRA target of this {} model",
                dir.display(),
                spec.model_type.as_str()
            ));
        };
        if t.dims() != var.dims() || have.contains(&name) {
            return Err(format!(
                "{}: expert part '{name}' is {:?} (the model needs {:?}) or also in adapter_model.safetensors",
                dir.display(),
                t.dims(),
                var.dims()
            ));
        }
        var.set(&t.to_device(device).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        have.insert(name);
    }
    if let Some(missing) = ours.keys().find(|k| !have.contains(*k)) {
        return Err(format!(
            "{}: no tensor '{missing}' although adapter_config.json targets it",
            st_path.display()
        ));
    }
    Ok(adapters)
}

fn dtype_of(d: safetensors::Dtype) -> Result<candle_core::DType, String> {
    match d {
        safetensors::Dtype::F32 => Ok(candle_core::DType::F32),
        safetensors::Dtype::BF16 => Ok(candle_core::DType::BF16),
        safetensors::Dtype::F16 => Ok(candle_core::DType::F16),
        other => Err(format!(
            "adapter tensors must be f32, bf16 or f16, found {other:?}"
        )),
    }
}
