//! Sample packing: several samples share one row of `sequence_len` tokens.
//!
//! Best-fit in the (shuffled) order given: each sample goes into the open
//! row whose free space is smallest but still enough, else a new row. A
//! sample is never split across rows (prepare() already truncated every
//! sample to `sequence_len`). O(n log n) with a BTreeMap keyed by free space.
//! Rows come out in the order they were opened.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Packs `order` (sample indices) by their `lens` into rows of at most
/// `capacity` tokens. Every index appears in exactly one row.
pub fn pack_rows(order: &[usize], lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (free tokens, row index) of rows that can still take something
    let mut free: BTreeMap<(usize, usize), ()> = BTreeMap::new();
    for &i in order {
        let len = lens[i].min(capacity);
        let fit = free.range((len, 0)..).next().map(|(&k, _)| k);
        match fit {
            Some((space, row)) => {
                free.remove(&(space, row));
                rows[row].push(i);
                if space > len {
                    free.insert((space - len, row), ());
                }
            }
            None => {
                rows.push(vec![i]);
                if capacity > len {
                    free.insert((capacity - len, rows.len() - 1), ());
                }
            }
        }
    }
    rows
}

/// How well packing filled the rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PackingStats {
    pub samples: usize,
    pub rows: usize,
    /// Samples per row.
    pub ratio: f64,
    /// Real tokens / (rows × sequence_len).
    pub fill: f64,
}

impl PackingStats {
    pub fn of(rows: &[Vec<usize>], lens: &[usize], capacity: usize) -> PackingStats {
        let samples: usize = rows.iter().map(Vec::len).sum();
        let tokens: usize = rows.iter().flatten().map(|&i| lens[i].min(capacity)).sum();
        let n = rows.len().max(1) as f64;
        PackingStats {
            samples,
            rows: rows.len(),
            ratio: samples as f64 / n,
            fill: tokens as f64 / (n * capacity as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_fills_the_tightest_row() {
        // capacity 10: 6 opens row0 (4 free), 7 opens row1 (3 free),
        // 3 goes to row1 (tightest fit), 4 to row0, 5 opens row2
        let lens = [6, 7, 3, 4, 5];
        let rows = pack_rows(&[0, 1, 2, 3, 4], &lens, 10);
        assert_eq!(rows, vec![vec![0, 3], vec![1, 2], vec![4]]);
        let s = PackingStats::of(&rows, &lens, 10);
        assert_eq!((s.samples, s.rows), (5, 3));
        assert!((s.fill - 25.0 / 30.0).abs() < 1e-12);
    }
}
