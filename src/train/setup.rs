//! From a validated config to the pieces a run needs: the compute device and dtype, the
//! quantization settings, the frozen base on the device, and LoRA settings.

use crate::checkpoint::frozen::{self, CpuQuantizer, FrozenBase};
use crate::checkpoint::ModelDir;
use crate::config::{Bf16Mode, QuantType, TargetModules, TrainConfig};
use crate::lora::LoraSettings;
use crate::quant::{QuantKind, QuantSettings};
use candle_core::{DType, Device};

/// The device a config asks for. `auto` is the first GPU in a CUDA build that sees one.
pub fn device(choice: &crate::config::Device) -> Result<Device, String> {
    device_for_rank(choice, 0)
}

/// The device of the rank with `local_rank` on its node: `cuda`/`auto` without an ordinal
/// take GPU `local_rank` of those visible (GPU 0 when each rank sees only its own, as under
/// `srun --gpus-per-task=1`).
pub fn device_for_rank(
    choice: &crate::config::Device,
    local_rank: usize,
) -> Result<Device, String> {
    use crate::config::Device as D;
    let ordinal =
        |given: Option<usize>| given.unwrap_or_else(|| local_rank % visible_gpus().max(1));
    match choice {
        D::Cpu => Ok(Device::Cpu),
        D::Cuda(given) => {
            if !cfg!(feature = "cuda") {
                return Err("device: cuda needs a moeq built with --features cuda (this build is CPU-only); set `device: cpu`".into());
            }
            let o = ordinal(*given);
            cuda_device(o).map_err(|e| format!("device: cuda:{o}: {e}"))
        }
        D::Auto => {
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

pub fn quant_settings(c: &TrainConfig) -> QuantSettings {
    QuantSettings {
        kind: match c.bnb_4bit_quant_type {
            QuantType::Nf4 => QuantKind::Nf4,
            QuantType::Fp4 => QuantKind::Fp4,
        },
        blocksize: c.quant_blocksize,
        double_quant: c.bnb_4bit_use_double_quant,
    }
}

pub fn lora_settings(c: &TrainConfig) -> LoraSettings {
    let target_modules = match (&c.lora_target_modules, c.lora_target_linear) {
        (TargetModules::AllLinear, _) | (_, true) => vec!["all-linear".to_string()],
        (TargetModules::Named(m), false) => m.clone(),
    };
    LoraSettings {
        r: c.lora_r,
        alpha: c.lora_alpha,
        dropout: c.lora_dropout,
        use_rslora: c.peft_use_rslora,
        target_modules,
        target_parameters: c.lora_target_parameters.clone(),
    }
}

/// All-gathers quantization statistics over the ranks' collectives.
pub struct CommGather<'a>(pub &'a dyn crate::dist::Communicator);

impl frozen::StatsGather for CommGather<'_> {
    fn gather(&mut self, name: &str, local: Vec<f32>) -> Result<Vec<f32>, String> {
        let n = local.len();
        let t = candle_core::Tensor::from_vec(local, n, &Device::Cpu).map_err(|e| e.to_string())?;
        let parts = self.0.all_gather(&t).map_err(|e| format!("{name}: {e}"))?;
        let mut all = Vec::new();
        for p in parts {
            all.extend(p.to_vec1::<f32>().map_err(|e| e.to_string())?);
        }
        Ok(all)
    }
}

/// Loads and quantizes the frozen base, on the GPU when the model runs there. `experts`
/// limits expert parameters to the owned experts; `gather` all-gathers their statistics.
pub fn load_base(
    dir: &ModelDir,
    settings: QuantSettings,
    device: &Device,
    experts: Option<std::ops::Range<usize>>,
    gather: &mut dyn frozen::StatsGather,
) -> Result<FrozenBase, String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let mut q = frozen::CudaQuantizer::resident(device)?;
            frozen::load(dir, settings, experts, &mut q, gather).map_err(|e| e.to_string())
        }
        _ => frozen::load(dir, settings, experts, &mut CpuQuantizer, gather)
            .map_err(|e| e.to_string()),
    }
}
