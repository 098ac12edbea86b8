//! Collectives among some of the ranks (docs/ARCHITECTURE.md, decision 9): with
//! `expert_parallel_size` G smaller than the world W, the experts are spread over groups of G
//! ranks (experts all-to-all inside a group) and the W / G groups are replicas of each other
//! (expert gradients summed across them).
//!
//! A `Subgroup` runs on the world's communicator: its all-to-all is the world's with nothing
//! sent to or expected from ranks outside the group, its all-gather picks the members' parts,
//! and its sum is a reduce-scatter and an all-gather built from two such all-to-alls (each
//! member sums one piece, adding the members' parts in member order, so every member holds
//! the same bits). A world collective needs every rank: all groups of a partition call the
//! same group collective at the same point — which they do, as every rank runs the same
//! layers and the same adapters, in the same order.

use super::Communicator;
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// The ranks of a group, in group order, and this rank's place among them.
pub struct Subgroup {
    world: Arc<dyn Communicator>,
    members: Vec<usize>,
    index: usize,
}

/// How `world` ranks split into expert-parallel groups of `size`: group g is ranks
/// `g·size .. (g + 1)·size` (neighbours, so a group is one node's GPUs where it fits); the
/// replicas of a rank are the ranks at the same place in every group.
pub struct Layout {
    pub size: usize,
    pub world: usize,
}

impl Layout {
    /// `size` must divide `world`.
    pub fn new(size: usize, world: usize) -> std::result::Result<Layout, String> {
        if size == 0 || size > world || world % size != 0 {
            return Err(format!(
                "expert_parallel_size {size} does not divide the {world} ranks: give a divisor of {world} (the ranks of one expert-parallel group), or leave it out for one group of all ranks"
            ));
        }
        Ok(Layout { size, world })
    }

    /// The members of `rank`'s expert-parallel group.
    pub fn group_of(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.size * self.size;
        (first..first + self.size).collect()
    }

    /// The ranks holding the same experts as `rank` (itself included).
    pub fn replicas_of(&self, rank: usize) -> Vec<usize> {
        (rank % self.size..self.world).step_by(self.size).collect()
    }
}

impl Subgroup {
    /// The group of `members` (world ranks, this rank among them).
    pub fn new(world: Arc<dyn Communicator>, members: Vec<usize>) -> Result<Subgroup> {
        let Some(index) = members.iter().position(|&m| m == world.rank()) else {
            candle_core::bail!("rank {} is not in the group {members:?}", world.rank());
        };
        if members.iter().any(|&m| m >= world.world_size()) {
            candle_core::bail!(
                "group {members:?} outside a world of {}",
                world.world_size()
            );
        }
        Ok(Subgroup {
            world,
            members,
            index,
        })
    }

    /// Per world rank: `counts[i]` for the i-th member, 0 for the others.
    fn spread(&self, counts: &[usize]) -> Vec<usize> {
        let mut out = vec![0; self.world.world_size()];
        for (&m, &c) in self.members.iter().zip(counts) {
            out[m] = c;
        }
        out
    }
}

impl Communicator for Subgroup {
    fn rank(&self) -> usize {
        self.index
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.members.len();
        let flat = x.flatten_all()?;
        let n = flat.elem_count();
        // Member i sums piece i (`piece` elements, the last one shorter or empty).
        let piece = n.div_ceil(g);
        let sizes: Vec<usize> = (0..g)
            .map(|i| piece.min(n.saturating_sub(i * piece)))
            .collect();
        let mine = sizes[self.index];
        let parts =
            self.world
                .all_to_all(&flat, &self.spread(&sizes), &self.spread(&vec![mine; g]))?;
        let acc_dtype = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut sum = Tensor::zeros(mine, acc_dtype, x.device())?;
        for i in 0..g {
            sum = (sum + parts.narrow(0, i * mine, mine)?.to_dtype(acc_dtype)?)?;
        }
        let sum = sum.to_dtype(x.dtype())?;
        // Every member's summed piece to every member.
        let copies = Tensor::cat(&vec![sum; g], 0)?;
        let whole =
            self.world
                .all_to_all(&copies, &self.spread(&vec![mine; g]), &self.spread(&sizes))?;
        whole.reshape(x.dims())
    }

    fn all_gather(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let all = self.world.all_gather(x)?;
        Ok(self.members.iter().map(|&m| all[m].clone()).collect())
    }

    /// Every group broadcasts at once, each from its own root: an all-gather, keeping the
    /// root's part (small host values only).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.members.len() {
            candle_core::bail!(
                "broadcast from member {root} of a group of {}",
                self.members.len()
            );
        }
        Ok(self.all_gather(x)?.swap_remove(root))
    }

    fn all_to_all(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor> {
        let g = self.members.len();
        if send.len() != g || recv.len() != g {
            candle_core::bail!(
                "all_to_all: {} send and {} receive counts for a group of {g}",
                send.len(),
                recv.len()
            );
        }
        self.world
            .all_to_all(x, &self.spread(send), &self.spread(recv))
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier()
    }

    fn abort(&self, msg: &str) {
        self.world.abort(msg)
    }

    fn finish(&self) {
        self.world.finish()
    }
}
