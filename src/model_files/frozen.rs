//! Loading the frozen base: every `nn.Linear`-equivalent weight (attention, experts, shared
//! expert, dense MLP) becomes a bitsandbytes 4-bit parameter as it is read; embeddings,
//! norms, routers, biases and `lm_head` stay dense. Expert parameters are read and quantized
//! one expert at a time and the bf16 copy is dropped at once, so peak memory is the NF4 total
//! plus about one expert slice. A rank owning experts `[e0, e1)` quantizes only those; the
//! parameter-wide statistics come from the absmax of all experts, gathered in global order
//! (`StatsGather`), so the bytes do not depend on the world size.
//! A pre-quantized checkpoint (`moeq quantize` output) is read as it is.

use super::{bnb, ExpertParam, ModelDir, ModelFilesError};
use crate::arch::Component;
use crate::arch::ParamInfo;
use crate::quant::sharded::{check_expert_alignment, global_absmax, quantize_slice, SliceQuant};
use crate::quant::{QuantInput, QuantSettings, QuantizedParam};
use crate::util::phases::timed;
use crate::util::prefetch::in_order;

#[cfg(feature = "cuda")]
pub use super::cuda_quantizer::CudaQuantizer;
use crate::util::progress::Progress;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::ops::Range;

pub use crate::quant::frozen::{Frozen, FrozenBase, LoadReport};

/// Quantizes one contiguous slice of a parameter: on the CPU, or uploaded to a GPU.
pub trait SliceQuantizer {
    fn quantize(
        &mut self,
        name: &str,
        x: &Tensor,
        start: usize,
        total: usize,
        settings: &QuantSettings,
    ) -> Result<SliceQuant, String>;

    fn peak_device_bytes(&self) -> Option<u64> {
        None
    }

    /// Where weights drawn at load time (`ModelDir::generate_weights`) are best generated.
    fn device(&self) -> candle_core::Device {
        candle_core::Device::Cpu
    }

    /// Whether codes (and drawn dense tensors) stay on `device()` for training instead of
    /// being copied to the host.
    fn keeps_on_device(&self) -> bool {
        false
    }

    /// With `keeps_on_device`, the codes of the slices quantized since the last call, in
    /// order, as one device tensor (the slices' `packed` are then empty).
    fn take_device_codes(&mut self) -> Result<Option<Tensor>, String> {
        Ok(None)
    }
}

impl Frozen {
    /// The packed codes of a quantized parameter on the host (downloaded when they were kept
    /// on the GPU); None for a dense tensor.
    pub fn host_codes(&self) -> candle_core::Result<Option<std::borrow::Cow<'_, [u8]>>> {
        match self {
            Frozen::Quantized { codes: Some(c), .. } => {
                Ok(Some(std::borrow::Cow::Owned(c.to_vec1()?)))
            }
            Frozen::Quantized { param, .. } => Ok(Some(std::borrow::Cow::Borrowed(&param.packed))),
            Frozen::Dense(_) | Frozen::DenseExperts { .. } => Ok(None),
        }
    }
}

/// All-gathers a parameter's per-block absmax across ranks, in global block order. A single
/// process already holds everything.
pub trait StatsGather {
    fn gather(&mut self, name: &str, local: Vec<f32>) -> Result<Vec<f32>, String>;
}

pub struct SingleProcess;

impl StatsGather for SingleProcess {
    fn gather(&mut self, _name: &str, local: Vec<f32>) -> Result<Vec<f32>, String> {
        Ok(local)
    }
}

pub struct CpuQuantizer;

fn slice_of<T: QuantInput + candle_core::WithDType>(
    name: &str,
    x: &Tensor,
    start: usize,
    total: usize,
    settings: &QuantSettings,
) -> Result<SliceQuant, String> {
    let v: Vec<T> = x
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| e.to_string())?;
    quantize_slice(name, &v, start, total, settings).map_err(|e| e.to_string())
}

impl SliceQuantizer for CpuQuantizer {
    fn quantize(
        &mut self,
        name: &str,
        x: &Tensor,
        start: usize,
        total: usize,
        settings: &QuantSettings,
    ) -> Result<SliceQuant, String> {
        match x.dtype() {
            DType::BF16 => slice_of::<half::bf16>(name, x, start, total, settings),
            DType::F16 => slice_of::<half::f16>(name, x, start, total, settings),
            DType::F32 => slice_of::<f32>(name, x, start, total, settings),
            other => Err(format!("{name}: cannot quantize dtype {other:?}")),
        }
    }
}

fn err(dir: &ModelDir, problem: String) -> ModelFilesError {
    ModelFilesError::Format {
        path: dir.root.display().to_string(),
        problem,
    }
}

