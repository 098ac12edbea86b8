//! Linear layer over a frozen 4-bit weight, bitsandbytes `MatMul4Bit` semantics:
//! x: [.., in] → y = x · dequant(W)ᵀ : [.., out]; backward: dL/dx = dL/dy · dequant(W),
//! dequantized again (nothing kept between forward and backward), and no gradient for W.
//! The dequantized weight exists only inside each call, so the autograd graph holds the
//! 4-bit codes, never a bf16/f32 copy of the weight (docs/ARCHITECTURE.md, decision 2).
//! A 16-bit base (`load_in_4bit: false`) holds its weights as they are (`FrozenWeight::Dense`)
//! and the same op multiplies by them directly.

use crate::quant::{op::dequantize, Absmax, QuantKind, QuantizedParam};
use candle_core::{bail, CustomOp1, DType, Device, Result, Tensor};
use std::ops::Range;

/// Block scales of a 4-bit weight on a device. bitsandbytes' nested statistics stay nested (a
/// u8 per block instead of an f32: a quarter of the memory; 1.36 GB less for Qwen3-30B-A3B's
/// experts) and are expanded a range at a time when a chunk is dequantized.
#[derive(Clone)]
pub enum Scales {
    /// f32 per block.
    Plain(Tensor),
    /// u8 code per block (`codes[0]` is block `start` of the parameter), the parameter's whole
    /// f32 nested array (one per 256 blocks) and its offset.
    Nested {
        codes: Tensor,
        nested: Tensor,
        offset: f32,
        start: usize,
    },
}

impl Scales {
    /// Blocks `blocks` of a parameter's statistics, on `device`. On the CPU nested statistics
    /// are expanded once here (host memory is not the constraint, and every dequantization
    /// would otherwise expand them again).
    pub fn from_absmax(absmax: &Absmax, blocks: Range<usize>, device: &Device) -> Result<Scales> {
        if let (Absmax::Nested(n), Device::Cpu) = (absmax, device) {
            let v = crate::quant::nested::dequantize_absmax_range(
                &n.codes[blocks.clone()],
                &n.nested_absmax,
                n.offset,
                blocks.start,
            );
            return Ok(Scales::Plain(Tensor::from_vec(v, blocks.len(), device)?));
        }
        Self::kept(absmax, blocks, device)
    }

