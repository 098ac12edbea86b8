//! The built-in synth://reverse task with the synthetic tokenizer: what the
//! embedded default config trains on and evaluates.

mod data_common;

use data_common::{config, synth_bundle};
use moeq::config::TrainConfig;
use moeq::data::{label_accuracy, prepare, Loader, LoaderOptions, ReverseTask, IGNORE_INDEX};

#[test]
fn every_symbol_is_one_token() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let task = ReverseTask {
        n: 300,
        symbols: 23,
        max_len: 8,
        ..ReverseTask::default()
    };
    for r in task.records(&tok.eos.text) {
        let prompt = r["segments"][0]["text"].as_str().unwrap();
        let symbols = prompt
            .trim_end_matches(':')
            .split(' ')
            .filter(|s| !s.is_empty())
            .count();
        let ids = tok.encode_plain(prompt).unwrap();
        assert_eq!(
            ids.len(),
            symbols + 1,
            "{prompt:?}: one token per symbol, one for ':'"
        );
    }
}

#[test]
fn embedded_default_prepares_the_reverse_task() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cfg = TrainConfig::embedded_default().unwrap().config;
    let out = prepare(&cfg, &tok).unwrap();
    assert_eq!((out.train.len(), out.val.len()), (3800, 200));
    assert!(out.warnings.is_empty());
    for s in out.train.iter().chain(&out.val) {
        // " a b c:" then " c b a<eos>": L + 1 prompt tokens, L + 1 answer tokens
        let n = s.len();
        assert_eq!(n % 2, 0);
        let half = n / 2;
        assert!(s.labels[..half].iter().all(|&l| l == IGNORE_INDEX));
        let answer: Vec<u32> = s.labels[half..].iter().map(|&l| l as u32).collect();
        assert_eq!(&answer[..], &s.input_ids[half..]);
        assert_eq!(*s.input_ids.last().unwrap(), tok.eos.id);
        let prompt_syms = &s.input_ids[..half - 1];
        let answer_syms = &s.input_ids[half..n - 1];
        assert!(
            prompt_syms.iter().rev().eq(answer_syms.iter()),
            "the answer is the prompt reversed"
        );
    }
    let p = out.stats.packing.unwrap();
    assert!(p.ratio > 8.0 && p.fill > 0.9, "{p:?}");
    assert!(out.stats.summary().starts_with("data: 3800 train samples"));
    // held-out sequences are new
    assert!(out.val.iter().all(|v| !out.train.contains(v)));
}

/// What three predictors of the held-out batches get right, computed from
/// `input_ids` alone (never the labels): one that reverses the prompt, one
/// that knows only the format (where the answer ends, so where EOS goes) and
/// one that repeats its input token.
#[test]
fn held_out_accuracy_separates_learning_from_chance() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cfg = TrainConfig::embedded_default().unwrap().config;
    let out = prepare(&cfg, &tok).unwrap();
    let colon = tok.encode_plain(":").unwrap();
    assert_eq!(colon.len(), 1);
    let (colon, eos) = (colon[0], tok.eos.id);
    let opts = LoaderOptions::from_config(&cfg, tok.pad.id, 0, 1).for_eval();
    let mut eval = Loader::new(out.val.clone(), opts).unwrap();
    let (mut reverser, mut format_only, mut previous, mut total) = (0, 0, 0, 0);
    for _ in 0..eval.steps_per_epoch() {
        let b = eval.next_batch();
        assert_eq!(b.batch_size, 8);
        assert!(b.seq_len <= 128);
        let mut reversed = b.input_ids.clone();
        let mut eos_only = vec![colon; b.input_ids.len()];
        for (r, lens) in b.seq_lens.iter().enumerate() {
            let mut at = r * b.seq_len;
            for &len in lens {
                let ids = &b.input_ids[at..at + len];
                let c = ids.iter().position(|&i| i == colon).unwrap();
                for t in c..len {
                    let k = t - c;
                    reversed[at + t] = if k < c { ids[c - 1 - k] } else { eos };
                    if k == c {
                        eos_only[at + t] = eos;
                    }
                }
                at += len;
            }
        }
        let (c, n) = label_accuracy(&reversed, &b.labels);
        reverser += c;
        total += n;
        format_only += label_accuracy(&eos_only, &b.labels).0;
        previous += label_accuracy(&b.input_ids, &b.labels).0;
    }
    let targets: usize = out.val.iter().map(|s| s.num_targets()).sum();
    assert_eq!(total, targets, "every held-out target is evaluated once");
    assert_eq!(
        reverser, total,
        "the labels are the reversed prompt, then EOS"
    );
    assert_eq!(
        format_only,
        out.val.len(),
        "one EOS per sample, nothing else"
    );
    assert!(
        (previous as f64) < 0.05 * total as f64,
        "{previous} of {total}"
    );
}

#[test]
fn synth_needs_input_output() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cfg = config("datasets:\n  - path: synth://reverse?n=10\n    type: completion\n");
    assert_eq!(
        prepare(&cfg, &tok).err().unwrap().to_string(),
        "synth://reverse?n=10: synthetic tasks make input_output records; set datasets[0].type to input_output (it is completion)"
    );
    let cfg = config("datasets:\n  - path: synth://reverse?n=999999\n    type: input_output\n");
    assert_eq!(
        prepare(&cfg, &tok).err().unwrap().to_string(),
        "synth://reverse?n=999999: n = 999999 is too many distinct sequences for these settings (at most 93600); raise symbols or max_len"
    );
}

/// synth://random: records of exactly `len` tokens, every one after the first a target; with
/// `len = sequence_len` each packed row is one whole sample (the benchmarks' shape).
#[test]
fn random_rows_are_whole_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = synth_bundle(tmp.path());
    let cfg = config(
        "datasets:\n  - path: synth://random?n=12&len=64&seed=5\n    type: input_output\nsequence_len: 64\nsample_packing: true\nmicro_batch_size: 2\n",
    );
    let out = prepare(&cfg, &tok).unwrap();
    assert_eq!(out.train.len() + out.val.len(), 12);
    for s in &out.train {
        assert_eq!(s.len(), 64, "one token per symbol");
        assert_eq!(s.num_targets(), 63, "every next token is a target");
    }
    let distinct: std::collections::HashSet<_> = out.train.iter().map(|s| &s.input_ids).collect();
    assert_eq!(distinct.len(), out.train.len(), "random rows differ");
    let opts = LoaderOptions::from_config(&cfg, tok.pad.id, 0, 1);
    let mut loader = Loader::new(out.train.clone(), opts).unwrap();
    let b = loader.next_batch();
    assert!(
        b.segment_ids().iter().all(|&id| id == 0),
        "one sample per row"
    );
    let e = prepare(
        &config("datasets:\n  - path: synth://random?len=0\n    type: input_output\n"),
        &tok,
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "synth://random?len=0: need n >= 1, len >= 1 and symbols in 1..=23, got n 1000 len 0 symbols 23"
    );
}
