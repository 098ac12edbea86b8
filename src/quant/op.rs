//! Quantization as tensor operations that dispatch on the device: `quantize` (CPU reference
//! or CUDA kernel) and `dequantize`, a candle `CustomOp2` over (packed codes u8 [ceil(n/2)],
//! absmax f32 [nblocks]) with the CPU reference as `cpu_fwd` and `kernels/nf4.cu` as
//! `cuda_fwd`. Frozen weights get no gradient, so there is no backward.

use super::{dequantize_4bit, quantize_4bit, QuantKind, QuantSettings};
use crate::ops::contiguous_slice;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Packed codes and f32 absmax of `x` (any shape, f32/bf16/f16) on `x`'s device.
pub fn quantize(x: &Tensor, settings: &QuantSettings) -> Result<(Tensor, Tensor)> {
    settings
        .validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    match x.device() {
        Device::Cpu => {
            let flat = x.flatten_all()?;
            let (packed, absmax) = match x.dtype() {
                DType::BF16 => {
                    quantize_4bit(&flat.to_vec1::<bf16>()?, settings.blocksize, settings.kind)
                }
                DType::F16 => {
                    quantize_4bit(&flat.to_vec1::<f16>()?, settings.blocksize, settings.kind)
                }
                DType::F32 => {
                    quantize_4bit(&flat.to_vec1::<f32>()?, settings.blocksize, settings.kind)
                }
                other => bail!("quantize: unsupported dtype {other:?}"),
            };
            let (np, na) = (packed.len(), absmax.len());
            Ok((
                Tensor::from_vec(packed, np, &Device::Cpu)?,
                Tensor::from_vec(absmax, na, &Device::Cpu)?,
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::quantize_on_gpu(x, settings),
        _ => bail!("quantize: unsupported device"),
    }
}

struct Dequantize {
    shape: Vec<usize>,
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
}

impl CustomOp2 for Dequantize {
    fn name(&self) -> &'static str {
        "dequantize_4bit"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(packed), CpuStorage::F32(absmax)) = (s1, s2) else {
            bail!("dequantize: packed must be u8 and absmax f32")
        };
        let n: usize = self.shape.iter().product();
        let v = dequantize_4bit(
            contiguous_slice(packed, l1, "dequantize")?,
            contiguous_slice(absmax, l2, "dequantize")?,
            n,
            self.blocksize,
            self.kind,
        );
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
            other => bail!("dequantize: output dtype {other:?} not supported"),
        };
        Ok((out, Shape::from(self.shape.clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::dequantize_storage(
            s1,
            l1,
            s2,
            l2,
            &self.shape,
            self.kind,
            self.blocksize,
            self.dtype,
        )?;
        Ok((out, Shape::from(self.shape.clone())))
    }
}

/// Dequantizes to `shape` in `dtype` on the inputs' device.
pub fn dequantize(
    packed: &Tensor,
    absmax: &Tensor,
    shape: &[usize],
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
) -> Result<Tensor> {
    packed.contiguous()?.apply_op2_no_bwd(
        &absmax.contiguous()?,
        &Dequantize {
            shape: shape.to_vec(),
            kind,
            blocksize,
            dtype,
        },
    )
}
