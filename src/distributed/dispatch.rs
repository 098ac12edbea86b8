//! Expert parallelism (docs/ARCHITECTURE.md, decisions 4 and 11): which rank owns which experts, and the
//! token dispatcher that moves routed tokens to their experts' owner and back: the model's
//! `arch::ExpertExchange`, implemented over a communicator (`ExpertParallel`).
//!
//! Ownership: contiguous expert ranges in rank order; with E = q·W + m, the first m ranks own
//! q + 1 experts and the rest q (a rank may own none when W > E).
//!
//! One MoE layer on rank r, with tokens already sorted by global expert (so by owner too):
//! 1. `ExpertParallel::plan` (`Dispatch::plan`): per-expert counts are exchanged (one host round trip per layer and
//!    micro-batch, replayed by the recompute); rank r learns how many rows each source sends
//!    to each of its experts.
//! 2. `dispatch`: all-to-all of the rows `xs [M, H]` → `[R, H]` ordered by source, then by
//!    local expert; a permutation groups them by local expert for the grouped GEMMs.
//! 3. `combine`: the inverse permutation and the mirror all-to-all bring the expert outputs
//!    back to `[M, H]` in `xs` order; the weighted sum happens at the source in f32.
//!
//! The all-to-all is one autograd node whose backward is the mirror all-to-all, so the
//! backward of a layer runs the same collectives in reverse on every rank. Dropless: every
//! routed row is computed.

use super::Communicator;
use crate::arch::{ExchangePlan, ExpertExchange};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// Contiguous expert ranges per rank, in rank order.
pub fn expert_ranges(num_experts: usize, world: usize) -> Vec<Range<usize>> {
    let world = world.max(1);
    let (q, m) = (num_experts / world, num_experts % world);
    let mut out = Vec::with_capacity(world);
    let mut start = 0;
    for r in 0..world {
        let n = q + usize::from(r < m);
        out.push(start..start + n);
        start += n;
    }
    out
}

/// Experts spread over the ranks of `comm` in contiguous ranges (`expert_ranges`).
pub struct ExpertParallel {
    comm: Arc<dyn Communicator>,
    ranges: Vec<Range<usize>>,
}

impl ExpertParallel {
    pub fn new(comm: Arc<dyn Communicator>, num_experts: usize) -> ExpertParallel {
        let ranges = expert_ranges(num_experts, comm.world_size());
        ExpertParallel { comm, ranges }
    }
}

impl ExpertExchange for ExpertParallel {
    fn held(&self) -> Range<usize> {
        self.ranges[self.comm.rank()].clone()
    }

    fn plan(&self, counts: &[usize], device: &Device) -> Result<Box<dyn ExchangePlan>> {
        Ok(Box::new(Dispatch::plan(
            &self.comm,
            counts,
            &self.ranges,
            device,
        )?))
    }
}

/// The row exchange of one MoE layer for one micro-batch.
pub struct Dispatch {
    comm: Arc<dyn Communicator>,
    /// Rows sent to each rank / received from each rank.
    pub send: Vec<usize>,
    pub recv: Vec<usize>,
    /// Received rows (by source, then local expert) → grouped by local expert: [R] u32.
    perm: Tensor,
    /// The inverse of `perm`: [R] u32.
    inv: Tensor,
    /// Rows per local expert after grouping.
    pub local_counts: Vec<usize>,
}

