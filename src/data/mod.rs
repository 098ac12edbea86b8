//! The data pipeline: dataset files → formatted, masked, truncated samples →
//! packed, shuffled, per-rank batches.
//!
//! ```text
//! datasets: [{path, type}] ─► records (file:line) ─► Sample {input_ids, labels}   prepare()
//!     completion | alpaca | chat_template (minijinja, transformers semantics) | input_output | synth://
//! Vec<Sample> ─► per-epoch shuffle (seed, epoch) ─► rows (best-fit packing) ─► Batch per rank   Loader
//! ```
//!
//! Two label conventions, each stated once:
//! - [`Sample::labels`] is aligned with `input_ids` (the Hugging Face
//!   convention): `labels[i]` is `input_ids[i]` when token `i` is trained,
//!   [`IGNORE_INDEX`] otherwise.
//! - [`Batch::labels`] is already shifted: `labels[t]` is the token position
//!   `t` must predict. The loss is `cross_entropy(logits[t], labels[t])` with
//!   no further shift. Shifting inside each packed sample means no position
//!   is ever asked to predict the first token of the next sample.
//!
//! Trainer entry points: [`TokenizerBundle::load`], [`prepare`] (or
//! [`prepare_cached`]), [`Loader`], [`label_accuracy`].

mod cache;
mod chat;
mod error;
mod formats;
mod loader;
mod pack;
mod prepare;
mod source;
mod synth_task;
mod template;
mod tokenizer;

pub use error::{DataError, Location, RecordProblem};
pub use formats::{ALPACA_NO_INPUT, ALPACA_WITH_INPUT};
pub use loader::{Batch, DataCursor, Loader, LoaderOptions};
pub use pack::{pack_rows, PackingStats};
pub use prepare::{
    prepare, prepare_cached, prepare_configured, DataStats, DatasetStats, PreparedData,
};
pub use synth_task::ReverseTask;
pub use template::{ChatTemplate, Rendered, CHATML, NAMED_TEMPLATES};
pub use tokenizer::{SpecialToken, TokenizerBundle};

/// The label of a token that does not count towards the loss (PyTorch's
/// `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids`: the id itself where trained, else
    /// [`IGNORE_INDEX`].
    pub labels: Vec<i32>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens the loss sees: trained tokens after the first position (the
    /// first token of a sequence has nothing before it to predict it).
    pub fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Labels for `ids` whose tokens span `offsets` (byte ranges of the text):
/// a token is trained when it overlaps one of `spans`, as transformers'
/// assistant mask marks every token from the one holding a span's first
/// character to the one holding its last. A zero-width token `(a, a)` (a
/// `trim_offsets` tokenizer's trimmed whitespace) holds no character, so
/// `char_to_token` never returns it: it is trained only when it lies strictly
/// inside a span, between two tokens that are marked.
pub fn spans_to_labels(
    ids: &[u32],
    offsets: &[(usize, usize)],
    spans: &[(usize, usize)],
) -> Vec<i32> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(a, b))| {
            let hit = spans.iter().any(|&(s, e)| {
                if a < b {
                    s < e && a < e && s < b
                } else {
                    s < a && a < e
                }
            });
            if hit {
                id as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// Held-out accuracy, teacher forced: `(correct, counted)` over the
/// positions whose label is not [`IGNORE_INDEX`]. `argmax[t]` is the
/// model's most likely token at position `t`; `labels` are a [`Batch`]'s
/// (already shifted) labels.
pub fn label_accuracy(argmax: &[u32], labels: &[i32]) -> (usize, usize) {
    argmax
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .fold((0, 0), |(c, n), (&p, &l)| {
            (c + usize::from(p as i32 == l), n + 1)
        })
}

/// A seeded ChaCha stream for one purpose (`"order"`, `"val-split"`,
/// `"synth/reverse"`) and index (epoch…), so streams never share state.
pub(crate) fn rng_stream(seed: u64, purpose: &str, index: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("moeq/data/{purpose}/{seed}/{index}"));
    rand_chacha::ChaCha8Rng::from_seed(digest.into())
}

/// Uniform in `[0, bound)` by widening multiply: portable across rand
/// versions, bias below 2^-40 for any realistic bound.
pub(crate) fn uniform(rng: &mut rand_chacha::ChaCha8Rng, bound: usize) -> usize {
    use rand::RngCore;
    ((rng.next_u64() as u128 * bound as u128) >> 64) as usize
}

/// A Fisher-Yates permutation of `0..n`.
pub(crate) fn permutation(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = uniform(rng, i + 1);
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_marks_partial_tokens() {
        // tokens: [0,3) [3,5) [5,9); span [4,6) touches the last two
        let labels = spans_to_labels(&[7, 8, 9], &[(0, 3), (3, 5), (5, 9)], &[(4, 6)]);
        assert_eq!(labels, vec![IGNORE_INDEX, 8, 9]);
        assert_eq!(
            spans_to_labels(&[7], &[(0, 3)], &[(3, 3)]),
            vec![IGNORE_INDEX]
        );
    }

    #[test]
    fn accuracy_counts_labelled_positions() {
        assert_eq!(label_accuracy(&[1, 2, 3, 4], &[1, -100, 5, 4]), (2, 3));
    }

    #[test]
    fn permutations_are_seeded() {
        let a = permutation(50, &mut rng_stream(1, "order", 0));
        let b = permutation(50, &mut rng_stream(1, "order", 0));
        let c = permutation(50, &mut rng_stream(1, "order", 1));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
