//! Batches for one rank, in an order fixed by (seed, epoch) alone.
//!
//! Per epoch: permute the samples with the `order` stream of (seed, epoch),
//! pack them into rows (or one sample per row), then walk the rows in global
//! steps of `micro_batch_size × world_size`; rank r takes rows
//! `[r·B, (r+1)·B)` of each step, so ranks read disjoint rows. The plan
//! depends on nothing but the samples, the options and the epoch, so a
//! [`DataCursor`] (epoch, rows consumed by all ranks together) restores the
//! exact stream on the same number of ranks and micro-batch size. On another
//! number of ranks the rows and their order are the same, but how a step is
//! split changes, and with `drop_last` so does the epoch's tail: the rows
//! past the last whole step of `micro_batch_size × world_size` are skipped,
//! and that count depends on the step size.
//!
//! The last partial step of an epoch is dropped with `drop_last` (always on
//! for training, see [`LoaderOptions::from_config`]);
//! [`Loader::dropped_rows_per_epoch`] says how many rows that leaves unread,
//! for the log. Without it, the step is completed with filler rows (padding
//! only, no labels), so every rank still runs the same number of steps:
//! collectives stay in step and nothing is counted twice.
//!
//! A batch row holds one or more samples back to back, then padding. Position
//! ids restart at 0 for each sample; `seq_lens` gives each row's sample
//! lengths so attention can be block-diagonal (see [`Batch::segment_ids`]).

use super::error::DataError;
use super::pack::{pack_rows, PackingStats};
use super::{permutation, rng_stream, Sample, IGNORE_INDEX};
use crate::config::TrainConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderOptions {
    pub micro_batch_size: usize,
    pub sequence_len: usize,
    pub sample_packing: bool,
    /// Pad every batch to `sequence_len` instead of its longest row.
    pub pad_to_sequence_len: bool,
    pub pad_id: u32,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub drop_last: bool,
    /// False keeps the samples in their order (evaluation).
    pub shuffle: bool,
}

impl LoaderOptions {
    /// Training options from the config: shuffled, last partial step dropped.
    pub fn from_config(c: &TrainConfig, pad_id: u32, rank: usize, world_size: usize) -> Self {
        LoaderOptions {
            micro_batch_size: c.micro_batch_size,
            sequence_len: c.sequence_len,
            sample_packing: c.sample_packing,
            pad_to_sequence_len: c.pad_to_sequence_len,
            pad_id,
            seed: c.seed,
            rank,
            world_size,
            drop_last: true,
            shuffle: true,
        }
    }

    /// Evaluation options: same packing, no shuffle, no row dropped.
    pub fn for_eval(&self) -> Self {
        LoaderOptions {
            drop_last: false,
            shuffle: false,
            ..self.clone()
        }
    }
}

/// Where the data stream stands: the next row to read is row `position` of
/// epoch `epoch`'s plan (counted over all ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: usize,
}

/// One rank's micro-batch, `B` rows of `T` tokens, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// [B*T]; padding is `pad_id`.
    pub input_ids: Vec<u32>,
    /// [B*T], shifted: the token position t must predict, or IGNORE_INDEX
    /// (padding, masked tokens, the last token of each sample).
    pub labels: Vec<i32>,
    /// [B*T], 0-based within each sample; padding counts from 0 too.
    pub position_ids: Vec<u32>,
    /// [B][samples in row]: lengths of the row's samples in order; the rest
    /// of the row up to T is padding.
    pub seq_lens: Vec<Vec<usize>>,
    /// B
    pub batch_size: usize,
    /// T
    pub seq_len: usize,
}

