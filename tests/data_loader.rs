//! Packing, batches, per-rank shares, and the cursor that restores the
//! exact data stream.

use moeq::data::{pack_rows, Batch, DataCursor, Loader, LoaderOptions, Sample, IGNORE_INDEX};
use std::collections::BTreeSet;

/// Sample i has length 3 + (i * 7) % 11, ids 1000*i + position, the second
/// half trained.
fn samples(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let len = 3 + (i * 7) % 11;
            let input_ids: Vec<u32> = (0..len).map(|p| (1000 * i + p) as u32).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(p, &id)| {
                    if p >= len / 2 {
                        id as i32
                    } else {
                        IGNORE_INDEX
                    }
                })
                .collect();
            Sample { input_ids, labels }
        })
        .collect()
}

fn opts(packing: bool) -> LoaderOptions {
    LoaderOptions {
        micro_batch_size: 2,
        sequence_len: 16,
        sample_packing: packing,
        pad_to_sequence_len: false,
        pad_id: 7,
        seed: 11,
        rank: 0,
        world_size: 1,
        drop_last: true,
        shuffle: true,
    }
}

/// Samples of a batch, recovered from ids (id / 1000), per row.
fn rows_of(b: &Batch) -> Vec<Vec<usize>> {
    (0..b.batch_size)
        .map(|r| {
            let row = &b.input_ids[r * b.seq_len..(r + 1) * b.seq_len];
            let mut at = 0;
            b.seq_lens[r]
                .iter()
                .map(|&len| {
                    let i = (row[at] / 1000) as usize;
                    at += len;
                    i
                })
                .collect()
        })
        .collect()
}

#[test]
fn packed_rows_hold_whole_samples_with_restarting_positions() {
    let data = samples(60);
    let mut loader = Loader::new(data.clone(), opts(true)).unwrap();
    let steps = loader.steps_per_epoch();
    let stats = loader.packing_stats();
    assert!(stats.ratio > 1.5, "packing ratio {}", stats.ratio);
    let mut seen = Vec::new();
    for _ in 0..steps {
        let b = loader.next_batch();
        let segs = b.segment_ids();
        for (r, samples_in_row) in rows_of(&b).into_iter().enumerate() {
            let base = r * b.seq_len;
            let mut at = base;
            for (k, &i) in samples_in_row.iter().enumerate() {
                let s = &data[i];
                assert_eq!(b.seq_lens[r][k], s.len(), "a sample is never split");
                assert_eq!(&b.input_ids[at..at + s.len()], &s.input_ids[..]);
                let pos: Vec<u32> = (0..s.len() as u32).collect();
                assert_eq!(
                    &b.position_ids[at..at + s.len()],
                    &pos[..],
                    "positions restart"
                );
                // shifted labels: position t predicts t+1 within the sample, never across
                assert_eq!(&b.labels[at..at + s.len() - 1], &s.labels[1..]);
                assert_eq!(b.labels[at + s.len() - 1], IGNORE_INDEX);
                assert!(segs[at..at + s.len()].iter().all(|&g| g == k as u32));
                at += s.len();
            }
            let used: usize = b.seq_lens[r].iter().sum();
            assert!(used <= 16);
            assert!(b.input_ids[at..base + b.seq_len].iter().all(|&t| t == 7));
            assert!(b.labels[at..base + b.seq_len]
                .iter()
                .all(|&l| l == IGNORE_INDEX));
            assert!(segs[at..base + b.seq_len]
                .iter()
                .all(|&g| g == samples_in_row.len() as u32));
            seen.extend(samples_in_row);
        }
    }
    let distinct: BTreeSet<usize> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "no sample twice in an epoch");
    assert_eq!(stats.samples, 60);
    assert!(
        seen.len() <= 60 && seen.len() >= 60 - 2 * 16,
        "only the last partial step is dropped"
    );
}

