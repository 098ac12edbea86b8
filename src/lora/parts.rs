//! Expert adapters in parts (checkpoints of expert-parallel runs, docs/ARCHITECTURE.md decision
//! 13): each rank of the first expert-parallel group writes the experts it holds into
//! `experts-<first>-<end>-of-<total>.safetensors` beside the adapter — its expert adapter
//! tensors by PEFT name and their optimizer moments (`<name>.exp_avg`, `.exp_avg_sq`) in the
//! held experts' layout — so no rank gathers every expert's state. [`join`] puts the parts of a
//! directory back into whole tensors, whatever world size wrote them.

use candle_core::Tensor;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The file of experts `experts` of `total`.
pub fn file_name(experts: &Range<usize>, total: usize) -> String {
    format!(
        "experts-{:05}-{:05}-of-{total:05}.safetensors",
        experts.start, experts.end
    )
}

/// `(experts, total)` of a part's file name.
fn parse(name: &str) -> Option<(Range<usize>, usize)> {
    let rest = name
        .strip_prefix("experts-")?
        .strip_suffix(".safetensors")?;
    let (range, total) = rest.split_once("-of-")?;
    let (first, end) = range.split_once('-')?;
    Some((first.parse().ok()?..end.parse().ok()?, total.parse().ok()?))
}

/// A part's experts and file.
pub type Part = (Range<usize>, PathBuf);

/// The parts in `dir` in expert order, checked to cover every expert once; None when `dir`
/// has none.
pub fn list(dir: &Path) -> Result<Option<Vec<Part>>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut parts: Vec<(Range<usize>, usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let (experts, total) = parse(&e.file_name().to_string_lossy())?;
            Some((experts, total, e.path()))
        })
        .collect();
    if parts.is_empty() {
        return Ok(None);
    }
    parts.sort_by_key(|p| p.0.start);
    let total = parts[0].1;
    let mut next = 0;
    for (experts, t, path) in &parts {
        if *t != total || experts.start != next || experts.end <= experts.start {
            return Err(format!(
                "{}: expert parts do not cover experts 0..{total} once (at {}): the checkpoint is damaged",
                dir.display(),
                path.display()
            ));
        }
        next = experts.end;
    }
    if next != total {
        return Err(format!(
            "{}: expert parts end at expert {next} of {total}: the checkpoint is damaged",
            dir.display()
        ));
    }
    Ok(Some(parts.into_iter().map(|(e, _, p)| (e, p)).collect()))
}

/// Whether `name` (an adapter tensor or its moment) is in `lora_B`'s layout: columns
/// expert-minor (`B_e = B[:, e::E]`); otherwise `lora_A`'s, rows expert-major.
fn columns_expert_minor(name: &str) -> bool {
    name.contains(".lora_B")
}

/// Every tensor of the parts in `dir`, whole: `lora_A`-layout parts stacked along the rows in
/// expert order, `lora_B`-layout ones interleaved back into expert-minor columns. None when
/// `dir` has no parts.
pub fn join(dir: &Path) -> Result<Option<BTreeMap<String, Tensor>>, String> {
    let Some(parts) = list(dir)? else {
        return Ok(None);
    };
    let total = parts.last().map_or(0, |p| p.0.end);
    let mut pieces: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    for (i, (experts, path)) in parts.iter().enumerate() {
        let tensors = super::peft::read_f32(path)?;
        if i > 0 && tensors.len() != pieces.len() {
            return Err(format!(
                "{}: {} tensors, the first part {}",
                path.display(),
                tensors.len(),
                pieces.len()
            ));
        }
        for (name, t) in tensors {
            let held = experts.len();
            let bad = |why: &str| format!("{}: '{name}' {why}", path.display());
            let t = if columns_expert_minor(&name) {
                let (out, cols) = t.dims2().map_err(|_| bad("is not 2-D"))?;
                if cols % held != 0 {
                    return Err(bad("has columns that are not r per held expert"));
                }
                t.reshape((out, cols / held, held))
                    .map_err(|e| bad(&e.to_string()))?
            } else {
                let rows = t.dim(0).map_err(|_| bad("is a scalar"))?;
                if rows % held != 0 {
                    return Err(bad("has rows that are not r per held expert"));
                }
                t
            };
            if i > 0 && !pieces.contains_key(&name) {
                return Err(bad("is not in the first part"));
            }
            pieces.entry(name).or_default().push(t);
        }
    }
    let mut out = BTreeMap::new();
    for (name, ts) in pieces {
        let joined = if columns_expert_minor(&name) {
            let t = Tensor::cat(&ts, 2).map_err(|e| format!("'{name}': {e}"))?;
            let (o, r, e) = t.dims3().map_err(|e| e.to_string())?;
            if e != total {
                return Err(format!("'{name}': {e} experts joined of {total}"));
            }
            t.reshape((o, r * e)).map_err(|e| e.to_string())?
        } else {
            Tensor::cat(&ts, 0).map_err(|e| format!("'{name}': {e}"))?
        };
        out.insert(name, joined);
    }
    Ok(Some(out))
}