impl Dispatch {
    /// `counts[e]`: this rank's rows for global expert e (rows sorted by expert).
    pub fn plan(
        comm: &Arc<dyn Communicator>,
        counts: &[usize],
        ranges: &[Range<usize>],
        device: &Device,
    ) -> Result<Dispatch> {
        let world = comm.world_size();
        if ranges.len() != world {
            candle_core::bail!("dispatch: {} expert ranges for {world} ranks", ranges.len());
        }
        let send_counts: Vec<Vec<u64>> = ranges
            .iter()
            .map(|r| counts[r.clone()].iter().map(|&c| c as u64).collect())
            .collect();
        let send = send_counts
            .iter()
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        // from[s][e]: rows source s sends to local expert e. The ownership plan fixes how many
        // counts go each way (rank d owns ranges[d].len() experts), so one exchange suffices.
        let local = ranges[comm.rank()].len();
        let flat: Vec<i64> = send_counts.iter().flatten().map(|&c| c as i64).collect();
        let n = flat.len();
        let got = comm
            .all_to_all(
                &Tensor::from_vec(flat, n, &Device::Cpu)?,
                &ranges.iter().map(|r| r.len()).collect::<Vec<_>>(),
                &vec![local; world],
            )?
            .to_vec1::<i64>()?;
        let from: Vec<Vec<u64>> = (0..world)
            .map(|s| {
                got[s * local..(s + 1) * local]
                    .iter()
                    .map(|&c| c as u64)
                    .collect()
            })
            .collect();
        let recv: Vec<usize> = from
            .iter()
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        // Offsets of each (source, expert) block in the received order.
        let mut start = vec![vec![0usize; local]; world];
        let mut at = 0;
        for (s, c) in from.iter().enumerate() {
            if c.len() != local {
                candle_core::bail!(
                    "dispatch: rank {s} sent counts for {} experts, this rank owns {local}",
                    c.len()
                );
            }
            for (e, &n) in c.iter().enumerate() {
                start[s][e] = at;
                at += n as usize;
            }
        }
        let mut perm = Vec::with_capacity(at);
        let mut local_counts = vec![0usize; local];
        for (e, lc) in local_counts.iter_mut().enumerate() {
            for (s, c) in from.iter().enumerate() {
                let n = c[e] as usize;
                perm.extend((start[s][e]..start[s][e] + n).map(|i| i as u32));
                *lc += n;
            }
        }
        let mut inv = vec![0u32; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inv[p as usize] = i as u32;
        }
        let n = perm.len();
        Ok(Dispatch {
            comm: comm.clone(),
            send,
            recv,
            perm: Tensor::from_vec(perm, n, device)?,
            inv: Tensor::from_vec(inv, n, device)?,
            local_counts,
        })
    }
}

impl ExchangePlan for Dispatch {
    /// xs [M, H] sorted by global expert → [R, H] grouped by local expert.
    fn dispatch(&self, xs: &Tensor) -> Result<Tensor> {
        all_to_all(&self.comm, xs, &self.send, &self.recv)?.index_select(&self.perm, 0)
    }

    /// y [R, H] grouped by local expert → [M, H] in the order of the dispatched `xs`.
    fn combine(&self, y: &Tensor) -> Result<Tensor> {
        all_to_all(
            &self.comm,
            &y.index_select(&self.inv, 0)?,
            &self.recv,
            &self.send,
        )
    }

    fn held_counts(&self) -> &[usize] {
        &self.local_counts
    }
}

struct AllToAll {
    comm: Arc<dyn Communicator>,
    send: Vec<usize>,
    recv: Vec<usize>,
}

impl CustomOp1 for AllToAll {
    fn name(&self) -> &'static str {
        "all_to_all"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::ops::tensor_of(Storage::Cpu(s.clone()), l, "all_to_all")?;
        crate::ops::cpu_result(
            self.comm.all_to_all(&x, &self.send, &self.recv)?,
            "all_to_all",
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = crate::ops::tensor_of(Storage::Cuda(s.try_clone(l)?), l, "all_to_all")?;
        crate::ops::cuda_result(
            self.comm.all_to_all(&x, &self.send, &self.recv)?,
            "all_to_all",
        )
    }

    /// The mirror exchange: each row's gradient goes back to where the row came from.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.comm.all_to_all(
            &grad.contiguous()?,
            &self.recv,
            &self.send,
        )?))
    }
}

/// x [Σsend, …] → [Σrecv, …] (see `Communicator::all_to_all`), differentiable.
pub fn all_to_all(
    comm: &Arc<dyn Communicator>,
    x: &Tensor,
    send: &[usize],
    recv: &[usize],
) -> Result<Tensor> {
    x.contiguous()?.apply_op1(AllToAll {
        comm: comm.clone(),
        send: send.to_vec(),
        recv: recv.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_contiguous_and_cover_every_expert() {
        for e in [1, 7, 8, 60, 128] {
            for w in 1..=9 {
                let r = expert_ranges(e, w);
                assert_eq!(r.len(), w);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[w - 1].end, e);
                for k in 1..w {
                    assert_eq!(r[k - 1].end, r[k].start);
                    assert!(r[k - 1].len() >= r[k].len());
                    assert!(r[0].len() - r[k].len() <= 1);
                }
            }
        }
        assert_eq!(expert_ranges(8, 3), vec![0..3, 3..6, 6..8]);
    }
}