#[test]
fn best_fit_packing_never_overfills() {
    let lens: Vec<usize> = (0..500).map(|i| 1 + (i * 37) % 16).collect();
    let order: Vec<usize> = (0..500).rev().collect();
    let rows = pack_rows(&order, &lens, 16);
    let mut all: Vec<usize> = rows.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..500).collect::<Vec<_>>());
    assert!(rows
        .iter()
        .all(|r| r.iter().map(|&i| lens[i]).sum::<usize>() <= 16));
    let tokens: usize = lens.iter().sum();
    assert!(
        rows.len() <= tokens.div_ceil(16) + 3,
        "{} rows for {tokens} tokens",
        rows.len()
    );
}

#[test]
fn unpacked_batches_pad_to_the_longest_row_or_sequence_len() {
    let data = samples(10);
    let mut loader = Loader::new(data.clone(), opts(false)).unwrap();
    let b = loader.next_batch();
    let rows = rows_of(&b);
    assert!(rows.iter().all(|r| r.len() == 1));
    let longest = rows.iter().map(|r| data[r[0]].len()).max().unwrap();
    assert_eq!((b.batch_size, b.seq_len), (2, longest));
    let mut padded = Loader::new(
        data,
        LoaderOptions {
            pad_to_sequence_len: true,
            ..opts(false)
        },
    )
    .unwrap();
    assert_eq!(padded.next_batch().seq_len, 16);
}

#[test]
fn a_restored_cursor_continues_exactly() {
    for packing in [false, true] {
        let data = samples(45);
        let mut straight = Loader::new(data.clone(), opts(packing)).unwrap();
        let per_epoch = straight.steps_per_epoch();
        let all: Vec<Batch> = (0..3 * per_epoch + 2)
            .map(|_| straight.next_batch())
            .collect();
        for cut in [
            0,
            1,
            per_epoch - 1,
            per_epoch,
            per_epoch + 3,
            2 * per_epoch + 1,
        ] {
            let mut first = Loader::new(data.clone(), opts(packing)).unwrap();
            for b in &all[..cut] {
                assert_eq!(&first.next_batch(), b);
            }
            let saved = serde_json::to_string(&first.cursor()).unwrap();
            let cursor: DataCursor = serde_json::from_str(&saved).unwrap();
            let mut resumed = Loader::resume(data.clone(), opts(packing), cursor).unwrap();
            for (k, b) in all[cut..].iter().enumerate() {
                assert_eq!(
                    &resumed.next_batch(),
                    b,
                    "packing {packing}, cut {cut}, batch {k}"
                );
            }
        }
    }
}

#[test]
fn epochs_reshuffle_deterministically() {
    let data = samples(40);
    let epoch = |seed: u64, skip_epochs: usize| {
        let mut l = Loader::new(
            data.clone(),
            LoaderOptions {
                seed,
                ..opts(false)
            },
        )
        .unwrap();
        let n = l.steps_per_epoch();
        for _ in 0..skip_epochs * n {
            l.next_batch();
        }
        (0..n)
            .flat_map(|_| rows_of(&l.next_batch()).concat())
            .collect::<Vec<_>>()
    };
    assert_eq!(epoch(11, 0), epoch(11, 0));
    assert_ne!(epoch(11, 0), epoch(11, 1));
    assert_ne!(epoch(11, 0), epoch(12, 0));
    let mut sorted = epoch(11, 1);
    sorted.sort();
    assert_eq!(
        sorted,
        (0..40).collect::<Vec<_>>(),
        "each epoch reads every sample once"
    );
}

#[test]
fn ranks_read_disjoint_shares() {
    let data = samples(50);
    let world = 3;
    let single = Loader::new(
        data.clone(),
        LoaderOptions {
            micro_batch_size: 6,
            ..opts(true)
        },
    )
    .unwrap();
    let mut loaders: Vec<Loader> = (0..world)
        .map(|rank| {
            Loader::new(
                data.clone(),
                LoaderOptions {
                    rank,
                    world_size: world,
                    ..opts(true)
                },
            )
            .unwrap()
        })
        .collect();
    let steps = loaders[0].steps_per_epoch();
    assert!(loaders.iter().all(|l| l.steps_per_epoch() == steps));
    assert_eq!(
        single.steps_per_epoch(),
        steps,
        "3 ranks × 2 rows = one rank × 6 rows"
    );
    let mut one = single;
    for _ in 0..steps {
        let parts: Vec<Vec<Vec<usize>>> = loaders
            .iter_mut()
            .map(|l| rows_of(&l.next_batch()))
            .collect();
        let joined: Vec<Vec<usize>> = parts.concat();
        assert_eq!(
            joined,
            rows_of(&one.next_batch()),
            "rank r reads rows [2r, 2r+2) of each step"
        );
        let flat: Vec<usize> = joined.concat();
        let distinct: BTreeSet<usize> = flat.iter().copied().collect();
        assert_eq!(distinct.len(), flat.len());
    }
    // a cursor taken with 3 ranks resumes on 1 rank at the same row
    let cursor = loaders[0].cursor();
    let mut resumed = Loader::resume(
        data,
        LoaderOptions {
            micro_batch_size: 6,
            ..opts(true)
        },
        cursor,
    )
    .unwrap();
    assert_eq!(rows_of(&resumed.next_batch()), rows_of(&one.next_batch()));
}

