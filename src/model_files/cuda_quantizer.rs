//! The GPU slice quantizer of the frozen-base loader (`frozen::load`): `kernels/nf4.cu` on the
//! uploaded slice; for training the codes stay on the training device.

use super::frozen::SliceQuantizer;
use crate::quant::sharded::SliceQuant;
use crate::quant::QuantSettings;
use crate::util::phases::timed;
use candle_core::Tensor;

/// Quantizes slices on a GPU: upload, `kernels/nf4.cu`, then the codes are downloaded, or with
/// `resident` kept on the GPU for training (`take_device_codes`). Tracks the peak device
/// memory in use (driver view, relative to when it was created), sampled once per parameter
/// (the driver query costs more than a slice).
pub struct CudaQuantizer {
    device: candle_core::Device,
    baseline: u64,
    peak: u64,
    resident: bool,
    /// Codes of the slices quantized since the last `take_device_codes` (resident only).
    pending: Vec<Tensor>,
}

impl CudaQuantizer {
    /// Codes are downloaded to the host (`moeq quantize` writes them out).
    pub fn new(ordinal: usize) -> Result<CudaQuantizer, String> {
        let device = candle_core::Device::new_cuda(ordinal).map_err(|e| e.to_string())?;
        let baseline = Self::used()?;
        Ok(CudaQuantizer {
            device,
            baseline,
            peak: 0,
            resident: false,
            pending: Vec::new(),
        })
    }

    /// Codes and drawn dense tensors stay on `device`, the training device (the same candle
    /// device: another handle to the GPU would make the model copy them).
    pub fn resident(device: &candle_core::Device) -> Result<CudaQuantizer, String> {
        if !device.is_cuda() {
            return Err(format!("CudaQuantizer: {device:?} is not a CUDA device"));
        }
        Ok(CudaQuantizer {
            device: device.clone(),
            baseline: Self::used()?,
            peak: 0,
            resident: true,
            pending: Vec::new(),
        })
    }

    fn used() -> Result<u64, String> {
        let (free, total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map_err(|e| e.to_string())?;
        Ok((total - free) as u64)
    }
}

impl SliceQuantizer for CudaQuantizer {
    fn quantize(
        &mut self,
        name: &str,
        x: &Tensor,
        start: usize,
        _total: usize,
        settings: &QuantSettings,
    ) -> Result<SliceQuant, String> {
        if start % settings.blocksize != 0 {
            return Err(format!(
                "{name}: slice at {start} is not on a block boundary"
            ));
        }
        let mut run = || -> candle_core::Result<SliceQuant> {
            let d = &self.device;
            let dev = timed("load: upload", d, || x.flatten_all()?.to_device(d))?;
            let (packed, absmax) = timed("load: quantize", d, || {
                crate::quant::cuda::quantize_on_gpu(&dev, settings)
            })?;
            let (packed, absmax) = timed("load: download", d, || -> candle_core::Result<_> {
                let absmax = absmax.to_vec1()?;
                if self.resident {
                    self.pending.push(packed);
                    return Ok((Vec::new(), absmax));
                }
                Ok((packed.to_vec1()?, absmax))
            })?;
            Ok(SliceQuant {
                elements: start..start + x.elem_count(),
                packed,
                absmax,
            })
        };
        run().map_err(|e| format!("{name}: {e}"))
    }

    fn peak_device_bytes(&self) -> Option<u64> {
        Some(self.peak)
    }

    fn device(&self) -> candle_core::Device {
        self.device.clone()
    }

    fn keeps_on_device(&self) -> bool {
        self.resident
    }

    fn take_device_codes(&mut self) -> Result<Option<Tensor>, String> {
        let codes = match self.pending.len() {
            0 => None,
            1 => self.pending.pop(),
            _ => {
                let all = Tensor::cat(&self.pending, 0).map_err(|e| e.to_string())?;
                self.pending.clear();
                Some(all)
            }
        };
        self.device.synchronize().map_err(|e| e.to_string())?;
        self.peak = self.peak.max(Self::used()?.saturating_sub(self.baseline));
        Ok(codes)
    }
}
