//! Writing a pre-quantized checkpoint (`moeq quantize`): the frozen base in bitsandbytes'
//! 4-bit format under transformers v5 runtime names (whatever the source layout), dense
//! tensors unchanged, sharded with an index, `quantization_config` in config.json, tokenizer
//! files copied. Written into a temporary directory and renamed at the end, so a failed run
//! leaves nothing behind.

use super::bnb;
use super::frozen::{Frozen, FrozenBase};
use super::writer::{
    dense_bytes, group_into_shards, io, shard_name, st_dtype, write_index, write_side_files,
    written_atomically, StreamWriter, TensorDecl,
};
use super::{ModelDir, ModelFilesError};
use std::path::Path;

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
    for (canonical, frozen) in &base.tensors {
        let name = &src.spec.model_type.runtime_weight_name(canonical);
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

    written_atomically(out, |tmp| {
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
            write_index(tmp, total, &weight_map).map_err(io(tmp))?;
        }
        let mut config = src.config_json.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "quantization_config".into(),
                bnb::quantization_config(settings, &weights_dtype),
            );
        }
        write_side_files(src, tmp, &config)
    })?;
    Ok(total)
}