/// The quantization settings a pre-quantized checkpoint was written with, from its
/// config.json `quantization_config` (None for an ordinary checkpoint).
pub fn prequantized(dir: &ModelDir) -> Option<QuantSettings> {
    let q = dir.config_json.get("quantization_config")?;
    if q.get("quant_method")?.as_str()? != "bitsandbytes" || !q.get("load_in_4bit")?.as_bool()? {
        return None;
    }
    let kind = match q.get("bnb_4bit_quant_type").and_then(|v| v.as_str()) {
        Some("fp4") => crate::quant::QuantKind::Fp4,
        _ => crate::quant::QuantKind::Nf4,
    };
    let double_quant = q
        .get("bnb_4bit_use_double_quant")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    // transformers' config has no blocksize: each parameter's quant_state carries it.
    let first = dir.spec.params().into_iter().find(|p| p.quantized)?;
    let blocksize = bnb::read(dir, &first.name)
        .map(|q| q.settings.blocksize)
        .unwrap_or(64);
    Some(QuantSettings {
        kind,
        blocksize,
        double_quant,
    })
}

/// Loads the frozen base. `experts` restricts expert parameters to the owned experts
/// (None: all). Progress is reported by bytes read.
pub fn load(
    dir: &ModelDir,
    settings: QuantSettings,
    experts: Option<Range<usize>>,
    quantizer: &mut dyn SliceQuantizer,
    gather: &mut dyn StatsGather,
) -> Result<FrozenBase, ModelFilesError> {
    let started = std::time::Instant::now();
    let spec = &dir.spec;
    let owned = experts.unwrap_or(0..spec.num_experts);
    if owned.start > owned.end || owned.end > spec.num_experts {
        return Err(err(
            dir,
            format!("owned experts {owned:?} outside 0..{}", spec.num_experts),
        ));
    }
    let pre = prequantized(dir);
    if let Some(pre) = pre {
        if pre != settings {
            return Err(err(
                dir,
                format!(
                    "checkpoint is pre-quantized with {} blocksize {} double_quant {}, but the run asks for {} blocksize {} double_quant {} (re-run moeq quantize with those settings, or change the config)",
                    pre.kind.as_str(), pre.blocksize, pre.double_quant, settings.kind.as_str(), settings.blocksize, settings.double_quant
                ),
            ));
        }
    }
    let params = spec.params();
    let total_bytes: u64 = params.iter().map(|p| p.numel() as u64 * 2).sum();
    let progress = Progress::new(total_bytes, "loading and quantizing the frozen base");
    let mut report = LoadReport::default();
    let mut tensors = BTreeMap::new();
    let generated = dir.generated().is_some();
    let read_prequantized = |p: &ParamInfo| pre.is_some() && !generated && p.quantized;
    let split_by_expert =
        |p: &ParamInfo| p.quantized && p.component == Component::Experts && !read_prequantized(p);
    // One item per bf16 read: one owned expert of an expert parameter, else the whole
    // parameter (also an expert parameter of which this rank owns none: its statistics are
    // still gathered).
    let items: Vec<(usize, Option<usize>)> = params
        .iter()
        .enumerate()
        .flat_map(|(k, p)| match split_by_expert(p) && !owned.is_empty() {
            true => owned.clone().map(|e| (k, Some(e))).collect::<Vec<_>>(),
            false => vec![(k, None)],
        })
        .collect();
    for p in params.iter().filter(|p| split_by_expert(p)) {
        check_expert_alignment(&p.name, p.shape[1] * p.shape[2], &settings)
            .map_err(|e| err(dir, e.to_string()))?;
    }
    // The bf16 values of `p` (experts: `experts`), read from disk or drawn on `device`.
    let read = |p: &ParamInfo, experts: Option<Range<usize>>, device: &candle_core::Device| match (
        dir.generated(),
        experts,
    ) {
        (Some(g), e) => g.param(spec, p, e.unwrap_or(0..0), device),
        (None, Some(e)) => match ExpertParam::parse(&p.name) {
            Some((layer, which)) => dir.read_experts(layer, which, e),
            None => Err(err(dir, format!("'{}' is not an expert parameter", p.name))),
        },
        (None, None) => dir.read(&p.name),
    };
    // Reads from disk run ahead on threads (reading and joining slices is CPU work) while
    // this thread quantizes; weights drawn on the device and 4-bit reads are done in order
    // here (None).
    let cpu = candle_core::Device::Cpu;
    let prefetch = |i: usize| {
        let (k, e) = items[i];
        let p = &params[k];
        // An expert parameter of which this rank owns nothing is not read at all.
        let nothing_to_read = split_by_expert(p) && e.is_none();
        (!generated && !read_prequantized(p) && !nothing_to_read).then(|| {
            timed("load: read (summed over reader threads)", &cpu, || {
                read(p, e.map(|e| e..e + 1), &cpu).map(|t| {
                    let bad = nonfinite(&t);
                    (t, bad)
                })
            })
        })
    };
    let threads = match generated {
        true => 0,
        false => std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 8)),
    };
    // Codes and absmax of the expert parameter being assembled (straight into its buffers).
    let mut assembling: Option<(Vec<u8>, Vec<f32>)> = None;
    std::thread::scope(|scope| {
        // The nested statistics of each expert parameter are computed on a thread while the
        // next parameter loads.
        let mut statistics = Vec::new();
        in_order(
            items.len(),
            threads,
            4 * threads,
            prefetch,
            |i, mut prefetched| {
                let (k, e) = items[i];
                let p = &params[k];
                let dev = quantizer.device();
                // The tensor, with its NaN/Inf count added to the report.
                let mut take = |experts: Option<Range<usize>>| {
                    let (t, bad) = match prefetched.take() {
                        Some(x) => x?,
                        None => {
                            let t = timed("load: read or draw", &dev, || read(p, experts, &dev))?;
                            let bad = nonfinite(&t);
                            (t, bad)
                        }
                    };
                    if bad > 0 {
                        *report.nonfinite.entry(p.name.clone()).or_default() += bad;
                    }
                    Ok::<_, ModelFilesError>(t)
                };
                let frozen = if !p.quantized {
                    // Dense tensors stay on the CPU; drawn ones are drawn on the quantizer's device.
                    let t = take(None)?;
                    let t = match quantizer.keeps_on_device() {
                        true => t,
                        false => t.to_device(&cpu)?,
                    };
                    report.bytes_read += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                    report.dense_bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                    Some(Frozen::Dense(t))
                } else if read_prequantized(p) {
                    let mut param = bnb::read(dir, &p.name)?;
                    let bad = match &param.absmax {
                        crate::quant::Absmax::Plain(a) => {
                            a.iter().filter(|v| !v.is_finite()).count()
                        }
                        crate::quant::Absmax::Nested(n) => {
                            let mut bad = n.nested_absmax.iter().filter(|v| !v.is_finite()).count();
                            bad += usize::from(!n.offset.is_finite());
                            bad
                        }
                    };
                    if bad > 0 {
                        report.nonfinite.insert(p.name.clone(), bad);
                    }
                    if param.shape != p.shape {
                        return Err(err(
                            dir,
                            format!(
                                "'{}' has shape {:?} but config.json implies {:?}",
                                p.name, param.shape, p.shape
                            ),
                        ));
                    }
                    let experts =
                        if p.component == Component::Experts && owned != (0..spec.num_experts) {
                            let per_expert_bytes = p.shape[1] * p.shape[2] / 2;
                            param.packed = param.packed
                                [owned.start * per_expert_bytes..owned.end * per_expert_bytes]
                                .to_vec();
                            Some(owned.clone())
                        } else {
                            None
                        };
                    report.quantized_bytes += quantized_size(&param, None);
                    Some(Frozen::Quantized {
                        param,
                        experts,
                        codes: None,
                    })
                } else if split_by_expert(p) {
                    let per_expert = p.shape[1] * p.shape[2];
                    let (packed, local) = assembling.get_or_insert_with(|| {
                        (
                            Vec::with_capacity(owned.len() * per_expert / 2),
                            Vec::with_capacity(owned.len() * per_expert / settings.blocksize),
                        )
                    });
                    if let Some(e) = e {
                        let x = take(Some(e..e + 1))?;
                        report.bytes_read += (x.elem_count() * x.dtype().size_in_bytes()) as u64;
                        let slice = quantizer
                            .quantize(&p.name, &x, e * per_expert, p.numel(), &settings)
                            .map_err(|e| err(dir, e))?;
                        packed.extend_from_slice(&slice.packed);
                        local.extend_from_slice(&slice.absmax);
                    }
                    if e.is_none_or(|e| e + 1 == owned.end) {
                        let (packed, local) = assembling.take().unwrap_or_default();
                        let codes = quantizer.take_device_codes().map_err(|e| err(dir, e))?;
                        let all = timed("load: statistics (gather)", &cpu, || {
                            gather.gather(&p.name, local).map_err(|e| err(dir, e))
                        })?;
                        let job = scope.spawn(move || {
                            timed(
                                "load: statistics (background)",
                                &candle_core::Device::Cpu,
                                || global_absmax(all, &settings),
                            )
                        });
                        statistics.push((k, packed, codes, job));
                    }
                    None
                } else {
                    let x = take(None)?;
                    report.bytes_read += (x.elem_count() * x.dtype().size_in_bytes()) as u64;
                    let slice = quantizer
                        .quantize(&p.name, &x, 0, p.numel(), &settings)
                        .map_err(|e| err(dir, e))?;
                    let param = QuantizedParam {
                        shape: p.shape.clone(),
                        settings,
                        packed: slice.packed,
                        absmax: global_absmax(slice.absmax, &settings),
                    };
                    let codes = quantizer.take_device_codes().map_err(|e| err(dir, e))?;
                    report.quantized_bytes += quantized_size(&param, codes.as_ref());
                    Some(Frozen::Quantized {
                        param,
                        experts: None,
                        codes,
                    })
                };
                progress.inc(match e {
                    Some(_) => p.numel() as u64 * 2 / spec.num_experts as u64,
                    None if split_by_expert(p) => 0,
                    None => p.numel() as u64 * 2,
                });
                if let Some(frozen) = frozen {
                    tensors.insert(p.name.clone(), frozen);
                }
                if e.is_none_or(|e| e + 1 == owned.end) {
                    // Once per parameter: reading /proc per slice costs more than the slice.
                    crate::util::mem::sample_peak();
                }
                Ok::<(), ModelFilesError>(())
            },
        )?;
        let full = owned == (0..spec.num_experts);
        for (k, packed, codes, job) in statistics {
            let p = &params[k];
            let absmax = timed("load: statistics (waiting at the end)", &cpu, || job.join())
                .map_err(|_| err(dir, format!("{}: computing the statistics failed", p.name)))?;
            let param = QuantizedParam {
                shape: p.shape.clone(),
                settings,
                packed,
                absmax,
            };
            report.quantized_bytes += quantized_size(&param, codes.as_ref());
            let frozen = Frozen::Quantized {
                param,
                experts: (!full).then(|| owned.clone()),
                codes,
            };
            tensors.insert(p.name.clone(), frozen);
        }
        Ok::<(), ModelFilesError>(())
    })?;
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    report.peak_device_bytes = quantizer.peak_device_bytes();
    Ok(FrozenBase {
        tensors,
        settings: Some(settings),
        report,
    })
}

