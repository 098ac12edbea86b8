//! The trainer's collectives over the ranks: host statistics, replicated gradients, the whole
//! adapter from its owners.

use super::error::{failed, TrainError};
use crate::distributed::Communicator;
use crate::lora::{Adapters, ExpertLora, ExpertPart, LinearLora};
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;

/// Sums host values over the ranks (f64; identical on every rank).
pub(crate) fn sum_over_ranks(comm: &dyn Communicator, v: Vec<f64>) -> Result<Vec<f64>, TrainError> {
    let n = v.len();
    let t = Tensor::from_vec(v, n, &Device::Cpu).map_err(failed)?;
    comm.all_reduce_sum(&t)
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(failed)
}

/// Elements per all-reduce bucket of replicated gradients.
const BUCKET: usize = 16 << 20;

/// Sums the replicated adapters' gradients over the ranks: flattened in name order into
/// buckets of about `BUCKET` elements, one all-reduce per bucket.
pub(crate) fn all_reduce_grads(
    comm: &dyn Communicator,
    grads: &mut BTreeMap<String, Tensor>,
    names: &[String],
) -> candle_core::Result<()> {
    let mut bucket: Vec<&String> = Vec::new();
    let mut size = 0;
    for (i, name) in names.iter().enumerate() {
        bucket.push(name);
        size += grads[name].elem_count();
        if size >= BUCKET || i + 1 == names.len() {
            let flat = bucket
                .iter()
                .map(|n| grads[*n].flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let summed = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let mut at = 0;
            for n in bucket.drain(..) {
                let g = &grads[n];
                let k = g.elem_count();
                let part = summed.narrow(0, at, k)?.reshape(g.dims())?;
                grads.insert(n.clone(), part);
                at += k;
            }
            size = 0;
        }
    }
    Ok(())
}

/// Sum of squares of each gradient in `names` order, on the device (f32 `[names]`; None for no
/// names), for `host_sum`. Each gradient is summed over its last dimension first:
/// candle reduces a whole tensor to one value in a single block (≈ 0.4 ms for a 4M-element
/// expert adapter on an H200), a row at a time in parallel.
pub(crate) fn square_sums(
    grads: &BTreeMap<String, Tensor>,
    names: &[String],
) -> candle_core::Result<Option<Tensor>> {
    if names.is_empty() {
        return Ok(None);
    }
    let sq = names
        .iter()
        .map(|n| {
            let g = &grads[n];
            let rows = if g.rank() >= 2 {
                g.sqr()?.sum(candle_core::D::Minus1)?
            } else {
                g.sqr()?
            };
            rows.sum_all()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&sq, 0).map(Some)
}

/// `square_sums`' values summed on the host in f64 (one copy; 0 for None).
pub(crate) fn host_sum(sums: Option<Tensor>) -> candle_core::Result<f64> {
    match sums {
        None => Ok(0.0),
        Some(t) => Ok(t.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum()),
    }
}

/// The whole adapter when experts are spread over the ranks of `spread_over` (the
/// expert-parallel group; every rank must call this); None otherwise, where `adapters` already
/// is the whole adapter.
pub(crate) fn whole_adapter(
    adapters: &Adapters,
    spread_over: Option<&dyn Communicator>,
) -> Result<Option<Adapters>, TrainError> {
    match spread_over {
        None => Ok(None),
        Some(group) => gathered(adapters, group).map(Some).map_err(failed),
    }
}

/// The whole adapter on every rank: expert adapters all-gathered from their owners in global
/// expert order (the others are replicated already). Every rank must call it.
fn gathered(adapters: &Adapters, comm: &dyn Communicator) -> candle_core::Result<Adapters> {
    let linear = adapters
        .linear
        .iter()
        .map(|(k, l)| {
            Ok((
                k.clone(),
                LinearLora {
                    a: Var::from_tensor(l.a.as_tensor())?,
                    b: Var::from_tensor(l.b.as_tensor())?,
                },
            ))
        })
        .collect::<candle_core::Result<BTreeMap<_, _>>>()?;
    let mut experts = BTreeMap::new();
    for (k, e) in &adapters.experts {
        let a = gather_expert_part(e, ExpertPart::A, e.a.as_tensor(), comm)?;
        let b = gather_expert_part(e, ExpertPart::B, e.b.as_tensor(), comm)?;
        experts.insert(
            k.clone(),
            ExpertLora {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                num_experts: e.total,
                r: e.r,
                first: 0,
                total: e.total,
                swapped: e.swapped,
            },
        );
    }
    Ok(Adapters {
        settings: adapters.settings.clone(),
        linear,
        experts,
        model_type: adapters.model_type,
    })
}

/// The whole-parameter tensor (all experts) of expert adapter `e` from this rank's part
/// `local` of layout `part`, all-gathered in global expert order (the inverse of
/// `ExpertLora::local`). Every rank must call it.
pub(crate) fn gather_expert_part(
    e: &ExpertLora,
    part: ExpertPart,
    local: &Tensor,
    comm: &dyn Communicator,
) -> candle_core::Result<Tensor> {
    let full = match part {
        ExpertPart::A => Tensor::cat(&comm.all_gather(local)?, 0)?,
        ExpertPart::B => {
            // Columns are expert-minor: gather [E_held, out, r] blocks, then back.
            let out = local.dim(0)?;
            let blocks = local
                .reshape((out, e.r, e.num_experts))?
                .permute((2, 0, 1))?
                .contiguous()?;
            Tensor::cat(&comm.all_gather(&blocks)?, 0)? // [E, out, r]
                .permute((1, 2, 0))?
                .contiguous()?
                .reshape((out, e.r * e.total))?
        }
    };
    let n = match part {
        ExpertPart::A => full.dim(0)?,
        ExpertPart::B => full.dim(1)?,
    };
    if n != e.r * e.total {
        candle_core::bail!(
            "expert adapter: gathered {} of {} rows/columns",
            n,
            e.r * e.total
        );
    }
    Ok(full)
}
