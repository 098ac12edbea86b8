//! Streams a synthetic checkpoint to disk. Safetensors headers are computed up front from the
//! shapes, then values are generated chunk by chunk (one expert projection or one ordinary
//! tensor per chunk, a few chunks in parallel) and appended in order.

use super::{config_json, tokenizer, SynthError};
use crate::arch::{ArchSpec, Component, ModelType, ParamInfo};
use crate::model_files::writer::{
    group_into_shards, shard_name, write_index, StreamWriter, TensorDecl,
};
use crate::util::progress::Progress;
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskLayout {
    /// As on the Hugging Face hub: one tensor per expert and projection (Mixtral: w1/w3/w2).
    Hub,
    /// transformers v5 fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` under moeq's
    /// canonical names (`[E, in, out]` for the types whose releases store them so: gpt-oss,
    /// Llama 4).
    Fused,
    /// gpt-oss as released: the experts as MXFP4 blocks and scales (`model_files::mxfp4`),
    /// everything else as `Hub`.
    Mxfp4,
}

impl DiskLayout {
    pub fn parse(s: &str) -> Result<DiskLayout, String> {
        match s {
            "hub" => Ok(DiskLayout::Hub),
            "fused" => Ok(DiskLayout::Fused),
            "mxfp4" => Ok(DiskLayout::Mxfp4),
            _ => Err(format!(
                "layout must be 'hub', 'fused' or 'mxfp4', got '{s}'"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskLayout::Hub => "hub",
            DiskLayout::Fused => "fused",
            DiskLayout::Mxfp4 => "mxfp4",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub model_type: ModelType,
    pub preset: String,
    pub layers: Option<usize>,
    pub layout: DiskLayout,
    pub seed: u64,
    /// `bfloat16`, `float16` or `float32`.
    pub dtype: String,
    /// Only config.json and the tokenizer files (for `inspect` of huge shapes).
    pub config_only: bool,
    /// Upper bound of one shard file in bytes (a single larger tensor gets its own shard).
    pub shard_bytes: u64,
    /// Replace an existing, non-empty output directory.
    pub force: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            model_type: ModelType::Qwen3Moe,
            preset: "tiny".into(),
            layers: None,
            layout: DiskLayout::Hub,
            seed: 0,
            dtype: "bfloat16".into(),
            config_only: false,
            shard_bytes: 2_000_000_000,
            force: false,
        }
    }
}

#[derive(Debug)]
pub struct SynthReport {
    pub dir: PathBuf,
    pub tensors: usize,
    pub shards: usize,
    pub bytes: u64,
}

/// One run of values from one seeded stream.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    /// The stream key: the canonical name, and for experts `#<expert>#<gate|up|down>`.
    pub key: String,
    pub numel: usize,
    /// Norm weights are `1 + N(0, std)`, everything else `N(0, std)`.
    pub norm: bool,
    pub std: f32,
}

struct DiskTensor {
    name: String,
    shape: Vec<usize>,
    chunks: Vec<Chunk>,
    /// How each chunk's values (one expert's `[rows, cols]` where not `Plain`) are stored.
    encoding: Encoding,
}

/// How a chunk of canonical values is written.
#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    /// As they are, in the checkpoint's dtype.
    Plain,
    /// Transposed (`[cols, rows]`), in the checkpoint's dtype: gpt-oss's and Llama 4's experts.
    Transposed {
        rows: usize,
        cols: usize,
    },
    /// MXFP4 blocks or scales (u8) of the values.
    Mxfp4Blocks {
        rows: usize,
        cols: usize,
    },
    Mxfp4Scales {
        rows: usize,
        cols: usize,
    },
}

impl Encoding {
    fn is_u8(self) -> bool {
        matches!(
            self,
            Encoding::Mxfp4Blocks { .. } | Encoding::Mxfp4Scales { .. }
        )
    }
}

