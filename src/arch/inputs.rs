//! A micro-batch's device inputs shared by every layer: token ids, rotary tables, the
//! samples' segments (and their chunks, for chunked attention), NoPE q factors, the routing
//! and attention memos.

use super::model::Model;
use crate::ops::embedding::TokenIds;
use candle_core::{Device, Result, Tensor};

/// Per-micro-batch inputs shared by every layer.
pub struct Inputs {
    /// The token ids on the host and on the device.
    pub ids: TokenIds,
    /// cos, sin: [N, 1, head_dim] in the compute dtype.
    pub rope: (Tensor, Tensor),
    /// [B, S] u32: the packed sample of each position; a query attends to the keys of its
    /// own sample up to itself.
    pub segments: Tensor,
    /// Whether every row is one sample (no packing, no padding: plain causal attention) and,
    /// for packed rows on CUDA, the samples in cuDNN's ragged layout (`ops::cudnn_attn`).
    pub samples: crate::ops::attention::RowSamples,
    /// For chunked-attention layers (Llama 4), where a chunk boundary falls inside a sample:
    /// the segments split at every multiple of the chunk size in position, and their samples.
    pub chunked: Option<(Tensor, crate::ops::attention::RowSamples)>,
    /// q's factor `[N, 1]` (f32) on NoPE layers (Llama 4's temperature tuning), where one
    /// position's differs from 1.
    pub nope_q_scale: Option<Tensor>,
    /// For Gated DeltaNet layers: the samples (and padding runs) grouped by length (the
    /// recurrence restarts at each). None for models without them.
    pub runs: Option<RunGroups>,
    pub batch: usize,
    pub seq: usize,
    /// Routing per MoE layer, recorded by the first pass over these inputs and replayed by
    /// later ones: the recompute routes exactly as the forward did (routing is piecewise
    /// constant, so replaying changes no gradient), without sorting or copying to the host again.
    pub routes: std::cell::RefCell<Vec<Option<std::rc::Rc<super::layers::Routing>>>>,
    /// Attention output (and lse) per layer, when `keep_attention`: left by the first forward,
    /// taken by the recompute (`ops::attention_block`), so the recompute does not run attention.
    pub attention: Vec<std::cell::RefCell<Option<crate::ops::attention_block::Memo>>>,
    /// Whether the first forward keeps each layer's attention output for the recompute (a
    /// training step; `[B, S, heads, head_dim]` per layer until its backward).
    pub keep_attention: bool,
}

impl Model {
    /// Device inputs of a micro-batch of `batch` rows × `seq` tokens.
    pub fn inputs(
        &self,
        ids: &[u32],
        positions: &[u32],
        segments: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Inputs> {
        let n = batch * seq;
        if ids.len() != n || positions.len() != n || segments.len() != n {
            candle_core::bail!("model inputs: expected {n} tokens ({batch} × {seq})");
        }
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.rope.max_positions {
                candle_core::bail!(
                    "position {p} beyond the {} positions the model was set up for",
                    self.rope.max_positions
                );
            }
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            candle_core::bail!(
                "token id {t} outside the vocabulary of {}",
                self.spec.vocab_size
            );
        }
        let pos = Tensor::new(positions, &self.device)?;
        Ok(Inputs {
            ids: TokenIds::new(ids, &self.device)?,
            rope: self.rope.tables(&pos, self.dtype)?,
            segments: Tensor::from_slice(segments, (batch, seq), &self.device)?,
            samples: self.row_samples(segments, batch, seq)?,
            chunked: self.chunked(segments, positions, batch, seq)?,
            nope_q_scale: self.nope_q_scale(positions)?,
            runs: match self.spec.linear_attn {
                Some(_) => Some(RunGroups::new(segments, batch, seq, &self.device)?),
                None => None,
            },
            batch,
            seq,
            routes: std::cell::RefCell::new(vec![None; self.layers.len()]),
            attention: (0..self.layers.len()).map(|_| Default::default()).collect(),
            keep_attention: false,
        })
    }

