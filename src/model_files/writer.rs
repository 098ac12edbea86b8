//! Writing safetensors files as a stream: the header is computed from the declared tensors up
//! front, then data is appended in declaration order, so a file of any size is written with
//! memory for one piece at a time. Used by `moeq synth`, `moeq quantize` and `moeq merge`; a
//! checkpoint directory is written beside its destination and renamed into place once complete
//! (`written_atomically`), so a failed run leaves nothing behind.

use super::{ModelDir, ModelFilesError};
use candle_core::DType;
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One tensor to be written: name, safetensors dtype string (`BF16`, `F32`, `U8`…), shape.
#[derive(Debug, Clone)]
pub struct TensorDecl {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

impl TensorDecl {
    pub fn new(name: impl Into<String>, dtype: &'static str, shape: Vec<usize>) -> TensorDecl {
        TensorDecl {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn byte_len(&self) -> usize {
        let elem = match self.dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "BF16" | "F16" | "I16" | "U16" => 2,
            _ => 1,
        };
        self.shape.iter().product::<usize>() * elem
    }
}

pub struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes each declared tensor still expects, in order.
    remaining: Vec<(String, usize)>,
    current: usize,
}

impl StreamWriter {
    /// Creates `path` and writes the header for `tensors` (in this order) with
    /// `__metadata__ = {"format": "pt"}`, padded to 8 bytes as the safetensors library does.
    pub fn create(path: &Path, tensors: &[TensorDecl]) -> std::io::Result<StreamWriter> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for t in tensors {
            let len = t.byte_len();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut bytes =
            serde_json::to_vec(&Value::Object(header)).map_err(std::io::Error::other)?;
        while bytes.len() % 8 != 0 {
            bytes.push(b' ');
        }
        let mut out = BufWriter::with_capacity(1 << 22, File::create(path)?);
        out.write_all(&(bytes.len() as u64).to_le_bytes())?;
        out.write_all(&bytes)?;
        Ok(StreamWriter {
            path: path.to_path_buf(),
            out,
            remaining: tensors
                .iter()
                .map(|t| (t.name.clone(), t.byte_len()))
                .collect(),
            current: 0,
        })
    }

    /// Appends the next bytes of the current tensor (a tensor may arrive in several pieces).
    pub fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let Some((name, left)) = self.remaining.get_mut(self.current) else {
                return Err(std::io::Error::other(format!(
                    "{}: more data than the declared tensors hold",
                    self.path.display()
                )));
            };
            let take = (*left).min(bytes.len());
            self.out.write_all(&bytes[..take])?;
            *left -= take;
            bytes = &bytes[take..];
            if *left == 0 {
                tracing::trace!(tensor = %name, "written");
                self.current += 1;
            }
        }
        Ok(())
    }

    /// Flushes and syncs; fails if a declared tensor did not receive all its bytes.
    pub fn finish(mut self) -> std::io::Result<()> {
        while self.current < self.remaining.len() && self.remaining[self.current].1 == 0 {
            self.current += 1;
        }
        if let Some((name, left)) = self.remaining.get(self.current) {
            return Err(std::io::Error::other(format!(
                "{}: tensor '{name}' is missing {left} bytes",
                self.path.display()
            )));
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// Splits tensors (by byte size, in order) into shards of at most `limit` bytes; a tensor
/// larger than `limit` gets a shard of its own. Returns index ranges into the input.
pub fn group_into_shards(sizes: &[u64], limit: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut current) = (0usize, 0u64);
    for (i, &bytes) in sizes.iter().enumerate() {
        if current > 0 && current + bytes > limit {
            out.push(start..i);
            start = i;
            current = 0;
        }
        current += bytes;
    }
    out.push(start..sizes.len());
    out
}

/// `model.safetensors` for a single shard, `model-0000k-of-0000n.safetensors` otherwise.
pub fn shard_name(k: usize, n: usize) -> String {
    if n == 1 {
        super::SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// `model.safetensors.index.json` as transformers writes it.
pub fn write_index(
    dir: &Path,
    total_size: u64,
    weight_map: &Map<String, Value>,
) -> std::io::Result<()> {
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(super::INDEX_FILE), text + "\n")
}

/// Files of a model directory besides its weights and config.json that a written checkpoint
/// carries over unchanged.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

/// An I/O error at `path`.
pub fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelFilesError + '_ {
    move |source| ModelFilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The safetensors name of a dtype moeq writes.
pub fn st_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::U8 => "U8",
        _ => "BF16",
    }
}

/// A tensor's little-endian bytes (f32, f16, u8, else bf16).
pub fn dense_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>, ModelFilesError> {
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

/// Writes the directory `out` through `fill`, which gets a temporary directory beside it; the
/// temporary one becomes `out` only when `fill` succeeds, and is removed when it fails.
pub fn written_atomically(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), ModelFilesError>,
) -> Result<(), ModelFilesError> {
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
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io(out))
}

/// `config` as `dir/config.json`, and the side files (tokenizer, generation config) of `src`.
pub fn write_side_files(src: &ModelDir, dir: &Path, config: &Value) -> Result<(), ModelFilesError> {
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).map_err(|e| ModelFilesError::Format {
        path: cfg_path.display().to_string(),
        problem: e.to_string(),
    })?;
    std::fs::write(&cfg_path, text + "\n").map_err(io(&cfg_path))?;
    for f in SIDE_FILES {
        let from = src.root.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f)).map_err(io(&from))?;
        }
    }
    Ok(())
}
