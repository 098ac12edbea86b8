//! Deterministic synthetic Hugging Face checkpoints: `config.json`, safetensors shards (with
//! an index when there is more than one), `tokenizer.json` and `tokenizer_config.json`.
//!
//! Every value comes from a ChaCha stream seeded by `(seed, stream key)`, where the key names
//! the canonical parameter and, for experts, the expert and projection (`gate`, `up`, `down`).
//! The hub (per-expert) and fused layouts therefore hold the same canonical tensors for the
//! same seed. Writing streams chunk by chunk: memory stays at a few expert slices whatever
//! the checkpoint size.

mod presets;
mod presets_gpt_oss;
mod presets_llama4;
mod presets_qwen3_next;
pub mod tokenizer;
pub(crate) mod writer;

pub use presets::{Preset, PRESETS};
pub use writer::{DiskLayout, SynthOptions, SynthReport};

use crate::arch::{supported_model_types, ArchSpec, ModelType, SpecError};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

pub fn parse_model_type(arch: &str) -> Result<ModelType, SynthError> {
    ModelType::parse(arch).ok_or_else(|| {
        SynthError::Usage(format!(
            "unknown architecture '{arch}' (supported: {})",
            supported_model_types()
        ))
    })
}

/// The config.json of a preset, with token ids from the synthetic tokenizer.
pub fn config_json(
    model_type: ModelType,
    preset: &str,
    layers: Option<usize>,
    dtype: &str,
) -> Result<Value, SynthError> {
    let p = presets::find(model_type, preset)?;
    let mut cfg = (p.config)();
    let tok = tokenizer::build(2048);
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| SynthError::Usage("preset config is not an object".into()))?;
    obj.insert("model_type".into(), model_type.as_str().into());
    obj.insert(
        "architectures".into(),
        serde_json::json!([model_type.architecture_class()]),
    );
    obj.entry("vocab_size")
        .or_insert(tokenizer::VOCAB_SIZE.into());
    obj.insert("hidden_act".into(), "silu".into());
    obj.insert("initializer_range".into(), 0.02.into());
    // A release's own ids stay (Llama 4's) as metadata: the synthetic tokenizer_config.json
    // names its end-of-text token as eos and pad, which wins over config.json's ids.
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        obj.entry(key).or_insert(tok.endoftext_id.into());
    }
    obj.insert("torch_dtype".into(), dtype.into());
    if let Some(n) = layers {
        if n == 0 {
            return Err(SynthError::Usage("--layers must be at least 1".into()));
        }
        obj.insert("num_hidden_layers".into(), n.into());
        if let Some(Value::Array(dense)) = obj.get_mut("mlp_only_layers") {
            dense.retain(|l| l.as_u64().is_some_and(|l| (l as usize) < n));
        }
        // Per-layer lists (attention types, Llama 4's NoPE layers) repeat their pattern over
        // the new depth.
        for key in ["layer_types", "no_rope_layers"] {
            if let Some(Value::Array(types)) = obj.get_mut(key) {
                let pattern = types.clone();
                *types = (0..n).map(|l| pattern[l % pattern.len()].clone()).collect();
            }
        }
    }
    // Fail here, not in a later reader, if a preset ever disagrees with the spec parser.
    ArchSpec::from_json(
        &cfg,
        &format!("synth preset {}/{preset}", model_type.as_str()),
    )?;
    Ok(cfg)
}

/// A parsed `synth://<arch>/<preset>?seed=N[&layers=L][&layout=hub|fused][&init=disk|device]`
/// reference. `init=device` writes only config.json and the tokenizer; the trainer draws the
/// weights where it quantizes them (`model_files::generated`).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthUri {
    pub model_type: ModelType,
    pub preset: String,
    pub seed: u64,
    pub layers: Option<usize>,
    pub layout: DiskLayout,
    /// Weights drawn at load time instead of written to the cache.
    pub generated: bool,
}