    /// Segment ids that also change at every chunk boundary of the positions, for
    /// chunked-attention layers; None where no boundary falls inside a sample.
    fn chunked(
        &self,
        segments: &[u32],
        positions: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Option<(Tensor, crate::ops::attention::RowSamples)>> {
        let Some(&size) = self.spec.attention_chunks.iter().flatten().next() else {
            return Ok(None);
        };
        if positions.iter().all(|&p| (p as usize) < size) {
            return Ok(None);
        }
        let chunk = |i: usize| positions[i] as usize / size;
        let mut ids = vec![0u32; batch * seq];
        for row in 0..batch {
            let mut id = 0;
            for i in row * seq + 1..(row + 1) * seq {
                if segments[i] != segments[i - 1] || chunk(i) != chunk(i - 1) {
                    id += 1;
                }
                ids[i] = id;
            }
        }
        Ok(Some((
            Tensor::from_slice(&ids, (batch, seq), &self.device)?,
            self.row_samples(&ids, batch, seq)?,
        )))
    }

    /// q's factor per position on NoPE layers, where one differs from 1.
    pub(super) fn nope_q_scale(&self, positions: &[u32]) -> Result<Option<Tensor>> {
        let Some(t) = self.spec.nope_temperature else {
            return Ok(None);
        };
        let scales: Vec<f32> = positions.iter().map(|&p| t.at(p as usize)).collect();
        if scales.iter().all(|&s| s == 1.0) {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            scales,
            (positions.len(), 1),
            &self.device,
        )?))
    }

    /// Whether each row is one sample and, for packed rows that cuDNN may serve (CUDA, bf16),
    /// the samples in its ragged layout.
    fn row_samples(
        &self,
        segments: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<crate::ops::attention::RowSamples> {
        let whole = segments.iter().all(|&id| id == 0);
        #[cfg(feature = "cuda")]
        let ragged = match whole || self.dtype != candle_core::DType::BF16 {
            true => None,
            false => crate::ops::cudnn_attn::ragged(
                segments,
                (batch, seq),
                (
                    self.spec.num_heads,
                    self.spec.num_kv_heads,
                    self.spec.head_dim.max(self.spec.v_head_dim()),
                ),
                &self.device,
            )?,
        };
        #[cfg(not(feature = "cuda"))]
        let ragged = {
            let _ = (batch, seq);
            None
        };
        Ok(crate::ops::attention::RowSamples { whole, ragged })
    }
}

/// A micro-batch's samples grouped by length, so that each group is one `[runs, len]` block
/// for the ops that run along each sample (Gated DeltaNet's convolution and delta rule).
pub struct RunGroups {
    /// The tokens in grouped order `[N]` and its inverse (u32), or None where the rows are
    /// already the runs (one sample per row).
    pub order: Option<(Tensor, Tensor)>,
    /// (runs, length) of each group, in grouped order.
    pub groups: Vec<(usize, usize)>,
}

impl RunGroups {
    fn new(segments: &[u32], batch: usize, seq: usize, device: &Device) -> Result<RunGroups> {
        if segments.iter().all(|&id| id == 0) {
            return Ok(RunGroups {
                order: None,
                groups: vec![(batch, seq)],
            });
        }
        // Runs of equal segment ids within each row.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, &id) in segments.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if i % seq != 0 && segments[i - 1] == id => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        let mut by_len: std::collections::BTreeMap<usize, Vec<std::ops::Range<usize>>> =
            Default::default();
        for r in runs {
            by_len.entry(r.len()).or_default().push(r);
        }
        let order: Vec<u32> = by_len
            .values()
            .flatten()
            .flat_map(|r| r.start as u32..r.end as u32)
            .collect();
        let mut inverse = vec![0u32; order.len()];
        for (at, &token) in order.iter().enumerate() {
            inverse[token as usize] = at as u32;
        }
        Ok(RunGroups {
            order: Some((
                Tensor::new(order.as_slice(), device)?,
                Tensor::new(inverse.as_slice(), device)?,
            )),
            groups: by_len.iter().map(|(&len, rs)| (rs.len(), len)).collect(),
        })
    }
}
