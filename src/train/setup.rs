//! From a validated config to the pieces a run needs: the compute device and dtype, the
//! quantization settings, the frozen base on the device, and LoRA settings.

use crate::checkpoint::frozen::{self, CpuQuantizer, FrozenBase, SingleProcess};
use crate::checkpoint::ModelDir;
use crate::config::{Bf16Mode, QuantType, TargetModules, TrainConfig};
use crate::lora::LoraSettings;
use crate::quant::{QuantKind, QuantSettings};
use candle_core::{DType, Device};

/// The device a config asks for. `auto` is the first GPU in a CUDA build that sees one.
pub fn device(choice: &crate::config::Device) -> Result<Device, String> {
    use crate::config::Device as D;
    match choice {
        D::Cpu => Ok(Device::Cpu),
        D::Cuda(ordinal) => {
            if !cfg!(feature = "cuda") {
                return Err("device: cuda needs a moeq built with --features cuda (this build is CPU-only); set `device: cpu`".into());
            }
            Device::new_cuda(ordinal.unwrap_or(0))
                .map_err(|e| format!("device: cuda:{}: {e}", ordinal.unwrap_or(0)))
        }
        D::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
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

/// Loads and quantizes the frozen base, on the GPU when the model runs there.
pub fn load_base(
    dir: &ModelDir,
    settings: QuantSettings,
    device: &Device,
) -> Result<FrozenBase, String> {
    let mut gather = SingleProcess;
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let ordinal = match device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            let mut q = frozen::CudaQuantizer::new(ordinal).map_err(|e| e.to_string())?;
            frozen::load(dir, settings, None, &mut q, &mut gather).map_err(|e| e.to_string())
        }
        _ => frozen::load(dir, settings, None, &mut CpuQuantizer, &mut gather)
            .map_err(|e| e.to_string()),
    }
}