    /// `from_absmax` keeping nested statistics nested on any device (tests).
    pub fn kept(absmax: &Absmax, blocks: Range<usize>, device: &Device) -> Result<Scales> {
        Ok(match absmax {
            Absmax::Plain(v) => Scales::Plain(Tensor::from_slice(
                &v[blocks.clone()],
                blocks.len(),
                device,
            )?),
            Absmax::Nested(n) => Scales::Nested {
                codes: Tensor::from_slice(&n.codes[blocks.clone()], blocks.len(), device)?,
                nested: Tensor::from_slice(&n.nested_absmax, n.nested_absmax.len(), device)?,
                offset: n.offset,
                start: blocks.start,
            },
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Scales::Plain(t) => t.elem_count(),
            Scales::Nested { codes, .. } => codes.elem_count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks `[from, from + len)`.
    pub fn narrow(&self, from: usize, len: usize) -> Result<Scales> {
        Ok(match self {
            Scales::Plain(t) => Scales::Plain(t.narrow(0, from, len)?),
            Scales::Nested {
                codes,
                nested,
                offset,
                start,
            } => Scales::Nested {
                codes: codes.narrow(0, from, len)?,
                nested: nested.clone(),
                offset: *offset,
                start: start + from,
            },
        })
    }

    /// The f32 scale of every block (nested statistics expanded, bit-exact with
    /// `quant::nested::dequantize_absmax`).
    pub fn values(&self) -> Result<Tensor> {
        match self {
            Scales::Plain(t) => Ok(t.clone()),
            #[cfg(feature = "cuda")]
            Scales::Nested {
                codes,
                nested,
                offset,
                start,
            } if codes.device().is_cuda() => {
                crate::quant::cuda::dequantize_absmax_on_gpu(codes, nested, *offset, *start)
            }
            Scales::Nested {
                codes,
                nested,
                offset,
                start,
            } => {
                let v = crate::quant::nested::dequantize_absmax_range(
                    &codes.to_vec1::<u8>()?,
                    &nested.to_vec1::<f32>()?,
                    *offset,
                    *start,
                );
                Tensor::from_vec(v, codes.elem_count(), codes.device())
            }
        }
    }

    /// `packed` codes with these scales dequantized to `shape` in `dtype`: [`Self::values`] then
    /// the dequantization; on CUDA with nested statistics one kernel that expands the scales
    /// as it goes (the same values; `MOEQ_NESTED_DEQUANT=off` for the two kernels —
    /// launch/bench/NOTES.md items 49 and 53).
    pub fn dequantize(
        &self,
        packed: &Tensor,
        shape: &[usize],
        kind: QuantKind,
        blocksize: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Scales::Nested {
            codes,
            nested,
            offset,
            start,
        } = self
        {
            if packed.device().is_cuda() && fused_nested() {
                return crate::quant::cuda::dequantize_nested_on_gpu(
                    packed, codes, nested, *offset, *start, shape, kind, blocksize, dtype,
                );
            }
        }
        dequantize(packed, &self.values()?, shape, kind, blocksize, dtype)
    }

    /// These scales as `dequantize_rows_into` takes them under the nested-dequantization
    /// switch: as they are, or, with `MOEQ_NESTED_DEQUANT=off`, nested statistics expanded
    /// first (the two kernels, as [`Self::dequantize`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn for_rows(&self) -> Result<Scales> {
        match self {
            Scales::Nested { .. } if !fused_nested() => Ok(Scales::Plain(self.values()?)),
            _ => Ok(self.clone()),
        }
    }

    /// These scales for `quant::cuda::dequantize_rows_into`.
    #[cfg(feature = "cuda")]
    pub(crate) fn row_scales(&self) -> crate::quant::cuda::RowScales<'_> {
        match self {
            Scales::Plain(t) => crate::quant::cuda::RowScales::Plain(t),
            Scales::Nested {
                codes,
                nested,
                offset,
                start,
            } => crate::quant::cuda::RowScales::Nested {
                codes,
                nested,
                offset: *offset,
                start: *start,
            },
        }
    }

    /// The tensors held (tests check that none of them gets a gradient).
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Scales::Plain(t) => vec![t],
            Scales::Nested { codes, nested, .. } => vec![codes, nested],
        }
    }
}

/// Whether nested statistics are expanded inside the dequantization's kernel (on unless
/// `MOEQ_NESTED_DEQUANT=off` or `0`: +1.7–9.8% tokens/s at micro-batch 8–1, 2026-12-05).
#[cfg(feature = "cuda")]
fn fused_nested() -> bool {
    static FUSED: crate::util::switch::EnvSwitch = crate::util::switch::EnvSwitch::new(
        "MOEQ_NESTED_DEQUANT",
        true,
        crate::util::switch::Values {
            on: &["fused", "1", "on"],
            off: &["off", "0"],
        },
    );
    FUSED.get()
}

/// A frozen 4-bit weight `[out, in]` on a device: packed codes and block scales.
#[derive(Clone)]
pub struct Nf4Weight {
    pub packed: Tensor,
    pub absmax: Scales,
    pub out_features: usize,
    pub in_features: usize,
    pub kind: QuantKind,
    pub blocksize: usize,
}

impl Nf4Weight {
    pub fn from_param(q: &QuantizedParam, device: &Device) -> Result<Nf4Weight> {
        Self::from_param_codes(q, None, device)
    }

    /// Like `from_param`, with the packed codes already on a device (`codes`, then
    /// `q.packed` is not used).
    pub fn from_param_codes(
        q: &QuantizedParam,
        codes: Option<&Tensor>,
        device: &Device,
    ) -> Result<Nf4Weight> {
        let [out_features, in_features] = q.shape[..] else {
            bail!("Nf4Weight: expected a 2-D weight, got shape {:?}", q.shape)
        };
        let packed = match codes {
            Some(c) if c.elem_count() == out_features * in_features / 2 => c.to_device(device)?,
            Some(c) => bail!(
                "Nf4Weight: {} codes for a [{out_features}, {in_features}] weight",
                c.elem_count()
            ),
            None => Tensor::from_slice(&q.packed, q.packed.len(), device)?,
        };
        let blocks = match &q.absmax {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested(n) => n.codes.len(),
        };
        Ok(Nf4Weight {
            packed,
            absmax: Scales::from_absmax(&q.absmax, 0..blocks, device)?,
            out_features,
            in_features,
            kind: q.settings.kind,
            blocksize: q.settings.blocksize,
        })
    }

