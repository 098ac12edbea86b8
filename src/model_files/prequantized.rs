//! Writing a pre-quantized checkpoint (`moeq quantize`): the frozen base in bitsandbytes'
//! 4-bit format under transformers v5 runtime names (whatever the source layout), dense
//! tensors unchanged, sharded with an index, `quantization_config` in config.json, tokenizer
//! files copied. Written into a temporary directory and renamed at the end, so a failed run
//! leaves nothing behind.

use super::bnb;
use super::frozen::{Frozen, FrozenBase};
use super::writer::{group_into_shards, shard_name, write_index, StreamWriter, TensorDecl};
use super::{ModelDir, ModelFilesError};
use candle_core::DType;
use std::path::Path;

const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelFilesError + '_ {
    move |source| ModelFilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn st_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::U8 => "U8",
        _ => "BF16",
    }
}

fn dense_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>, ModelFilesError> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        _ => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

enum Data<'a> {
    Bytes(std::borrow::Cow<'a, [u8]>),
    Dense(&'a candle_core::Tensor),
}

/// Writes `base` (loaded from `src`) to `out`. Returns the bytes written.
pub fn write(
    src: &ModelDir,
    base: &FrozenBase,
    out: &Path,
    shard_bytes: u64,
) -> Result<u64, ModelFilesError> {
    let Some(settings) = &base.settings else {
        return Err(ModelFilesError::Format {
            path: out.display().to_string(),
            problem: "the base was loaded unquantized (16-bit): nothing 4-bit to write".into(),
        });
    };
    let weights_dtype = src
        .spec
        .torch_dtype
        .clone()
        .unwrap_or_else(|| "bfloat16".into());
    // Every output tensor with its bytes, per frozen parameter, in name order. 4-bit codes are
    // borrowed; a dense tensor's bytes are made only when its shard is written.
    let mut groups: Vec<Vec<(TensorDecl, Data)>> = Vec::new();
    for (name, frozen) in &base.tensors {
        match frozen {
            Frozen::Quantized { codes: Some(_), .. } => {
                return Err(ModelFilesError::Format {
                    path: out.display().to_string(),
                    problem: format!("'{name}': its codes were kept on the GPU for training; load with a quantizer that returns them to the host"),
                })
            }
            Frozen::Quantized { param, experts: None, .. } => groups.push(
                bnb::entries(name, param, &weights_dtype)
                    .into_iter()
                    .map(|(d, b)| (d, Data::Bytes(b)))
                    .collect(),
            ),
            Frozen::Quantized { experts: Some(r), .. } => {
                return Err(ModelFilesError::Format {
                    path: out.display().to_string(),
                    problem: format!("'{name}' holds only experts {r:?}: a pre-quantized checkpoint needs all experts"),
                })
            }
            Frozen::DenseExperts { .. } => {
                return Err(ModelFilesError::Format {
                    path: out.display().to_string(),
                    problem: format!("'{name}' was loaded unquantized (16-bit): a pre-quantized checkpoint needs it 4-bit"),
                })
            }
            Frozen::Dense(t) => {
                groups.push(vec![(TensorDecl::new(name.clone(), st_dtype(t.dtype()), t.dims().to_vec()), Data::Dense(t))])
            }
        }
    }
    let sizes: Vec<u64> = groups
        .iter()
        .map(|g| g.iter().map(|(d, _)| d.byte_len() as u64).sum())
        .collect();
    let total: u64 = sizes.iter().sum();
    let shards = group_into_shards(&sizes, shard_bytes);

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let mut weight_map = serde_json::Map::new();
        for (k, range) in shards.iter().enumerate() {
            let file = shard_name(k, shards.len());
            let path = tmp.join(&file);
            let decls: Vec<TensorDecl> = groups[range.clone()]
                .iter()
                .flatten()
                .map(|(d, _)| d.clone())
                .collect();
            let mut w = StreamWriter::create(&path, &decls).map_err(io(&path))?;
            for (decl, data) in groups[range.clone()].iter().flatten() {
                match data {
                    Data::Bytes(b) => w.write(b),
                    Data::Dense(t) => w.write(&dense_bytes(t)?),
                }
                .map_err(io(&path))?;
                crate::util::mem::sample_peak();
                weight_map.insert(decl.name.clone(), file.clone().into());
            }
            w.finish().map_err(io(&path))?;
        }
        if shards.len() > 1 {
            write_index(&tmp, total, &weight_map).map_err(io(&tmp))?;
        }
        let mut config = src.config_json.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "quantization_config".into(),
                bnb::quantization_config(settings, &weights_dtype),
            );
        }
        let cfg_path = tmp.join("config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|e| ModelFilesError::Format {
            path: cfg_path.display().to_string(),
            problem: e.to_string(),
        })?;
        std::fs::write(&cfg_path, text + "\n").map_err(io(&cfg_path))?;
        for f in COPIED {
            let from = src.root.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(io(&from))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(total)
}
