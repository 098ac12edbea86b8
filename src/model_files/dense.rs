//! Loading a 16-bit frozen base (`adapter: lora`, `load_in_4bit: false`): every weight kept as
//! it is — no quantization — in the compute dtype on the training device. A rank reads only the
//! experts it owns, in slices of at most `SLICE_BYTES` placed straight into the parameter's
//! device buffer, so host memory stays at a few slices however large the experts are.
//! (The 4-bit loader: `frozen::load`.)

use super::{ExpertParam, ModelDir, ModelFilesError};
use crate::arch::{Component, ParamInfo};
use crate::quant::frozen::{Frozen, FrozenBase, LoadReport};
use crate::util::prefetch::in_order;
use crate::util::progress::Progress;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::ops::Range;

/// Largest read of one expert parameter at a time.
const SLICE_BYTES: usize = 256 << 20;

/// Loads the base unquantized onto `device` in `dtype`. `experts` restricts expert parameters
/// to the owned experts (None: all).
pub fn load(
    dir: &ModelDir,
    experts: Option<Range<usize>>,
    device: &Device,
    dtype: DType,
) -> Result<FrozenBase, ModelFilesError> {
    load_sliced(dir, experts, device, dtype, SLICE_BYTES)
}

/// `load`, reading expert parameters `slice_bytes` at a time (at least one expert).
pub fn load_sliced(
    dir: &ModelDir,
    experts: Option<Range<usize>>,
    device: &Device,
    dtype: DType,
    slice_bytes: usize,
) -> Result<FrozenBase, ModelFilesError> {
    let started = std::time::Instant::now();
    let spec = &dir.spec;
    let owned = experts.unwrap_or(0..spec.num_experts);
    if owned.start > owned.end || owned.end > spec.num_experts {
        return Err(ModelFilesError::Format {
            path: dir.root.display().to_string(),
            problem: format!("owned experts {owned:?} outside 0..{}", spec.num_experts),
        });
    }
    if super::frozen::prequantized(dir).is_some() {
        return Err(ModelFilesError::Format {
            path: dir.root.display().to_string(),
            problem: "the checkpoint is pre-quantized (4-bit), but the run asks for a 16-bit base (load_in_4bit: false); train it with adapter: qlora, or point base_model at the unquantized checkpoint".into(),
        });
    }
    let params = spec.params();
    let is_experts = |p: &ParamInfo| p.component == Component::Experts;
    // One item per read: a slice of owned experts of an expert parameter, else the whole
    // parameter. Expert parameters of which this rank owns none are not read.
    let items: Vec<(usize, Option<Range<usize>>)> = params
        .iter()
        .enumerate()
        .flat_map(|(k, p)| match is_experts(p) {
            true => {
                let per = p.shape[1] * p.shape[2] * 2;
                let step = (slice_bytes / per.max(1)).max(1);
                (owned.start..owned.end)
                    .step_by(step)
                    .map(|e| (k, Some(e..(e + step).min(owned.end))))
                    .collect::<Vec<_>>()
            }
            false => vec![(k, None)],
        })
        .collect();
    let total: u64 = items.iter().map(|(k, e)| bytes_of(&params[*k], e)).sum();
    let progress = Progress::new(total, "loading the frozen base (16-bit)");
    let generated = dir.generated();
    // The values of item `i` on the host, read ahead on threads; drawn weights are drawn on
    // the device in order instead (None).
    let read = |i: usize| -> Option<Result<Tensor, ModelFilesError>> {
        let (k, e) = &items[i];
        let p = &params[*k];
        generated
            .is_none()
            .then(|| match (e, ExpertParam::parse(&p.name)) {
                (Some(e), Some((layer, which))) => dir.read_experts(layer, which, e.clone()),
                (Some(_), None) => Err(ModelFilesError::Format {
                    path: dir.root.display().to_string(),
                    problem: format!("'{}' is not an expert parameter", p.name),
                }),
                (None, _) => dir.read(&p.name),
            })
    };
    let threads = match generated {
        Some(_) => 0,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4)),
    };
    let mut report = LoadReport::default();
    let mut tensors = BTreeMap::new();
    // The device buffer of the expert parameter being assembled.
    let mut assembling: Option<Tensor> = None;
    in_order(items.len(), threads, 2 * threads, read, |i, host| {
        let (k, e) = &items[i];
        let p = &params[*k];
        let t = match (host, generated) {
            (Some(t), _) => t?,
            (None, Some(g)) => g.param(spec, p, e.clone().unwrap_or(0..0), device)?,
            (None, None) => unreachable!("every item of a checkpoint on disk is read ahead"),
        };
        let bad = super::frozen::nonfinite(&t);
        if bad > 0 {
            *report.nonfinite.entry(p.name.clone()).or_default() += bad;
        }
        report.bytes_read += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let t = t.to_device(device)?.to_dtype(dtype)?;
        report.dense_bytes += (t.elem_count() * dtype.size_in_bytes()) as u64;
        progress.inc(bytes_of(p, e));
        match e {
            None => {
                tensors.insert(p.name.clone(), Frozen::Dense(t));
            }
            Some(e) if *e == owned => {
                let held = owned.clone();
                tensors.insert(p.name.clone(), Frozen::DenseExperts { weights: t, held });
            }
            Some(e) => {
                let buffer = match assembling.take() {
                    Some(b) => b,
                    None => Tensor::zeros((owned.len(), p.shape[1], p.shape[2]), dtype, device)?,
                };
                buffer.slice_set(&t, 0, e.start - owned.start)?;
                if e.end == owned.end {
                    let held = owned.clone();
                    tensors.insert(
                        p.name.clone(),
                        Frozen::DenseExperts {
                            weights: buffer,
                            held,
                        },
                    );
                } else {
                    assembling = Some(buffer);
                }
            }
        }
        crate::util::mem::sample_peak();
        Ok::<(), ModelFilesError>(())
    })?;
    progress.finish();
    // Expert parameters of which this rank owns no expert: empty.
    for p in params.iter().filter(|p| is_experts(p) && owned.is_empty()) {
        let weights = Tensor::zeros((0, p.shape[1], p.shape[2]), dtype, device)?;
        let held = owned.clone();
        tensors.insert(p.name.clone(), Frozen::DenseExperts { weights, held });
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(FrozenBase {
        tensors,
        settings: None,
        report,
    })
}

/// Bytes of item (`p`, experts `e`) at 2 bytes per value: the progress unit.
fn bytes_of(p: &ParamInfo, e: &Option<Range<usize>>) -> u64 {
    match e {
        Some(e) => (e.len() * p.shape[1] * p.shape[2] * 2) as u64,
        None => p.numel() as u64 * 2,
    }
}
