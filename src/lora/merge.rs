//! Merging an adapter into its base checkpoint (`moeq merge`): every weight an adapter targets
//! becomes `W + s·B·A` — attention and MLP projections, and each expert `e` of a 3-D expert
//! parameter `W_e + s·B_e·A_e` (PEFT's layout: `A_e = A[e·r..(e+1)·r]`, `B_e = B[:, e::E]`) —
//! written in the base checkpoint's own layout: the same files, tensor names, order and shapes
//! (per-expert hub keys stay per expert, Mixtral's `w1/w3/w2` stay, fused stays fused, gpt-oss's
//! and Llama 4's `[E, in, out]` experts get each update as `[in, out]`, hub spellings such as
//! Llama 4's `feed_forward.` stay), with the sum computed in f32 and rounded once to the output
//! dtype. Tensors stream one at a time (an expert parameter one expert at a time), so memory
//! stays at about one tensor however large the checkpoint.

use super::{Adapters, ExpertLora, LinearLora};
use crate::arch::Component;
use crate::model_files::writer::{
    dense_bytes, io, st_dtype, write_index, write_side_files, written_atomically, StreamWriter,
    TensorDecl,
};
use crate::model_files::{ExpertLayout, ExpertParam, ModelDir, ModelFilesError, INDEX_FILE};
use crate::util::progress::Progress;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// What is added to one on-disk tensor.
enum Delta<'a> {
    Linear(&'a LinearLora),
    /// Rows `rows` of expert `expert`'s update (a per-expert tensor), or every expert's whole
    /// update (`expert` None: a fused `[E, out, in]` tensor, or `[E, in, out]` where
    /// `transposed`).
    Expert {
        lora: &'a ExpertLora,
        expert: Option<usize>,
        rows: Range<usize>,
        transposed: bool,
    },
}

/// What was written.
pub struct MergeReport {
    pub tensors: usize,
    pub merged: usize,
    pub bytes: u64,
}

fn format_err(dir: &ModelDir, problem: String) -> ModelFilesError {
    ModelFilesError::Format {
        path: dir.root.display().to_string(),
        problem,
    }
}

/// Which on-disk tensors each adapter changes. Every adapter must find its weight.
fn plan<'a>(
    dir: &ModelDir,
    adapters: &'a Adapters,
) -> Result<HashMap<String, Delta<'a>>, ModelFilesError> {
    let spec = &dir.spec;
    let layout = dir.layout().ok_or_else(|| {
        format_err(
            dir,
            "no weights in this directory (only config.json): nothing to merge into".into(),
        )
    })?;
    let mut deltas = HashMap::new();
    let mut used = 0;
    for p in spec.params() {
        if p.component == Component::Experts {
            let Some(lora) = adapters.experts.get(&p.name) else {
                continue;
            };
            used += 1;
            let Some((_, which)) = ExpertParam::parse(&p.name) else {
                return Err(format_err(
                    dir,
                    format!("'{}' is not an expert parameter", p.name),
                ));
            };
            let out = p.shape[1];
            if layout == ExpertLayout::Mxfp4 {
                return Err(format_err(
                    dir,
                    "the experts are MXFP4 (4-bit): merge needs the unquantized weights; point --model at the bf16 release of this model".into(),
                ));
            }
            if matches!(layout, ExpertLayout::Fused | ExpertLayout::Transposed) {
                deltas.insert(
                    dir.disk_name(layout, &p.name),
                    Delta::Expert {
                        lora,
                        expert: None,
                        rows: 0..out,
                        transposed: layout == ExpertLayout::Transposed,
                    },
                );
                continue;
            }
            // Per expert: gate_up as [gate, up] halves, down whole.
            let parts: Vec<Range<usize>> = match which {
                ExpertParam::GateUp => vec![0..out / 2, out / 2..out],
                ExpertParam::Down => std::iter::once(0..out).collect(),
            };
            let names = layout.disk_names(&p.name, spec.num_experts);
            for (k, name) in names.into_iter().enumerate() {
                let (expert, part) = (k / parts.len(), k % parts.len());
                let rows = parts[part].clone();
                deltas.insert(
                    name,
                    Delta::Expert {
                        lora,
                        expert: Some(expert),
                        rows,
                        transposed: false,
                    },
                );
            }
        } else if let Some(lora) = p
            .name
            .strip_suffix(".weight")
            .and_then(|m| adapters.linear.get(m))
        {
            used += 1;
            deltas.insert(dir.disk_name(layout, &p.name), Delta::Linear(lora));
        }
    }
    let total = adapters.linear.len() + adapters.experts.len();
    if used != total {
        let missing: Vec<&String> = adapters
            .linear
            .keys()
            .chain(adapters.experts.keys())
            .filter(|k| {
                !spec
                    .params()
                    .iter()
                    .any(|p| p.name == **k || p.name == format!("{k}.weight"))
            })
            .take(3)
            .collect();
        return Err(format_err(
            dir,
            format!("the adapter targets weights this model does not have ({missing:?}): is it an adapter of this model?"),
        ));
    }
    // An update whose tensor the files lack would be dropped without a word.
    if let Some(name) = deltas.keys().filter(|n| dir.locate(n).is_none()).min() {
        return Err(format_err(
            dir,
            format!("tensor '{name}', which the adapter updates, is missing from the checkpoint"),
        ));
    }
    Ok(deltas)
}