impl SynthUri {
    pub fn parse(uri: &str) -> Result<SynthUri, SynthError> {
        let usage = |why: &str| {
            SynthError::Usage(format!(
                "base_model '{uri}': {why} (expected synth://<arch>/<preset>?seed=N[&layers=L][&layout=hub|fused][&init=disk|device])"
            ))
        };
        let rest = uri
            .strip_prefix("synth://")
            .ok_or_else(|| usage("not a synth:// reference"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (arch, preset) = path
            .split_once('/')
            .ok_or_else(|| usage("missing '/<preset>'"))?;
        let model_type = parse_model_type(arch)?;
        presets::find(model_type, preset)?;
        let mut out = SynthUri {
            model_type,
            preset: preset.to_string(),
            seed: 0,
            layers: None,
            layout: DiskLayout::Hub,
            generated: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| usage(&format!("'{pair}' is not key=value")))?;
            match k {
                "seed" => out.seed = v.parse().map_err(|_| usage("seed must be an integer"))?,
                "layers" => {
                    out.layers = Some(v.parse().map_err(|_| usage("layers must be an integer"))?)
                }
                "layout" => out.layout = DiskLayout::parse(v).map_err(|e| usage(&e))?,
                "init" => {
                    out.generated = match v {
                        "disk" => false,
                        "device" => true,
                        _ => {
                            return Err(usage(&format!(
                                "init must be 'disk' or 'device', got '{v}'"
                            )))
                        }
                    }
                }
                other => return Err(usage(&format!("unknown parameter '{other}'"))),
            }
        }
        Ok(out)
    }

    /// Directory name inside the cache: one per distinct checkpoint (and generator version,
    /// and the preset's config: a cache written by an older moeq, or before a preset changed,
    /// is not mistaken for the current weights).
    fn cache_name(&self) -> String {
        use sha2::{Digest, Sha256};
        let config = presets::find(self.model_type, &self.preset)
            .map(|p| (p.config)().to_string())
            .unwrap_or_default();
        let hash = Sha256::digest(config.as_bytes());
        let layers = format!(
            "{}-c{:02x}{:02x}{:02x}{:02x}",
            self.layers.map(|l| format!("-L{l}")).unwrap_or_default(),
            hash[0],
            hash[1],
            hash[2],
            hash[3]
        );
        if self.generated {
            // Config and tokenizer only: the same for every seed and layout.
            return format!(
                "{}-{}{layers}-config-g{GENERATOR_VERSION}",
                self.model_type.as_str(),
                self.preset
            );
        }
        format!(
            "{}-{}-seed{}{layers}-{}-g{GENERATOR_VERSION}",
            self.model_type.as_str(),
            self.preset,
            self.seed,
            self.layout.as_str()
        )
    }
}

/// Bumped whenever the same preset and seed produce different weights.
const GENERATOR_VERSION: u32 = 2;

/// Where synthesized checkpoints are cached: `$MOEQ_CACHE_DIR`, else `$XDG_CACHE_HOME/moeq`,
/// else `~/.cache/moeq`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOEQ_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("moeq");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("moeq")
}

/// Turns a `base_model` value into a model directory, synthesizing `synth://` references into
/// the cache on first use. Other values are returned as paths unchanged.
pub fn resolve_base_model(base_model: &str) -> Result<PathBuf, SynthError> {
    if !base_model.starts_with("synth://") {
        return Ok(PathBuf::from(base_model));
    }
    let uri = SynthUri::parse(base_model)?;
    let dir = cache_dir().join("synth").join(uri.cache_name());
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    tracing::info!(uri = base_model, dir = %dir.display(), "synthesizing checkpoint into the cache");
    let opts = SynthOptions {
        model_type: uri.model_type,
        preset: uri.preset.clone(),
        layers: uri.layers,
        layout: uri.layout,
        seed: uri.seed,
        config_only: uri.generated,
        ..SynthOptions::default()
    };
    match writer::write(&opts, &dir) {
        Ok(_) => Ok(dir),
        // Another process (another rank) finished the same checkpoint first.
        Err(_) if dir.join("config.json").is_file() => Ok(dir),
        Err(e) => Err(e),
    }
}

/// The seed to draw the weights with when `base_model` asks for them at load time
/// (`synth://…&init=device`), else None.
pub fn generated_seed(base_model: &str) -> Result<Option<u64>, SynthError> {
    if !base_model.starts_with("synth://") {
        return Ok(None);
    }
    let uri = SynthUri::parse(base_model)?;
    Ok(uri.generated.then_some(uri.seed))
}

pub fn write(opts: &SynthOptions, out: &Path) -> Result<SynthReport, SynthError> {
    writer::write(opts, out)
}
