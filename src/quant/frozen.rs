//! The frozen base as the model receives it: each parameter either quantized (bitsandbytes
//! 4-bit, for this process's experts) or dense (a 16-bit base, `load_in_4bit: false`, keeps
//! every weight dense). Loading it is `model_files::frozen` (4-bit) or `model_files::dense`
//! (16-bit); the model is built from it (`arch::Model::new`).

use super::{QuantSettings, QuantizedParam};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::ops::Range;

pub enum Frozen {
    /// Packed codes of the whole parameter, or for an expert parameter of the owned experts
    /// only (`experts`); statistics always cover the whole parameter.
    Quantized {
        param: QuantizedParam,
        experts: Option<Range<usize>>,
        /// The packed codes on the GPU when the quantizer kept them there for training
        /// (`SliceQuantizer::take_device_codes`); `param.packed` is then empty.
        codes: Option<Tensor>,
    },
    /// Kept in the checkpoint's dtype on the CPU (4-bit base), or in the compute dtype on the
    /// training device (16-bit base).
    Dense(Tensor),
    /// An expert parameter of a 16-bit base: `[held, out, in]`, the owned experts only.
    DenseExperts { weights: Tensor, held: Range<usize> },
}

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Bytes of unquantized weights read from the checkpoint.
    pub bytes_read: u64,
    /// Bytes of 4-bit codes and statistics produced or read.
    pub quantized_bytes: u64,
    pub dense_bytes: u64,
    pub seconds: f64,
    /// Peak device memory used by quantization, when it ran on a GPU.
    pub peak_device_bytes: Option<u64>,
    /// NaN and ±Inf values per tensor, as read from the checkpoint (a pre-quantized one: in its
    /// statistics); tensors without any are absent. bitsandbytes quantizes them silently.
    pub nonfinite: BTreeMap<String, usize>,
}

pub struct FrozenBase {
    /// By transformers v5 runtime name, in name order.
    pub tensors: BTreeMap<String, Frozen>,
    /// The 4-bit settings; None for a 16-bit base.
    pub settings: Option<QuantSettings>,
    pub report: LoadReport,
}
