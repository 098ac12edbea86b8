//! The compute device a config or flag asks for, GPU discovery, and the compute dtype.

use crate::config::{Bf16Mode, DeviceChoice};
use candle_core::{DType, Device};

/// The device a config asks for. `auto` is the first GPU in a CUDA build that sees one.
pub fn device(choice: &DeviceChoice) -> Result<Device, String> {
    device_for_rank(choice, 0)
}

/// The device of the rank with `local_rank` on its node: `cuda`/`auto` without an ordinal
/// take GPU `local_rank` of those visible (GPU 0 when each rank sees only its own, as under
/// `srun --gpus-per-task=1`).
pub fn device_for_rank(choice: &DeviceChoice, local_rank: usize) -> Result<Device, String> {
    let ordinal =
        |given: Option<usize>| given.unwrap_or_else(|| local_rank % visible_gpus().max(1));
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(given) => {
            if !cfg!(feature = "cuda") {
                return Err("device: cuda needs a moeq built with --features cuda (this build is CPU-only); set `device: cpu`".into());
            }
            let o = ordinal(*given);
            cuda_device(o).map_err(|e| format!("device: cuda:{o}: {e}"))
        }
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") && visible_gpus() > 0 {
                if let Ok(d) = cuda_device(ordinal(None)) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// GPU `ordinal` with its allocator keeping freed memory (`util::mem::keep_freed_gpu_memory`).
pub fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    let d = Device::new_cuda(ordinal)?;
    crate::util::mem::keep_freed_gpu_memory(&d)?;
    Ok(d)
}

/// GPUs this process sees (0 in a CPU build).
pub fn visible_gpus() -> usize {
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// bf16 on a GPU unless disabled; f32 on the CPU (candle's CPU bf16 is slow).
pub fn compute_dtype(mode: Bf16Mode, device: &Device) -> DType {
    match (device, mode) {
        (Device::Cpu, _) | (_, Bf16Mode::Disabled) => DType::F32,
        _ => DType::BF16,
    }
}
