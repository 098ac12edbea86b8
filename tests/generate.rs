//! Generation's cached decoding (`Model::decode`) against the training forward: on tiny f32
//! models of every architecture with a random adapter on every target, a prompt of 5 tokens and
//! then 7 tokens one at a time give, at every position, the logits the whole sequence gives in
//! one forward pass (`train::step::hidden`, the path `moeq eval` dumps and verify_hf compares
//! with transformers). Tolerance: relative 1e-4 of the largest logit (f32; eager attention in
//! another order than the training kernel's).

mod common;
use candle_core::{DType, Device};
use common::{max_abs, random_adapters, EXPERT_PARAMETERS};
use moeq::arch::{LoraCtx, Model, ModelType};
use moeq::data::{Batch, IGNORE_INDEX};
use moeq::model_files::frozen::{self, CpuQuantizer, SingleProcess};
use moeq::model_files::ModelDir;
use moeq::quant::QuantSettings;
use moeq::synth::{self, SynthOptions};
use moeq::train::step;
use rand::{Rng, SeedableRng};

#[test]
fn cached_decoding_matches_the_whole_sequence() {
    for arch in [
        ModelType::Qwen3Moe,
        ModelType::Qwen2Moe,
        ModelType::Mixtral,
        ModelType::Olmoe,
        ModelType::Glm4Moe,
        ModelType::Glm4MoeLite,
        ModelType::DeepseekV2,
        ModelType::DeepseekV3,
        ModelType::FlexOlmo,
        ModelType::MinimaxM2,
        ModelType::Ernie45Moe,
        ModelType::GraniteMoe,
        ModelType::HunyuanV1Moe,
        ModelType::GptOss,
        ModelType::GraniteMoeShared,
        ModelType::Llama4Text,
        ModelType::Qwen3Next,
        ModelType::Qwen35MoeText,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            model_type: arch,
            seed: 9,
            dtype: "float32".into(),
            ..SynthOptions::default()
        };
        synth::write(&opts, dir.path()).unwrap();
        let md = ModelDir::open(dir.path()).unwrap();
        let base = frozen::load(
            &md,
            QuantSettings::default(),
            None,
            &mut CpuQuantizer,
            &mut SingleProcess,
        )
        .unwrap();
        let model = Model::new(&md.spec, &base, DType::F32, &Device::Cpu, 64).unwrap();
        let adapters = random_adapters(&md.spec, &["all-linear"], &EXPERT_PARAMETERS, 3, 0.2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 12;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..md.spec.vocab_size as u32))
            .collect();
        let batch = Batch {
            input_ids: ids.clone(),
            labels: vec![IGNORE_INDEX; n],
            position_ids: (0..n as u32).collect(),
            seq_lens: vec![vec![n]],
            batch_size: 1,
            seq_len: n,
        };
        let inputs = step::inputs(&model, &batch).unwrap();
        let h = step::hidden(&model, &adapters, &inputs).unwrap();
        let whole = h.matmul(&model.lm_head().t().unwrap()).unwrap(); // [n, V]
        let ctx = LoraCtx {
            adapters: &adapters,
            live: false,
            dropout: None,
        };
        let mut cache = model.kv_cache();
        let mut got = vec![model.decode(&ids[..5], &mut cache, &ctx).unwrap()];
        for i in 5..n {
            got.push(model.decode(&ids[i..i + 1], &mut cache, &ctx).unwrap());
        }
        assert_eq!(cache.len, n);
        for (k, g) in got.iter().enumerate() {
            let pos = k + 4;
            let want = whole.get(pos).unwrap();
            let (err, scale) = (max_abs(&(g - &want).unwrap()), max_abs(&want));
            assert!(
                err <= 1e-4 * scale,
                "{arch:?} position {pos}: {err} of {scale}"
            );
        }
    }
}