/// The chunks of canonical parameter `p` in its canonical layout: the whole tensor, or for an
/// expert parameter those of `experts`, expert by expert (gate rows before up rows).
pub(crate) fn chunks_of(spec: &ArchSpec, p: &ParamInfo, experts: Range<usize>) -> Vec<Chunk> {
    let std = spec.initializer_range as f32;
    if p.component != Component::Experts {
        // The output head gets std 1/√H (when larger than initializer_range), so logits of
        // unit-RMS hidden states have unit scale, as a trained model's do; with 0.02 a tiny
        // model's logits could barely move away from uniform, whatever the adapters learn.
        let head = p.component == Component::LmHead
            || (p.component == Component::Embedding && spec.tie_word_embeddings);
        let head_std = (1.0 / (spec.hidden_size as f64).sqrt()).max(spec.initializer_range) as f32;
        // Attention sinks (gpt-oss) at unit scale, so they take a visible share of each
        // softmax as a trained model's do.
        let std = match (head, p.name.ends_with(".sinks")) {
            (true, _) => head_std,
            (false, true) => 1.0,
            (false, false) => std,
        };
        return vec![Chunk {
            key: p.name.clone(),
            numel: p.numel(),
            norm: p.component == Component::Norm && spec.unit_norm(&p.name),
            std,
        }];
    }
    let (rows, cols) = (p.shape[1], p.shape[2]);
    // Experts stored `[E, in, out]` are drawn one chunk per expert, which transposes whole
    // (gpt-oss's gate and up rows interleave; Llama 4's gate rows come first, as elsewhere).
    let parts: &[&str] = match p.name.ends_with("gate_up_proj") {
        true if spec.model_type.experts_transposed() => &["gate_up"],
        true => &["gate", "up"],
        false => &["down"],
    };
    experts
        .flat_map(|e| {
            parts.iter().map(move |part| Chunk {
                key: format!("{}#{e}#{part}", p.name),
                numel: rows / parts.len() * cols,
                norm: false,
                std,
            })
        })
        .collect()
}

fn plan(spec: &ArchSpec, layout: DiskLayout) -> Vec<DiskTensor> {
    let mut out = Vec::new();
    let mixtral = spec.model_type.mixtral_hub_names();
    for p in spec.params() {
        if p.component != Component::Experts {
            let name = match layout {
                DiskLayout::Hub | DiskLayout::Mxfp4 if mixtral => {
                    p.name.replace(".mlp.", ".block_sparse_moe.")
                }
                DiskLayout::Hub | DiskLayout::Mxfp4 => {
                    spec.model_type.hub_name(&p.name).unwrap_or(p.name.clone())
                }
                DiskLayout::Fused => p.name.clone(),
            };
            out.push(DiskTensor {
                name,
                shape: p.shape.clone(),
                chunks: chunks_of(spec, &p, 0..0),
                encoding: Encoding::Plain,
            });
            continue;
        }
        if spec.model_type.experts_transposed() {
            out.extend(transposed_experts(spec, &p, layout));
            continue;
        }
        let (e_count, rows, cols) = (p.shape[0], p.shape[1], p.shape[2]);
        let gate_up = p.name.ends_with("gate_up_proj");
        let part_rows = if gate_up { rows / 2 } else { rows };
        // Granite's hub layout keeps each layer's experts fused, under its own names.
        let hub_fused = spec.model_type.hub_name(&p.name);
        match layout {
            DiskLayout::Fused => out.push(DiskTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                chunks: chunks_of(spec, &p, 0..e_count),
                encoding: Encoding::Plain,
            }),
            DiskLayout::Hub | DiskLayout::Mxfp4 if hub_fused.is_some() => out.push(DiskTensor {
                name: hub_fused.unwrap_or_default(),
                shape: p.shape.clone(),
                chunks: chunks_of(spec, &p, 0..e_count),
                encoding: Encoding::Plain,
            }),
            DiskLayout::Hub | DiskLayout::Mxfp4 => {
                let layer_prefix =
                    p.name
                        .trim_end_matches(if gate_up { "gate_up_proj" } else { "down_proj" });
                for (i, chunk) in chunks_of(spec, &p, 0..e_count).into_iter().enumerate() {
                    let e = if gate_up { i / 2 } else { i };
                    let part = chunk.key.rsplit('#').next().unwrap_or_default();
                    let name = if mixtral {
                        let w = match part {
                            "gate" => "w1",
                            "up" => "w3",
                            _ => "w2",
                        };
                        let base =
                            layer_prefix.replace(".mlp.experts.", ".block_sparse_moe.experts.");
                        format!("{base}{e}.{w}.weight")
                    } else {
                        format!("{layer_prefix}{e}.{part}_proj.weight")
                    };
                    out.push(DiskTensor {
                        name,
                        shape: vec![part_rows, cols],
                        chunks: vec![chunk],
                        encoding: Encoding::Plain,
                    });
                }
            }
        }
    }
    out
}

