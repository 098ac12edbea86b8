//! 4-bit quantization of frozen weights, bit-exact with bitsandbytes (NF4 and FP4, blocksizes
//! 32…4096, optional double quantization of the block scales). The format is the folder:
//! `codebook` (code books and scalar quantizers), `rcp` (the GPU reciprocal), `blockwise`
//! (4-bit codes and absmax), `nested` (double quantization), `sharded` (world-size independent
//! statistics for expert parallelism). Nothing here knows about models.

pub mod blockwise;
pub mod codebook;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod frozen;
pub mod nested;
pub mod op;
pub mod rcp;
pub mod sharded;

pub use blockwise::{dequantize_4bit, quantize_4bit, QuantInput};
pub use nested::{NestedAbsmax, NESTED_BLOCKSIZE};

/// The blocksizes bitsandbytes quantizes with.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// `BLOCKSIZES` as a list for messages: "32, 64, …, 4096".
pub fn blocksize_list() -> String {
    BLOCKSIZES.map(|b| b.to_string()).join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    Nf4,
    Fp4,
}

impl QuantKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [QuantKind; 2] = [QuantKind::Nf4, QuantKind::Fp4];

    /// bitsandbytes' name (`quant_type`, `bnb_4bit_quant_type`).
    pub const fn as_str(self) -> &'static str {
        match self {
            QuantKind::Nf4 => "nf4",
            QuantKind::Fp4 => "fp4",
        }
    }

    /// The kind bitsandbytes names `s`, if any.
    pub fn parse(s: &str) -> Option<QuantKind> {
        QuantKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The 16-entry code book bitsandbytes stores as `quant_map` (`get_4bit_type`). Its FP4
    /// entry 8 is +0.0, while the dequantize kernel computes −0.0 for that code.
    pub fn code(self) -> [f32; 16] {
        std::array::from_fn(|i| match self {
            QuantKind::Nf4 => codebook::nf4_value(i as u8),
            QuantKind::Fp4 => codebook::fp4_value(i as u8) + 0.0,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSettings {
    pub kind: QuantKind,
    pub blocksize: usize,
    /// bitsandbytes `compress_statistics` / `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
}

impl Default for QuantSettings {
    /// NF4, blocksize 64, double quantization: the QLoRA paper's recommendation.
    fn default() -> Self {
        QuantSettings {
            kind: QuantKind::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("quantization blocksize {0} is not supported (use one of {list})", list = blocksize_list())]
    Blocksize(usize),
    #[error("{name}: {problem}")]
    Layout { name: String, problem: String },
}

impl QuantSettings {
    pub fn validate(&self) -> Result<(), QuantError> {
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(QuantError::Blocksize(self.blocksize));
        }
        Ok(())
    }
}

/// The block scales of a quantized parameter, as bitsandbytes stores them.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

impl Absmax {
    /// The f32 scales dequantization multiplies by.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested(n) => nested::dequantize_absmax(n),
        }
    }
}

/// One bitsandbytes 4-bit parameter: packed codes of the row-major flattened tensor plus
/// its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedParam {
    pub shape: Vec<usize>,
    pub settings: QuantSettings,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl QuantizedParam {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Quantizes a whole tensor on one process.
    pub fn quantize<T: QuantInput>(
        x: &[T],
        shape: &[usize],
        settings: QuantSettings,
    ) -> Result<QuantizedParam, QuantError> {
        settings.validate()?;
        let (packed, raw) = quantize_4bit(x, settings.blocksize, settings.kind);
        let absmax = if settings.double_quant {
            Absmax::Nested(nested::quantize_absmax(&raw))
        } else {
            Absmax::Plain(raw)
        };
        Ok(QuantizedParam {
            shape: shape.to_vec(),
            settings,
            packed,
            absmax,
        })
    }

    /// Dequantized values in f32 (round to the storage dtype with RNE if needed).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_4bit(
            &self.packed,
            &self.absmax.values(),
            self.numel(),
            self.settings.blocksize,
            self.settings.kind,
        )
    }
}
