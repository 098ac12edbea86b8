//! Reading Hugging Face checkpoints: `config.json` → `ArchSpec`, memory-mapped safetensors
//! (one file or sharded with an index), and every on-disk expert layout mapped to the one
//! canonical layout (docs/ARCHITECTURE.md, decision 5): `gate_up_proj [E, 2I, H]` (gate rows first) and
//! `down_proj [E, H, I]`, under transformers v5 runtime names.

pub mod bnb;
#[cfg(feature = "cuda")]
mod cuda_quantizer;
pub mod dense;
mod fp8;
pub mod frozen;
pub mod generated;
mod layout;
mod mxfp4;
mod overrides;
pub mod prequantized;
mod shard;
pub mod writer;

pub use layout::{ExpertLayout, ExpertParam};
pub(crate) use mxfp4::{
    blocks_name as mxfp4_blocks_name, quantize as mxfp4_quantize, scales_name as mxfp4_scales_name,
};
pub use shard::Shard;

use crate::arch::{ArchSpec, ParamInfo, SpecError};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelFilesError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Format { path: String, problem: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// An opened model directory. Weights are optional: `inspect` works from `config.json` alone.
pub struct ModelDir {
    pub root: PathBuf,
    pub spec: ArchSpec,
    pub config_json: serde_json::Value,
    shards: Vec<Shard>,
    /// On-disk tensor name → index into `shards`.
    locations: HashMap<String, usize>,
    /// A text-model name → the on-disk name it has in a multimodal checkpoint
    /// (`spec.weights_prefix`: Llama 4's `language_model.…`, Qwen3.5's `model.language_model.…`).
    unprefixed: HashMap<String, String>,
    layout: Option<ExpertLayout>,
    /// Weights drawn at load time instead of read (`synth://…?init=device`).
    generated: Option<generated::GeneratedWeights>,
}

impl ModelDir {
    pub fn open(root: &Path) -> Result<ModelDir, ModelFilesError> {
        if !root.is_dir() {
            return Err(ModelFilesError::Format {
                path: root.display().to_string(),
                problem: "model directory does not exist (give a Hugging Face model directory or synth://<arch>/<preset>)".into(),
            });
        }
        let config_path = root.join("config.json");
        if !config_path.is_file() {
            return Err(ModelFilesError::Format {
                path: root.display().to_string(),
                problem: "no config.json: not a Hugging Face model directory".into(),
            });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelFilesError::Io {
            path: config_path.display().to_string(),
            source,
        })?;
        let config_json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelFilesError::Format {
                path: config_path.display().to_string(),
                problem: format!("not valid JSON: {e}"),
            })?;
        let spec = ArchSpec::from_json(&config_json, &config_path.display().to_string())?;
        let (shards, locations) = open_weights(root)?;
        let unprefixed = match spec.weights_prefix {
            ("", "") => HashMap::new(),
            _ => locations
                .keys()
                .filter_map(|n| Some((spec.text_name(n)?, n.clone())))
                .collect(),
        };
        let mut dir = ModelDir {
            root: root.to_path_buf(),
            spec,
            config_json,
            shards,
            locations,
            unprefixed,
            layout: None,
            generated: None,
        };
        if dir.has_weights() {
            dir.layout = Some(layout::detect(&dir)?);
            dir.note_layers_beyond();
        }
        Ok(dir)
    }

    /// One info line for tensors of layers past `num_hidden_layers` (the multi-token-prediction
    /// layers DeepSeek-V3 and GLM-4.5 ship): they are not read.
    fn note_layers_beyond(&self) {
        let layers = self.spec.num_layers;
        let beyond = self
            .locations
            .keys()
            .filter_map(|n| {
                n.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&l| l >= layers)
            .count();
        if beyond > 0 {
            tracing::info!(
                "{}: {beyond} tensors of layers from {layers} on (multi-token prediction, num_nextn_predict_layers: {}) are not loaded: moeq trains the {layers} decoder layers",
                self.root.display(),
                self.spec.mtp_layers
            );
        }
    }

    pub fn has_weights(&self) -> bool {
        !self.shards.is_empty()
    }

    /// Draw the frozen weights at load time (see [`generated`]) instead of reading them.
    pub fn generate_weights(&mut self, seed: u64) {
        self.generated = Some(generated::GeneratedWeights { seed });
    }

    pub fn generated(&self) -> Option<generated::GeneratedWeights> {
        self.generated
    }

    pub fn layout(&self) -> Option<ExpertLayout> {
        self.layout
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard holding an on-disk tensor name.
    pub fn locate(&self, disk_name: &str) -> Option<&Shard> {
        self.locations
            .get(self.on_disk(disk_name))
            .map(|&i| &self.shards[i])
    }

    /// The name a tensor has in its shard: `name`, or the prefixed one it stands for.
    fn on_disk<'a>(&'a self, name: &'a str) -> &'a str {
        match self.locations.contains_key(name) {
            true => name,
            false => self.unprefixed.get(name).map_or(name, String::as_str),
        }
    }

    fn require_layout(&self) -> Result<ExpertLayout, ModelFilesError> {
        self.layout.ok_or_else(|| ModelFilesError::Format {
            path: self.root.display().to_string(),
            problem: "no weights in this directory (only config.json): cannot read tensors".into(),
        })
    }

    /// A non-expert parameter by canonical name, in its on-disk dtype, on the CPU. Expert
    /// parameters are read whole through `read_experts`.
    pub fn read(&self, canonical: &str) -> Result<Tensor, ModelFilesError> {
        let layout = self.require_layout()?;
        let info = self.param_info(canonical)?;
        if let Some((layer, which)) = ExpertParam::parse(canonical) {
            return self.read_experts(layer, which, 0..self.spec.num_experts);
        }
        let disk = self.disk_name(layout, canonical);
        let (bytes, dtype, shape) = self.raw(&disk, None)?;
        self.check_shape(&disk, &shape, &info.shape)?;
        match dtype {
            DType::F8E4M3 => self.tensor(&disk),
            _ => Ok(Tensor::from_raw_buffer(bytes, dtype, &shape, &Device::Cpu)?),
        }
    }

    /// The on-disk name of non-expert parameter `canonical`: the layout's, or the type's hub
    /// spelling where the checkpoint holds that one (`ModelType::hub_name`).
    pub(crate) fn disk_name(&self, layout: ExpertLayout, canonical: &str) -> String {
        let name = layout.disk_name(canonical);
        match self.spec.model_type.hub_name(&name) {
            Some(hub) if self.locate(&name).is_none() && self.locate(&hub).is_some() => hub,
            _ => name,
        }
    }

    /// An on-disk tensor whole, on the CPU: in its dtype, or in bf16 for block-scaled FP8.
    pub(crate) fn tensor(&self, disk_name: &str) -> Result<Tensor, ModelFilesError> {
        let (bytes, dtype, shape) = self.raw(disk_name, None)?;
        if dtype != DType::F8E4M3 {
            return Ok(Tensor::from_raw_buffer(bytes, dtype, &shape, &Device::Cpu)?);
        }
        let scale_name = fp8::scale_name(disk_name);
        if self.locate(&scale_name).is_none() {
            return Err(ModelFilesError::Format {
                path: self.root.display().to_string(),
                problem: format!("FP8 tensor '{disk_name}' has no '{scale_name}' beside it (moeq reads block-scaled FP8)"),
            });
        }
        let (sb, sdt, sshape) = self.raw(&scale_name, None)?;
        let scale = Tensor::from_raw_buffer(sb, sdt, &sshape, &Device::Cpu)?;
        let block = fp8::block_size(
            &self.config_json,
            &self.root.join("config.json").display().to_string(),
        )?;
        fp8::dequantize(bytes, &shape, &scale, block).map_err(|e| ModelFilesError::Format {
            path: self.root.display().to_string(),
            problem: format!("'{disk_name}': {}", layout::without_backtrace(e)),
        })
    }

    /// Experts `[range.start, range.end)` of one layer's expert parameter in the canonical
    /// layout: `GateUp → [n, 2I, H]`, `Down → [n, H, I]`. Reads only those experts' bytes.
    pub fn read_experts(
        &self,
        layer: usize,
        which: ExpertParam,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor, ModelFilesError> {
        let layout = self.require_layout()?;
        if range.start >= range.end || range.end > self.spec.num_experts {
            return Err(ModelFilesError::Format {
                path: self.root.display().to_string(),
                problem: format!(
                    "expert range {range:?} is outside 0..{} experts",
                    self.spec.num_experts
                ),
            });
        }
        if !self.spec.moe_layers.get(layer).copied().unwrap_or(false) {
            return Err(ModelFilesError::Format {
                path: self.root.display().to_string(),
                problem: format!("layer {layer} is not an MoE layer"),
            });
        }
        layout::read_experts(self, layout, layer, which, range)
    }

    fn param_info(&self, canonical: &str) -> Result<ParamInfo, ModelFilesError> {
        self.spec
            .params()
            .into_iter()
            .find(|p| p.name == canonical)
            .ok_or_else(|| ModelFilesError::Format {
                path: self.root.display().to_string(),
                problem: format!(
                    "'{canonical}' is not a parameter of this {} model",
                    self.spec.model_type.as_str()
                ),
            })
    }

    /// Bytes, dtype and shape of an on-disk tensor (optionally a byte sub-range).
    pub(crate) fn raw(
        &self,
        disk_name: &str,
        within: Option<std::ops::Range<usize>>,
    ) -> Result<(&[u8], DType, Vec<usize>), ModelFilesError> {
        let shard = self
            .locate(disk_name)
            .ok_or_else(|| ModelFilesError::Format {
                path: self.root.display().to_string(),
                problem: format!("tensor '{disk_name}' is missing from the checkpoint"),
            })?;
        let disk_name = self.on_disk(disk_name);
        let info = shard
            .info(disk_name)
            .ok_or_else(|| ModelFilesError::Format {
                path: shard.path.display().to_string(),
                problem: format!(
                    "tensor '{disk_name}' is listed in the index but not in this file"
                ),
            })?;
        let dtype = shard::candle_dtype(&shard.path, disk_name, info.dtype)?;
        let shape = info.shape.clone();
        Ok((shard.bytes(disk_name, within)?, dtype, shape))
    }

    pub(crate) fn check_shape(
        &self,
        disk_name: &str,
        found: &[usize],
        expected: &[usize],
    ) -> Result<(), ModelFilesError> {
        if found != expected {
            let path = self
                .locate(disk_name)
                .map(|s| s.path.display().to_string())
                .unwrap_or_else(|| self.root.display().to_string());
            return Err(ModelFilesError::Format {
                path,
                problem: format!(
                    "tensor '{disk_name}' has shape {found:?} but config.json implies {expected:?}"
                ),
            });
        }
        Ok(())
    }

    /// On-disk bytes per tensor name (for `inspect`), summed by canonical parameter.
    pub fn disk_bytes(&self) -> Result<BTreeMap<String, u64>, ModelFilesError> {
        let layout = self.require_layout()?;
        let mut out = BTreeMap::new();
        for p in self.spec.params() {
            let mut total = 0u64;
            // Experts stored whole are one tensor like any other (Granite's and Llama 4's under
            // their hub names).
            let whole = matches!(layout, ExpertLayout::Fused | ExpertLayout::Transposed);
            let names = match ExpertParam::parse(&p.name) {
                Some(_) if !whole => layout.disk_names(&p.name, self.spec.num_experts),
                _ => vec![self.disk_name(layout, &p.name)],
            };
            for disk in names {
                let shard = self.locate(&disk).ok_or_else(|| ModelFilesError::Format {
                    path: self.root.display().to_string(),
                    problem: format!("tensor '{disk}' is missing from the checkpoint"),
                })?;
                if let Some(info) = shard.info(self.on_disk(&disk)) {
                    total += (info.data_offsets.1 - info.data_offsets.0) as u64;
                }
            }
            out.insert(p.name, total);
        }
        Ok(out)
    }

    /// Forget recorded reads (see `Shard::reads`).
    pub fn clear_reads(&self) {
        self.shards.iter().for_each(Shard::clear_reads);
    }

    /// Total bytes handed out by all shards since the last `clear_reads`.
    pub fn bytes_read(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|s| s.reads())
            .map(|r| r.len())
            .sum()
    }
}

fn open_weights(root: &Path) -> Result<(Vec<Shard>, HashMap<String, usize>), ModelFilesError> {
    let index_path = root.join(INDEX_FILE);
    let single = root.join(SINGLE_FILE);
    let mut shards = Vec::new();
    let mut locations = HashMap::new();
    if index_path.is_file() {
        let shown = index_path.display().to_string();
        let text = std::fs::read_to_string(&index_path).map_err(|source| ModelFilesError::Io {
            path: shown.clone(),
            source,
        })?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelFilesError::Format {
                path: shown.clone(),
                problem: format!("not valid JSON: {e}"),
            })?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelFilesError::Format {
                path: shown.clone(),
                problem: "no 'weight_map' object".into(),
            })?;
        let mut files: BTreeMap<String, usize> = BTreeMap::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| ModelFilesError::Format {
                path: shown.clone(),
                problem: "weight_map values must be file names".into(),
            })?;
            let next = files.len();
            files.entry(file.to_string()).or_insert(next);
        }
        // Open in file-name order so shard indices do not depend on JSON order.
        let mut ordered: Vec<&String> = files.keys().collect();
        ordered.sort();
        let mut file_index = HashMap::new();
        for name in ordered {
            if name.contains('/') || name.contains("..") {
                return Err(ModelFilesError::Format {
                    path: shown.clone(),
                    problem: format!("shard name '{name}' must be a plain file name"),
                });
            }
            let path = root.join(name);
            if !path.is_file() {
                return Err(ModelFilesError::Format {
                    path: shown.clone(),
                    problem: format!(
                        "lists shard '{name}', which is missing: the download is incomplete"
                    ),
                });
            }
            file_index.insert(name.clone(), shards.len());
            shards.push(Shard::open(&path)?);
        }
        for (tensor, file) in map {
            let i = file_index[file.as_str().unwrap_or_default()];
            if shards[i].info(tensor).is_none() {
                return Err(ModelFilesError::Format {
                    path: shards[i].path.display().to_string(),
                    problem: format!(
                        "index lists tensor '{tensor}' in this file, but it is not there"
                    ),
                });
            }
            locations.insert(tensor.clone(), i);
        }
    } else if single.is_file() {
        let shard = Shard::open(&single)?;
        for name in shard.names() {
            locations.insert(name.clone(), 0);
        }
        shards.push(shard);
    }
    Ok((shards, locations))
}