    /// The weight `[out, in]` in `dtype`, freshly dequantized.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.absmax.dequantize(
            &self.packed,
            &[self.out_features, self.in_features],
            self.kind,
            self.blocksize,
            dtype,
        )
    }
}

/// A frozen weight `[out, in]` as a projection holds it.
#[derive(Clone)]
pub enum FrozenWeight {
    /// 4-bit (`load_in_4bit: true`).
    Nf4(Nf4Weight),
    /// Unquantized, in the compute dtype (a 16-bit base).
    Dense(Tensor),
}

impl From<Nf4Weight> for FrozenWeight {
    fn from(w: Nf4Weight) -> FrozenWeight {
        FrozenWeight::Nf4(w)
    }
}

impl FrozenWeight {
    pub fn out_features(&self) -> usize {
        match self {
            FrozenWeight::Nf4(w) => w.out_features,
            FrozenWeight::Dense(t) => t.dims()[0],
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            FrozenWeight::Nf4(w) => w.in_features,
            FrozenWeight::Dense(t) => t.dims()[1],
        }
    }

    /// The weight `[out, in]` in `dtype`: dequantized, or as held (cast if it differs).
    pub fn values(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Nf4(w) => w.dequantize(dtype),
            FrozenWeight::Dense(t) => t.to_dtype(dtype),
        }
    }
}

impl FrozenWeight {
    /// The weight in `dtype` with `tail` `[out, c]` beside its rows: `[out, in + c]` — a
    /// factor inside the product's K (`ops::lora_joint`). On CUDA a 4-bit weight's rows are
    /// dequantized in place (the values of [`FrozenWeight::values`]; the kernel the expert
    /// adapters' `ExpertWeights::dequantize_with` uses) and the tail copied in; otherwise a
    /// concatenation.
    pub(crate) fn values_wide(&self, dtype: DType, tail: &Tensor) -> Result<Tensor> {
        let tail = tail.to_dtype(dtype)?.contiguous()?;
        let (out, inp) = (self.out_features(), self.in_features());
        if tail.dim(0)? != out {
            bail!(
                "values_wide: tail {:?} for a [{out}, {inp}] weight",
                tail.dims()
            );
        }
        #[cfg(feature = "cuda")]
        if let (FrozenWeight::Nf4(w), Device::Cuda(_)) = (self, tail.device()) {
            let (n, ld) = (out * inp, inp + tail.dim(1)?);
            if crate::quant::cuda::rows_into_applies(&w.packed, n, inp) && ld % 8 == 0 {
                let scales = w.absmax.for_rows()?;
                let wide =
                    super::grouped_gemm::output_for_products(out * ld, dtype, tail.device())?
                        .reshape((out, ld))?;
                crate::quant::cuda::dequantize_rows_into(
                    &w.packed,
                    scales.row_scales(),
                    &wide,
                    n,
                    (inp, ld),
                    w.kind,
                    w.blocksize,
                )?;
                wide.slice_set(&tail, 1, inp)?;
                return Ok(wide);
            }
        }
        Tensor::cat(&[&self.values(dtype)?, &tail], 1)
    }
}

struct Nf4Linear(FrozenWeight);

/// x [.., in] (contiguous) · Wᵀ with W in x's dtype.
pub(crate) fn forward(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let wt = w.values(x.dtype())?.t()?;
    x.broadcast_matmul(&wt)
}

impl Nf4Linear {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        forward(x, &self.0)
    }
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4_linear"
    }

    super::tensor_forward!(1, "nf4_linear", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: nf4_linear", x.device());
        let w = self.0.values(grad.dtype())?;
        Ok(Some(grad.broadcast_matmul(&w)?.to_dtype(x.dtype())?))
    }
}

/// `x · dequant(W)ᵀ` with a gradient for `x` only.
pub fn nf4_linear(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    if x.dim(candle_core::D::Minus1)? != w.in_features() {
        bail!(
            "nf4_linear: input has {} features, weight expects {}",
            x.dim(candle_core::D::Minus1)?,
            w.in_features()
        );
    }
    let x = super::at_offset_zero(x)?;
    let op = Nf4Linear(w.clone());
    if super::records_graph(&[&x]) {
        x.apply_op1(op)
    } else {
        super::direct(op.fwd(&x)?)
    }
}
