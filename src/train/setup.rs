//! From a validated config to the pieces a run needs: the quantization settings, the frozen
//! base on the device, and LoRA settings (the device itself: `util::device`).

use crate::config::{TargetModules, TrainConfig};
use crate::lora::LoraSettings;
use crate::model_files::frozen::{self, CpuQuantizer, FrozenBase};
use crate::model_files::ModelDir;
use crate::quant::QuantSettings;
use candle_core::Device;

pub fn quant_settings(c: &TrainConfig) -> QuantSettings {
    QuantSettings {
        kind: c.bnb_4bit_quant_type,
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
pub struct CommGather<'a>(pub &'a dyn crate::distributed::Communicator);

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

#[cfg(test)]
mod tests {
    use crate::config::TrainConfig;

    /// `lora_alpha / r`, or `lora_alpha / √r` with `peft_use_rslora` (PEFT's rule), from the
    /// config keys through `lora_settings`.
    #[test]
    fn lora_scaling_follows_the_config() {
        let scaling = |extra: &str| {
            let yaml = format!("base_model: synth://qwen3_moe/tiny\ndatasets:\n  - path: data.jsonl\n    type: completion\n{extra}");
            let c = TrainConfig::from_yaml_str(&yaml, "t.yaml").unwrap().config;
            super::lora_settings(&c).scaling()
        };
        assert_eq!(scaling("lora_r: 8\nlora_alpha: 16\n"), 2.0);
        assert_eq!(
            scaling("lora_r: 64\nlora_alpha: 16\npeft_use_rslora: true\n"),
            2.0
        );
        assert_eq!(
            scaling("lora_r: 16\nlora_alpha: 16\npeft_use_rslora: true\n"),
            4.0
        );
    }
}