/// `s·B·A` `[out, in]` in f32 on the CPU.
fn product(a: &Tensor, b: &Tensor, scaling: f64) -> candle_core::Result<Tensor> {
    b.to_dtype(DType::F32)?
        .matmul(&a.to_dtype(DType::F32)?)?
        .affine(scaling, 0.0)
}

/// `w` (one 2-D weight, or one expert's) plus `delta`, rounded to `dtype`.
fn merged(w: &Tensor, delta: &Tensor, dtype: DType, name: &str) -> Result<Tensor, ModelFilesError> {
    if w.dims() != delta.dims() {
        return Err(ModelFilesError::Format {
            path: name.to_string(),
            problem: format!(
                "the adapter's update has shape {:?}, the weight {:?}: is it an adapter of this model?",
                delta.dims(),
                w.dims()
            ),
        });
    }
    Ok((w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?)
}

/// Writes `dir` with `adapters` merged into `out` (a new directory): the input's files and
/// index, each float tensor in `dtype` (None: as it is), config.json without
/// `quantization_config`, tokenizer files copied.
pub fn merge(
    dir: &ModelDir,
    adapters: &Adapters,
    out: &Path,
    dtype: Option<DType>,
) -> Result<MergeReport, ModelFilesError> {
    if crate::model_files::frozen::prequantized(dir).is_some() {
        return Err(format_err(
            dir,
            "the checkpoint is pre-quantized (4-bit): merge needs the unquantized weights; point --model at the checkpoint it was quantized from".into(),
        ));
    }
    let deltas = plan(dir, adapters)?;
    let scaling = adapters.settings.scaling();
    let cpu = Device::Cpu;
    let total: u64 = dir.shards().iter().map(|s| s.file_len() as u64).sum();
    let progress = Progress::new(total, "merging the adapter into the base weights");
    let mut report = MergeReport {
        tensors: 0,
        merged: 0,
        bytes: 0,
    };
    let index = dir.shards().len() > 1 || dir.root.join(INDEX_FILE).is_file();
    written_atomically(out, |tmp| {
        let mut weight_map = serde_json::Map::new();
        for shard in dir.shards() {
            let file = shard
                .path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let path = tmp.join(&file);
            // The tensors in file order, each in the output dtype.
            let mut names: Vec<&String> = shard.names().collect();
            names.sort_by_key(|n| shard.info(n).map(|i| i.data_offsets.0));
            let mut decls = Vec::with_capacity(names.len());
            let mut dtypes = Vec::with_capacity(names.len());
            for name in &names {
                let (_, have, shape) = dir.raw(name, Some(0..0))?;
                let want = match (dtype, have) {
                    (Some(d), DType::BF16 | DType::F16 | DType::F32) => d,
                    _ => have,
                };
                decls.push(TensorDecl::new(name.as_str(), st_dtype(want), shape));
                dtypes.push((have, want));
            }
            let mut w = StreamWriter::create(&path, &decls).map_err(io(&path))?;
            for ((name, decl), (have, want)) in names.iter().zip(&decls).zip(dtypes) {
                let (bytes, _, shape) = dir.raw(name, None)?;
                // Deltas are keyed by the text model's names (`ArchSpec::weights_prefix`).
                let key = dir.spec.text_name(name).unwrap_or_else(|| name.to_string());
                let delta = deltas.get(&key);
                let tensor = |bytes: &[u8], shape: &[usize]| {
                    Tensor::from_raw_buffer(bytes, have, shape, &cpu)
                };
                match delta {
                    None if have == want => w.write(bytes).map_err(io(&path))?,
                    None => {
                        let t = tensor(bytes, &shape)?.to_dtype(want)?;
                        w.write(&dense_bytes(&t)?).map_err(io(&path))?
                    }
                    Some(Delta::Linear(l)) => {
                        let d = product(l.a.as_tensor(), l.b.as_tensor(), scaling)?;
                        let t = merged(&tensor(bytes, &shape)?, &d, want, name)?;
                        w.write(&dense_bytes(&t)?).map_err(io(&path))?
                    }
                    Some(Delta::Expert {
                        lora,
                        expert: Some(e),
                        rows,
                        ..
                    }) => {
                        let b = lora.expert_b(*e)?.narrow(0, rows.start, rows.len())?;
                        let d = product(&lora.expert_a(*e)?, &b, scaling)?;
                        let t = merged(&tensor(bytes, &shape)?, &d, want, name)?;
                        w.write(&dense_bytes(&t)?).map_err(io(&path))?
                    }
                    Some(Delta::Expert {
                        lora,
                        expert: None,
                        transposed,
                        ..
                    }) => {
                        let n = lora.num_experts;
                        if shape.len() != 3 || shape[0] != n {
                            return Err(ModelFilesError::Format {
                                path: name.to_string(),
                                problem: format!("shape {shape:?} does not hold the adapter's {n} experts: is it an adapter of this model?"),
                            });
                        }
                        // One expert at a time.
                        let per = bytes.len() / n;
                        for (e, chunk) in bytes.chunks(per).enumerate() {
                            // `[out, in]`, or `[in, out]` from swapped factors (Llama 4's
                            // PEFT layout: `ExpertLora::swapped`), as `[E, in, out]` is stored.
                            let d = product(&lora.expert_a(e)?, &lora.expert_b(e)?, scaling)?;
                            let d = match *transposed != lora.swapped {
                                true => d.t()?.contiguous()?,
                                false => d,
                            };
                            let t = merged(&tensor(chunk, &shape[1..])?, &d, want, name)?;
                            w.write(&dense_bytes(&t)?).map_err(io(&path))?;
                        }
                    }
                }
                report.merged += usize::from(delta.is_some());
                report.tensors += 1;
                report.bytes += decl.byte_len() as u64;
                weight_map.insert(name.to_string(), file.clone().into());
                progress.inc(bytes.len() as u64);
                crate::util::mem::sample_peak();
            }
            w.finish().map_err(io(&path))?;
        }
        if index {
            write_index(tmp, report.bytes, &weight_map).map_err(io(tmp))?;
        }
        let mut config = dir.config_json.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.remove("quantization_config");
            if let Some(d) = dtype {
                let name = crate::model_files::bnb::torch_dtype_name(d);
                for key in ["torch_dtype", "dtype"] {
                    if obj.contains_key(key) {
                        obj.insert(key.into(), name.into());
                    }
                }
            }
        }
        write_side_files(dir, tmp, &config)
    })?;
    progress.finish();
    Ok(report)
}