impl Batch {
    /// [B*T]: the sample index within its row; padding gets one more than
    /// the row's last sample, so it forms its own block. Attention from t to
    /// s is allowed when `s <= t` and both have the same segment id.
    pub fn segment_ids(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.input_ids.len());
        for lens in &self.seq_lens {
            for (k, &len) in lens.iter().enumerate() {
                out.extend(std::iter::repeat_n(k as u32, len));
            }
            let used: usize = lens.iter().sum();
            out.extend(std::iter::repeat_n(lens.len() as u32, self.seq_len - used));
        }
        out
    }

    /// Positions with a label.
    pub fn num_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Rows (sample indices) of `epoch`, in the order they are read.
fn plan_rows(lens: &[usize], opts: &LoaderOptions, epoch: u64) -> Vec<Vec<usize>> {
    let n = lens.len();
    let order = if opts.shuffle {
        permutation(n, &mut rng_stream(opts.seed, "order", epoch))
    } else {
        (0..n).collect()
    };
    if opts.sample_packing {
        pack_rows(&order, lens, opts.sequence_len)
    } else {
        order.into_iter().map(|i| vec![i]).collect()
    }
}

pub struct Loader {
    samples: Vec<Sample>,
    lens: Vec<usize>,
    opts: LoaderOptions,
    epoch: u64,
    position: usize,
    rows: Vec<Vec<usize>>,
}

impl Loader {
    pub fn new(samples: Vec<Sample>, opts: LoaderOptions) -> Result<Loader, DataError> {
        Self::resume(
            samples,
            opts,
            DataCursor {
                epoch: 0,
                position: 0,
            },
        )
    }

    /// Continues exactly where `cursor` was taken.
    pub fn resume(
        samples: Vec<Sample>,
        opts: LoaderOptions,
        cursor: DataCursor,
    ) -> Result<Loader, DataError> {
        let err = |problem: String| Err(DataError::Loader { problem });
        if opts.micro_batch_size == 0 || opts.world_size == 0 || opts.rank >= opts.world_size {
            return err(format!(
                "need micro_batch_size >= 1 and rank < world_size, got micro_batch_size {}, rank {}, world_size {}",
                opts.micro_batch_size, opts.rank, opts.world_size
            ));
        }
        if samples.is_empty() {
            return err("no samples to load".to_string());
        }
        if let Some(k) = samples.iter().position(Sample::is_empty) {
            return err(format!(
                "sample {k} has no tokens; drop empty samples before loading (prepare() never makes them)"
            ));
        }
        if let Some(k) = samples
            .iter()
            .position(|s| s.labels.len() != s.input_ids.len())
        {
            return err(format!(
                "sample {k} has {} labels for {} input_ids; labels must be aligned with input_ids, one per token (IGNORE_INDEX where not trained)",
                samples[k].labels.len(),
                samples[k].input_ids.len()
            ));
        }
        if let Some(long) = samples.iter().position(|s| s.len() > opts.sequence_len) {
            return err(format!(
                "sample {long} has {} tokens, more than sequence_len {}; prepare() with the same sequence_len",
                samples[long].len(),
                opts.sequence_len
            ));
        }
        let lens = samples.iter().map(Sample::len).collect();
        let mut loader = Loader {
            samples,
            lens,
            opts,
            epoch: cursor.epoch,
            position: cursor.position,
            rows: Vec::new(),
        };
        loader.rows = loader.plan(cursor.epoch);
        if loader.steps_per_epoch() == 0 {
            return err(format!(
                "{} sequences are fewer than one step of micro_batch_size {} × {} ranks; lower micro_batch_size or add data",
                loader.rows.len(),
                loader.opts.micro_batch_size,
                loader.opts.world_size
            ));
        }
        if cursor.position > loader.rows.len() {
            return err(format!(
                "cursor position {} is past the {} sequences of epoch {}; the data or its settings changed since the checkpoint",
                cursor.position,
                loader.rows.len(),
                cursor.epoch
            ));
        }
        Ok(loader)
    }

    fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        plan_rows(&self.lens, &self.opts, epoch)
    }

    fn step_rows(&self) -> usize {
        self.opts.micro_batch_size * self.opts.world_size
    }

    /// Rows of the current epoch that will be read (all ranks together).
    fn usable_rows(&self) -> usize {
        if self.opts.drop_last {
            self.rows.len() / self.step_rows() * self.step_rows()
        } else {
            self.rows.len()
        }
    }

    /// Rows (packed sequences, or samples without packing) of the current
    /// epoch that `drop_last` leaves unread, all ranks together: the last
    /// partial step. With packing, another epoch's count can differ.
    pub fn dropped_rows_per_epoch(&self) -> usize {
        self.rows.len() - self.usable_rows()
    }

    /// Steps in the current epoch (the same on every rank). With packing,
    /// another epoch's count can differ by a step or so.
    pub fn steps_per_epoch(&self) -> usize {
        self.usable_rows().div_ceil(self.step_rows())
    }

    /// Steps in `num_epochs` epochs from the start (a fractional last epoch
    /// counts its share of steps, rounded up), for the LR schedule.
    pub fn steps_in_epochs(&self, num_epochs: f64) -> usize {
        let whole = num_epochs.floor() as u64;
        let mut total = 0;
        for e in 0..=whole {
            let share = if e < whole {
                1.0
            } else {
                num_epochs - whole as f64
            };
            if share <= 0.0 {
                break;
            }
            let rows = if e == self.epoch {
                self.rows.len()
            } else {
                plan_rows(&self.lens, &self.opts, e).len()
            };
            let step = self.step_rows();
            let usable = if self.opts.drop_last {
                rows / step * step
            } else {
                rows
            };
            total += (usable.div_ceil(step) as f64 * share).ceil() as usize;
        }
        total
    }

    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            epoch: self.epoch,
            position: self.position,
        }
    }

    /// Packing of the current epoch.
    pub fn packing_stats(&self) -> PackingStats {
        PackingStats::of(&self.rows, &self.lens, self.opts.sequence_len)
    }

    /// The next micro-batch of this rank; moves to the next epoch (and its
    /// new order) after the last step of one.
    pub fn next_batch(&mut self) -> Batch {
        if self.position >= self.usable_rows() {
            self.epoch += 1;
            self.position = 0;
            self.rows = self.plan(self.epoch);
        }
        let b = self.opts.micro_batch_size;
        let start = self.position + self.opts.rank * b;
        let end = (start + b).min(self.rows.len());
        let mine: Vec<&[usize]> = (start..end.max(start))
            .map(|r| self.rows[r].as_slice())
            .collect();
        self.position = (self.position + self.step_rows()).min(self.rows.len());
        self.build(&mine)
    }

    fn build(&self, rows: &[&[usize]]) -> Batch {
        let b = self.opts.micro_batch_size;
        let longest = rows
            .iter()
            .map(|r| r.iter().map(|&i| self.lens[i]).sum::<usize>())
            .max()
            .unwrap_or(1)
            .max(1);
        let t = if self.opts.pad_to_sequence_len {
            self.opts.sequence_len
        } else {
            longest
        };
        let mut batch = Batch {
            input_ids: Vec::with_capacity(b * t),
            labels: Vec::with_capacity(b * t),
            position_ids: Vec::with_capacity(b * t),
            seq_lens: Vec::with_capacity(b),
            batch_size: b,
            seq_len: t,
        };
        for k in 0..b {
            let row: &[usize] = rows.get(k).copied().unwrap_or(&[]);
            let mut lens = Vec::with_capacity(row.len());
            for &i in row {
                let s = &self.samples[i];
                batch.input_ids.extend(&s.input_ids);
                batch.labels.extend(s.labels.iter().skip(1));
                batch.labels.push(IGNORE_INDEX);
                batch.position_ids.extend(0..s.len() as u32);
                lens.push(s.len());
            }
            let pad = t - lens.iter().sum::<usize>();
            batch
                .input_ids
                .extend(std::iter::repeat_n(self.opts.pad_id, pad));
            batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            batch.position_ids.extend(0..pad as u32);
            batch.seq_lens.push(lens);
        }
        batch
    }
}
