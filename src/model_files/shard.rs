//! One memory-mapped safetensors file. Tensor bytes are reached only through `Shard::bytes`,
//! which records every byte range it hands out: loading a rank's expert slice must touch only
//! that slice's bytes, and the record is how tests prove it.

use super::ModelFilesError;
use candle_core::DType;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Shard {
    pub path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    reads: Mutex<Vec<Range<usize>>>,
}

/// Element type of a tensor on disk, restricted to what moeq reads.
pub fn candle_dtype(path: &Path, name: &str, dtype: StDtype) -> Result<DType, ModelFilesError> {
    match dtype {
        StDtype::BF16 => Ok(DType::BF16),
        StDtype::F16 => Ok(DType::F16),
        StDtype::F32 => Ok(DType::F32),
        StDtype::U8 => Ok(DType::U8),
        // Block-scaled FP8 (DeepSeek-V3 and others): `model_files::fp8` turns it into bf16.
        StDtype::F8_E4M3 => Ok(DType::F8E4M3),
        other => Err(ModelFilesError::Format {
            path: path.display().to_string(),
            problem: format!(
                "tensor '{name}' has dtype {other:?}; moeq reads bf16, f16, f32 and block-scaled FP8 e4m3 weights (and u8 for pre-quantized NF4)"
            ),
        }),
    }
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard, ModelFilesError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| ModelFilesError::Io {
            path: shown.clone(),
            source,
        })?;
        // SAFETY: the mapping is read-only; a checkpoint modified by another process while
        // we read it is outside what any loader can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelFilesError::Io {
            path: shown.clone(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelFilesError::Format {
                path: shown.clone(),
                problem: describe_safetensors_error(&e, mmap.len()),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
            reads: Mutex::new(Vec::new()),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Raw little-endian bytes of `name`, restricted to the byte range `within` of that
    /// tensor's data (pass `None` for the whole tensor).
    pub fn bytes(
        &self,
        name: &str,
        within: Option<Range<usize>>,
    ) -> Result<&[u8], ModelFilesError> {
        let info = self.info(name).ok_or_else(|| ModelFilesError::Format {
            path: self.path.display().to_string(),
            problem: format!("tensor '{name}' is not in this file"),
        })?;
        let (start, end) = info.data_offsets;
        let range = match within {
            None => start..end,
            Some(r) if r.end <= end - start => start + r.start..start + r.end,
            Some(r) => {
                return Err(ModelFilesError::Format {
                    path: self.path.display().to_string(),
                    problem: format!(
                        "read of bytes {r:?} is outside tensor '{name}' ({} bytes)",
                        end - start
                    ),
                })
            }
        };
        let abs = self.data_start + range.start..self.data_start + range.end;
        if let Ok(mut reads) = self.reads.lock() {
            reads.push(abs.clone());
        }
        Ok(&self.mmap[abs])
    }

    /// Every byte range handed out so far (absolute file offsets), in order.
    pub fn reads(&self) -> Vec<Range<usize>> {
        self.reads.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn clear_reads(&self) {
        if let Ok(mut reads) = self.reads.lock() {
            reads.clear();
        }
    }

    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes: too short to be safetensors (truncated download?)"),
        E::HeaderTooLarge | E::InvalidHeaderLength => {
            "header length field is larger than the file: truncated or not a safetensors file".into()
        }
        E::MetadataIncompleteBuffer => format!(
            "header describes a different data size than the file holds ({file_len} bytes): truncated or damaged, re-download it"
        ),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::InvalidHeaderStart => {
            "header is not valid safetensors JSON: damaged file".into()
        }
        other => format!("invalid safetensors file: {other}"),
    }
}
