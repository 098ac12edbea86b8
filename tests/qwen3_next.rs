//! Qwen3-Next's and Qwen3.5's hybrid models on their tiny presets (Gated DeltaNet layers 0 and
//! 2, gated full attention on 1 and 3), f32 on the CPU with a random adapter on every target:
//! packed samples compute what each sample computes alone (the convolution and the recurrence
//! restart at a sample boundary); cached decoding gives the whole sequence's logits past the
//! delta rule's 64-position chunks; and `moeq train` lowers the loss.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{max_abs, moeq, random_adapters, EXPERT_PARAMETERS};
use moeq::arch::{LoraCtx, Model, ModelType};
use moeq::data::{Batch, IGNORE_INDEX};
use moeq::lora::Adapters;
use moeq::model_files::{dense, ModelDir};
use moeq::synth::{self, SynthOptions};
use moeq::train::step;
use rand::{Rng, SeedableRng};

const HYBRID: [ModelType; 2] = [ModelType::Qwen3Next, ModelType::Qwen35MoeText];

/// The tiny f32 model of `arch` (unquantized, positions up to 256) with random adapters on
/// every projection and both expert parameters.
fn tiny(arch: ModelType, dir: &std::path::Path) -> (Model, Adapters) {
    let opts = SynthOptions {
        model_type: arch,
        seed: 4,
        dtype: "float32".into(),
        ..SynthOptions::default()
    };
    synth::write(&opts, dir).unwrap();
    let md = ModelDir::open(dir).unwrap();
    let base = dense::load(&md, None, &Device::Cpu, DType::F32).unwrap();
    let model = Model::new(&md.spec, &base, DType::F32, &Device::Cpu, 256).unwrap();
    let adapters = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 6, 0.2);
    (model, adapters)
}

/// Rows of `seq` tokens, each holding its samples' ids in order, then padding.
fn batch(rows: &[Vec<Vec<u32>>], seq: usize) -> Batch {
    let (mut input_ids, mut position_ids) = (Vec::new(), Vec::new());
    for samples in rows {
        for s in samples {
            input_ids.extend(s);
            position_ids.extend(0..s.len() as u32);
        }
        let pad = seq - samples.iter().map(Vec::len).sum::<usize>();
        input_ids.extend(std::iter::repeat_n(0, pad));
        position_ids.extend(0..pad as u32);
    }
    Batch {
        labels: vec![IGNORE_INDEX; input_ids.len()],
        input_ids,
        position_ids,
        seq_lens: rows
            .iter()
            .map(|r| r.iter().map(Vec::len).collect())
            .collect(),
        batch_size: rows.len(),
        seq_len: seq,
    }
}

/// Logits `[B·T, V]` of a batch (the training forward, `train::step::hidden`).
fn logits(model: &Model, adapters: &Adapters, b: &Batch) -> Tensor {
    let inputs = step::inputs(model, b).unwrap();
    let h = step::hidden(model, adapters, &inputs).unwrap();
    h.matmul(&model.lm_head().t().unwrap()).unwrap()
}