/// NaN and ±Inf values of a tensor on the host (0 for one on a device: those are drawn, finite).
pub(super) fn nonfinite(t: &Tensor) -> usize {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return 0;
    };
    match s {
        CpuStorage::BF16(v) => v[a..b].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F16(v) => v[a..b].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F32(v) => v[a..b].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F64(v) => v[a..b].iter().filter(|x| !x.is_finite()).count(),
        _ => 0,
    }
}

/// Bytes of codes (on the host, or `codes` on the device) plus statistics of a quantized
/// parameter.
pub fn quantized_size(q: &QuantizedParam, codes: Option<&Tensor>) -> u64 {
    let packed = codes.map_or(q.packed.len(), |c| c.elem_count());
    let stats = match &q.absmax {
        crate::quant::Absmax::Plain(a) => 4 * a.len(),
        crate::quant::Absmax::Nested(n) => n.codes.len() + 4 * n.nested_absmax.len() + 4 + 4 * 256,
    };
    (packed + stats + 4 * 16) as u64
}

fn sha_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Digests of the 4-bit codes and statistics, to compare loads across world sizes: per
/// quantized parameter `{"stats": sha}` plus `{"codes": sha}`, or for expert parameters
/// `{"experts": {"<global expert>": sha}}` over the experts held. Dense tensors are left out.
pub fn digest(base: &FrozenBase) -> candle_core::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (name, t) in &base.tensors {
        let Frozen::Quantized { param, experts, .. } = t else {
            continue;
        };
        let packed = t.host_codes()?.unwrap_or_default();
        let stats: Vec<u8> = match &param.absmax {
            crate::quant::Absmax::Plain(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            crate::quant::Absmax::Nested(n) => {
                let mut b = n.offset.to_le_bytes().to_vec();
                b.extend_from_slice(&n.codes);
                b.extend(n.nested_absmax.iter().flat_map(|x| x.to_le_bytes()));
                b
            }
        };
        let mut entry = serde_json::Map::new();
        entry.insert("stats".into(), sha_hex(&[&stats]).into());
        match experts {
            Some(range) if param.shape.len() == 3 => {
                let per = param.shape[1] * param.shape[2] / 2;
                let mut by_expert = serde_json::Map::new();
                for (local, e) in range.clone().enumerate() {
                    let codes = &packed[local * per..(local + 1) * per];
                    by_expert.insert(e.to_string(), sha_hex(&[codes]).into());
                }
                entry.insert("experts".into(), by_expert.into());
            }
            _ if param.shape.len() == 3 => {
                let per = param.shape[1] * param.shape[2] / 2;
                let mut by_expert = serde_json::Map::new();
                for (e, codes) in packed.chunks(per.max(1)).enumerate() {
                    by_expert.insert(e.to_string(), sha_hex(&[codes]).into());
                }
                entry.insert("experts".into(), by_expert.into());
            }
            _ => {
                entry.insert("codes".into(), sha_hex(&[&packed]).into());
            }
        }
        out.insert(name.clone(), entry.into());
    }
    Ok(out.into())
}