#[test]
fn without_drop_last_the_last_step_is_filled_with_empty_rows() {
    let data = samples(7);
    let o = LoaderOptions {
        drop_last: false,
        world_size: 2,
        ..opts(false)
    };
    let mut r0 = Loader::new(data.clone(), o.clone()).unwrap();
    let mut r1 = Loader::new(data.clone(), LoaderOptions { rank: 1, ..o }).unwrap();
    assert_eq!(r0.steps_per_epoch(), 2);
    let (mut samples_seen, mut targets) = (0, 0);
    for _ in 0..2 {
        for b in [r0.next_batch(), r1.next_batch()] {
            samples_seen += b.seq_lens.iter().map(Vec::len).sum::<usize>();
            targets += b.num_targets();
        }
    }
    assert_eq!(samples_seen, 7);
    let want: usize = data.iter().map(Sample::num_targets).sum();
    assert_eq!(targets, want, "filler rows carry no labels");
    let eval = Loader::new(data, opts(false).for_eval()).unwrap();
    assert_eq!(eval.steps_per_epoch(), 4);
}

#[test]
fn loader_errors() {
    let err = |data: Vec<Sample>, o: LoaderOptions| Loader::new(data, o).err().unwrap().to_string();
    assert_eq!(
        err(samples(3), LoaderOptions { micro_batch_size: 4, ..opts(false) }),
        "data loader: 3 sequences are fewer than one step of micro_batch_size 4 × 1 ranks; lower micro_batch_size or add data"
    );
    assert_eq!(
        err(samples(3), LoaderOptions { sequence_len: 4, ..opts(false) }),
        "data loader: sample 1 has 10 tokens, more than sequence_len 4; prepare() with the same sequence_len"
    );
    assert_eq!(
        Loader::resume(samples(4), opts(false), DataCursor { epoch: 0, position: 9 }).err().unwrap().to_string(),
        "data loader: cursor position 9 is past the 4 sequences of epoch 0; the data or its settings changed since the checkpoint"
    );
}

#[test]
fn steps_for_fractional_epochs() {
    let l = Loader::new(samples(40), opts(false)).unwrap();
    assert_eq!(l.steps_per_epoch(), 20);
    assert_eq!(l.steps_in_epochs(2.0), 40);
    assert_eq!(l.steps_in_epochs(1.5), 30);
}

#[test]
fn samples_are_validated() {
    let err = |data: Vec<Sample>| {
        Loader::resume(
            data,
            opts(false),
            DataCursor {
                epoch: 0,
                position: 0,
            },
        )
        .err()
        .unwrap()
        .to_string()
    };
    let mut data = samples(6);
    data[2] = Sample {
        input_ids: vec![],
        labels: vec![],
    };
    assert_eq!(
        err(data),
        "data loader: sample 2 has no tokens; drop empty samples before loading (prepare() never makes them)"
    );
    let mut data = samples(6);
    data[4].labels.pop();
    assert_eq!(
        err(data),
        "data loader: sample 4 has 8 labels for 9 input_ids; labels must be aligned with input_ids, one per token (IGNORE_INDEX where not trained)"
    );
    let mut data = samples(6);
    data[0].labels.push(IGNORE_INDEX);
    assert_eq!(
        Loader::new(data, opts(false)).err().unwrap().to_string(),
        "data loader: sample 0 has 4 labels for 3 input_ids; labels must be aligned with input_ids, one per token (IGNORE_INDEX where not trained)"
    );
}