fn random_ids(rng: &mut rand_chacha::ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Two rows of 82: [70 | 12] and [12 | 30 | padding]. Each sample's logits equal those of the
/// sample alone in a row of its own length — the Gated DeltaNet layers group the two samples of
/// 12 into one block, run the 70 in two chunks, and start each from a zero state and a zero
/// convolution history. Tolerance: relative 1e-5 of the largest logit (f32; full attention's
/// kernel masks the packed rows by segment instead of seeing one sample, which may sum in
/// another order).
#[test]
fn packed_samples_restart_the_recurrence_and_the_convolution() {
    for arch in HYBRID {
        let dir = tempfile::tempdir().unwrap();
        let (model, adapters) = tiny(arch, dir.path());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let vocab = model.spec.vocab_size;
        let [a, b, c, d] = [70, 12, 12, 30].map(|n| random_ids(&mut rng, n, vocab));
        let rows = vec![vec![a.clone(), b.clone()], vec![c.clone(), d.clone()]];
        let packed = logits(&model, &adapters, &batch(&rows, 82));
        for (sample, row, start) in [(&a, 0, 0), (&b, 0, 70), (&c, 1, 0), (&d, 1, 12)] {
            let n = sample.len();
            let alone = logits(&model, &adapters, &batch(&[vec![sample.clone()]], n));
            let got = packed.narrow(0, row * 82 + start, n).unwrap();
            let (err, scale) = (max_abs(&(&got - &alone).unwrap()), max_abs(&alone));
            assert!(
                err <= 1e-5 * scale,
                "{arch:?} sample of {n} at row {row}, {start}: {err:e} of {scale}"
            );
        }
        // The comparison can fail: the second sample's tokens continuing the first compute
        // otherwise.
        let joined = [a.clone(), b.clone()].concat();
        let one = logits(&model, &adapters, &batch(&[vec![joined]], 82));
        let (x, y) = (
            one.narrow(0, 70, 12).unwrap(),
            packed.narrow(0, 70, 12).unwrap(),
        );
        assert!(
            max_abs(&(&x - &y).unwrap()) > 1e-3 * max_abs(&y),
            "{arch:?}"
        );
    }
}

/// A prompt of 70 tokens (the delta rule in a chunk of 64 and one of 6), three tokens one at a
/// time (the recurrent step from the cached state), a block of 5 (chunked from the cached
/// state), then one at a time to 90: at each step the last position's logits equal the whole
/// sequence's forward at that position. Tolerance: relative 1e-4 of the largest logit (f32; as
/// tests/generate.rs — eager attention and the recurrent form of the delta rule sum in other
/// orders than the training forward's).
#[test]
fn cached_decoding_matches_the_whole_sequence_past_a_chunk() {
    for arch in HYBRID {
        let dir = tempfile::tempdir().unwrap();
        let (model, adapters) = tiny(arch, dir.path());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let n = 90;
        let ids = random_ids(&mut rng, n, model.spec.vocab_size);
        let whole = logits(&model, &adapters, &batch(&[vec![ids.clone()]], n));
        let ctx = LoraCtx {
            adapters: &adapters,
            live: false,
            dropout: None,
        };
        let mut cache = model.kv_cache();
        let mut steps = vec![0..70, 70..71, 71..72, 72..73, 73..78];
        steps.extend((78..n).map(|i| i..i + 1));
        for r in steps {
            let got = model.decode(&ids[r.clone()], &mut cache, &ctx).unwrap();
            let want = whole.get(r.end - 1).unwrap();
            let (err, scale) = (max_abs(&(&got - &want).unwrap()), max_abs(&want));
            assert!(
                err <= 1e-4 * scale,
                "{arch:?} tokens {r:?}: {err:e} of {scale}"
            );
        }
        assert_eq!(cache.len, n);
    }
}

/// Each tiny preset trains from the CLI with adapters on every projection (Gated DeltaNet's
/// included) and the experts: over 20 steps the logged loss (mean of 5 steps) falls by a third.
#[test]
fn tiny_presets_learn() {
    let default = include_str!("../configs/tiny-cpu.yaml");
    for arch in HYBRID.map(ModelType::as_str) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let extra = format!(
            "base_model: synth://{arch}/tiny?seed=0\nlora_target_modules: all-linear\n\
             max_steps: 20\nwarmup_steps: 4\nlogging_steps: 5\neval_steps: 100\nsave_steps: 100\n\
             output_dir: {}\n",
            out.display()
        );
        let replaced: Vec<&str> = extra.lines().filter_map(|l| l.split(':').next()).collect();
        let kept: String = default
            .lines()
            .filter(|l| !replaced.iter().any(|k| l.starts_with(&format!("{k}:"))))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = kept + &extra;
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let (code, _, err) = moeq(&["train", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{arch}: {err}");
        assert!(
            err.contains(&format!("({arch}, 4 layers)")),
            "{arch}: {err}"
        );
        let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
            .collect();
        assert_eq!(losses.len(), 4, "{arch}: {err}");
        assert!(
            losses[3] < losses[0] * 2.0 / 3.0,
            "{arch}: losses {losses:?}"
        );
        let saved = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let names = safetensors::SafeTensors::deserialize(&saved)
            .unwrap()
            .names()
            .join(" ");
        assert!(
            names.contains("layers.0.linear_attn.out_proj.lora_A"),
            "{names}"
        );
    }
}