/// Expert parameter `p` (`[E, rows, cols]` canonical) as gpt-oss's and Llama 4's releases
/// store it: `[E, cols, rows]` (under the hub name in the hub layout: Llama 4's
/// `feed_forward.experts.*`), or gpt-oss's MXFP4 blocks `[E, rows, cols/32, 16]` and scales
/// `[E, rows, cols/32]`.
fn transposed_experts(spec: &ArchSpec, p: &ParamInfo, layout: DiskLayout) -> Vec<DiskTensor> {
    let (e, rows, cols) = (p.shape[0], p.shape[1], p.shape[2]);
    let chunks = chunks_of(spec, p, 0..e);
    match layout {
        DiskLayout::Mxfp4 => vec![
            DiskTensor {
                name: crate::model_files::mxfp4_blocks_name(&p.name),
                shape: vec![e, rows, cols / 32, 16],
                chunks: chunks.clone(),
                encoding: Encoding::Mxfp4Blocks { rows, cols },
            },
            DiskTensor {
                name: crate::model_files::mxfp4_scales_name(&p.name),
                shape: vec![e, rows, cols / 32],
                chunks,
                encoding: Encoding::Mxfp4Scales { rows, cols },
            },
        ],
        DiskLayout::Hub | DiskLayout::Fused => vec![DiskTensor {
            name: match layout {
                DiskLayout::Hub => spec.model_type.hub_name(&p.name).unwrap_or(p.name.clone()),
                _ => p.name.clone(),
            },
            shape: vec![e, cols, rows],
            chunks,
            encoding: Encoding::Transposed { rows, cols },
        }],
    }
}

/// The seed of chunk `key`'s stream.
pub(crate) fn stream_seed(seed: u64, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    h.finalize().into()
}