#[test]
fn dropped_rows_are_counted() {
    let data = samples(45);
    let with = |micro_batch_size: usize, world_size: usize| LoaderOptions {
        micro_batch_size,
        world_size,
        ..opts(false)
    };
    // 45 rows in steps of 2, 4 and 6 rows
    let l = Loader::new(data.clone(), with(2, 1)).unwrap();
    assert_eq!((l.steps_per_epoch(), l.dropped_rows_per_epoch()), (22, 1));
    let l = Loader::new(data.clone(), with(2, 2)).unwrap();
    assert_eq!((l.steps_per_epoch(), l.dropped_rows_per_epoch()), (11, 1));
    let l = Loader::new(data.clone(), with(3, 2)).unwrap();
    assert_eq!((l.steps_per_epoch(), l.dropped_rows_per_epoch()), (7, 3));
    let l = Loader::new(data, with(3, 2).for_eval()).unwrap();
    assert_eq!((l.steps_per_epoch(), l.dropped_rows_per_epoch()), (8, 0));
}

#[test]
fn padding_positions_count_from_zero() {
    for (packing, pad_to_sequence_len) in [(false, false), (false, true), (true, true)] {
        let data = samples(20);
        let mut l = Loader::new(
            data.clone(),
            LoaderOptions {
                pad_to_sequence_len,
                ..opts(packing)
            },
        )
        .unwrap();
        for _ in 0..l.steps_per_epoch() {
            let b = l.next_batch();
            let mut padded = 0;
            for r in 0..b.batch_size {
                let mut want: Vec<u32> = Vec::new();
                for &len in &b.seq_lens[r] {
                    want.extend(0..len as u32);
                }
                let pad = b.seq_len - want.len();
                padded += pad;
                want.extend(0..pad as u32);
                let row = r * b.seq_len..(r + 1) * b.seq_len;
                assert_eq!(&b.position_ids[row.clone()], &want[..], "row {r}");
                let tail = row.end - pad..row.end;
                assert!(b.input_ids[tail.clone()].iter().all(|&i| i == 7));
                assert!(b.labels[tail].iter().all(|&l| l == IGNORE_INDEX));
            }
            if pad_to_sequence_len {
                assert!(padded > 0, "rows shorter than sequence_len are padded");
            }
        }
    }
}

#[test]
fn two_ranks_resume_exactly() {
    for packing in [false, true] {
        let data = samples(45);
        let rank = |r: usize| LoaderOptions {
            rank: r,
            world_size: 2,
            ..opts(packing)
        };
        let mut straight: Vec<Loader> = (0..2)
            .map(|r| Loader::new(data.clone(), rank(r)).unwrap())
            .collect();
        let per_epoch = straight[0].steps_per_epoch();
        assert!(per_epoch >= 3, "{per_epoch}");
        let steps = 2 * per_epoch + 3;
        let all: Vec<[Batch; 2]> = (0..steps)
            .map(|_| [straight[0].next_batch(), straight[1].next_batch()])
            .collect();
        for cut in [1, per_epoch - 1, per_epoch, per_epoch + 2] {
            let mut first: Vec<Loader> = (0..2)
                .map(|r| Loader::new(data.clone(), rank(r)).unwrap())
                .collect();
            for pair in &all[..cut] {
                for r in 0..2 {
                    assert_eq!(&first[r].next_batch(), &pair[r]);
                }
            }
            assert_eq!(
                first[0].cursor(),
                first[1].cursor(),
                "one cursor for all ranks"
            );
            let cursor = first[0].cursor();
            let mut resumed: Vec<Loader> = (0..2)
                .map(|r| Loader::resume(data.clone(), rank(r), cursor).unwrap())
                .collect();
            for (k, pair) in all[cut..].iter().enumerate() {
                for r in 0..2 {
                    assert_eq!(
                        &resumed[r].next_batch(),
                        &pair[r],
                        "packing {packing}, cut {cut}, batch {k}, rank {r}"
                    );
                }
            }
        }
    }
}