fn generate(seed: u64, chunk: &Chunk, dtype: &str, encoding: Encoding) -> Vec<u8> {
    let mut rng = ChaCha8Rng::from_seed(stream_seed(seed, &chunk.key));
    let base = if chunk.norm { 1.0 } else { 0.0 };
    let values = (0..chunk.numel).map(|_| {
        let z: f32 = StandardNormal.sample(&mut rng);
        base + chunk.std * z
    });
    let values: Vec<f32> = match encoding {
        Encoding::Plain => values.collect(),
        Encoding::Transposed { rows, cols } => {
            let v: Vec<f32> = values.collect();
            (0..cols)
                .flat_map(|c| (0..rows).map(move |r| (r, c)))
                .map(|(r, c)| v[r * cols + c])
                .collect()
        }
        Encoding::Mxfp4Blocks { rows, cols } | Encoding::Mxfp4Scales { rows, cols } => {
            let v: Vec<f32> = values.collect();
            let (blocks, scales) = crate::model_files::mxfp4_quantize(&v, rows, cols);
            return match encoding {
                Encoding::Mxfp4Blocks { .. } => blocks,
                _ => scales,
            };
        }
    };
    let values = values.into_iter();
    match dtype {
        "float32" => values.flat_map(f32::to_le_bytes).collect(),
        "float16" => values
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), SynthError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| SynthError::Usage(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

fn prepare_out(out: &Path, force: bool) -> Result<PathBuf, SynthError> {
    if out.exists() {
        let empty = out
            .read_dir()
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !force {
            return Err(SynthError::Usage(format!(
                "{}: already exists and is not empty (choose another --out or pass --force)",
                out.display()
            )));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "synth".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

pub fn write(opts: &SynthOptions, out: &Path) -> Result<SynthReport, SynthError> {
    let dtype = match opts.dtype.as_str() {
        "bfloat16" | "bf16" => "bfloat16",
        "float16" | "f16" => "float16",
        "float32" | "f32" => "float32",
        other => {
            return Err(SynthError::Usage(format!(
                "dtype must be bfloat16, float16 or float32, got '{other}'"
            )))
        }
    };
    let mut config = config_json(opts.model_type, &opts.preset, opts.layers, dtype)?;
    let spec = ArchSpec::from_json(&config, "config.json")?;
    if opts.layout == DiskLayout::Mxfp4 {
        if !opts.model_type.ships_mxfp4() {
            return Err(SynthError::Usage(format!(
                "--layout mxfp4 is gpt-oss's release format; {} checkpoints are 'hub' or 'fused'",
                opts.model_type.as_str()
            )));
        }
        // As the gpt-oss releases declare it: the experts are MXFP4, nothing else.
        config["quantization_config"] = serde_json::json!({
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"
            ],
        });
    }
    let tmp = prepare_out(out, opts.force)?;
    let result = write_into(opts, &tmp, &config, &spec, dtype);
    match result {
        Ok(mut report) => {
            // Without --force, an `out` that exists now was finished by a concurrent writer of
            // the same checkpoint (the synth:// cache, several ranks or tests): keep it, since
            // another process may already be reading it.
            if !opts.force && out.join("config.json").is_file() {
                let _ = std::fs::remove_dir_all(&tmp);
                report.dir = out.to_path_buf();
                return Ok(report);
            }
            if out.exists() {
                std::fs::remove_dir_all(out).map_err(io_err(out))?;
            }
            std::fs::rename(&tmp, out).map_err(io_err(out))?;
            report.dir = out.to_path_buf();
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_into(
    opts: &SynthOptions,
    dir: &Path,
    config: &Value,
    spec: &ArchSpec,
    dtype: &str,
) -> Result<SynthReport, SynthError> {
    write_json(&dir.join("config.json"), config)?;
    let tok = tokenizer::build(spec.max_position_embeddings);
    write_json(&dir.join("tokenizer.json"), &tok.json)?;
    write_json(&dir.join("tokenizer_config.json"), &tok.config)?;
    if opts.config_only {
        return Ok(SynthReport {
            dir: dir.to_path_buf(),
            tensors: 0,
            shards: 0,
            bytes: 0,
        });
    }
    let elem = if dtype == "float32" { 4 } else { 2 };
    let tensors = plan(spec, opts.layout);
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|t| {
            let elem = if t.encoding.is_u8() { 1 } else { elem };
            (t.shape.iter().product::<usize>() * elem) as u64
        })
        .collect();
    let total: u64 = sizes.iter().sum();
    let shards = group_into_shards(&sizes, opts.shard_bytes);
    let progress = Progress::new(total, "writing synthetic weights");
    let n = shards.len();
    let mut weight_map = Map::new();
    for (k, range) in shards.iter().enumerate() {
        let file = shard_name(k, n);
        let shard: Vec<&DiskTensor> = tensors[range.clone()].iter().collect();
        write_shard(&dir.join(&file), &shard, opts.seed, dtype, &progress)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
    }
    progress.finish();
    if n > 1 {
        write_index(dir, total, &weight_map).map_err(io_err(dir))?;
    }
    Ok(SynthReport {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        shards: n,
        bytes: total,
    })
}

fn write_shard(
    path: &Path,
    tensors: &[&DiskTensor],
    seed: u64,
    dtype: &str,
    progress: &Progress,
) -> Result<(), SynthError> {
    let st_dtype = match dtype {
        "float32" => "F32",
        "float16" => "F16",
        _ => "BF16",
    };
    let decls: Vec<TensorDecl> = tensors
        .iter()
        .map(|t| {
            let st = if t.encoding.is_u8() { "U8" } else { st_dtype };
            TensorDecl::new(t.name.clone(), st, t.shape.clone())
        })
        .collect();
    let mut w = StreamWriter::create(path, &decls).map_err(io_err(path))?;
    let chunks: Vec<(&Chunk, Encoding)> = tensors
        .iter()
        .flat_map(|t| t.chunks.iter().map(|c| (c, t.encoding)))
        .collect();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    for window in chunks.chunks(workers) {
        let generated: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = window
                .iter()
                .map(|&(c, enc)| s.spawn(move || generate(seed, c, dtype, enc)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for bytes in &generated {
            w.write(bytes).map_err(io_err(path))?;
            progress.inc(bytes.len() as u64);
        }
    }
    w.finish().map_err(io_err(path))
}
