//! Memory accounting for QLoRA and 16-bit LoRA: NF4 sizes exactly as bitsandbytes stores them,
//! LoRA adapter sizes as PEFT shapes them, and AdamW state, per GPU under expert parallelism. Activations are not included: they depend on
//! tokens per step and are measured, not estimated.

use super::{ArchSpec, Component, ParamInfo};

/// Bytes bitsandbytes uses for one 4-bit parameter of `n` elements.
/// codes: ceil(n/2) u8; absmax: u8 per block + nested f32 per 256 blocks + 256-entry f32 map
/// (double quant) or f32 per block; plus the 16-entry code map.
pub fn nf4_bytes(n: usize, blocksize: usize, double_quant: bool) -> u64 {
    let blocks = n.div_ceil(blocksize) as u64;
    let codes = n.div_ceil(2) as u64;
    let stats = if double_quant {
        blocks + 4 * blocks.div_ceil(256) + 4 * 256 + 4
    } else {
        4 * blocks
    };
    codes + stats + 4 * 16
}

/// Whether a LoRA target names the module or parameter `key` (a dotted path without
/// `.weight`) as PEFT decides it: the whole path, or a suffix starting at a dot — `q_proj` and
/// `self_attn.q_proj` match `model.layers.0.self_attn.q_proj`, `experts.gate_up_proj` matches
/// `model.layers.0.mlp.experts.gate_up_proj`, `proj` matches neither.
pub fn target_matches(key: &str, target: &str) -> bool {
    key == target
        || key
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// Which LoRA adapters a run trains (PEFT `target_modules` / `target_parameters`).
#[derive(Debug, Clone)]
pub struct LoraPlan {
    pub r: usize,
    /// Module names such as `q_proj`, or `all-linear`.
    pub modules: Vec<String>,
    /// Parameter names such as `mlp.experts.gate_up_proj`.
    pub parameters: Vec<String>,
}

impl LoraPlan {
    fn targets_module(&self, p: &ParamInfo) -> bool {
        if !p.adaptable_linear() {
            return false;
        }
        let module = p.name.trim_end_matches(".weight");
        self.modules
            .iter()
            .any(|m| m == "all-linear" || target_matches(module, m))
    }

    fn targets_parameter(&self, spec: &ArchSpec, p: &ParamInfo) -> bool {
        p.component == Component::Experts
            && self
                .parameters
                .iter()
                .any(|t| target_matches(&p.name, &spec.model_type.canonical_target(t)))
    }

    /// Trainable LoRA parameters: `r·(in+out)` per linear target; `r·E·(in+out)` per 3-D expert
    /// parameter (PEFT gives every expert its own rank-r pair).
    pub fn lora_params(&self, spec: &ArchSpec) -> (u64, u64) {
        let (mut linear, mut experts) = (0u64, 0u64);
        for p in spec.params() {
            if self.targets_module(&p) {
                linear += (self.r * (p.shape[0] + p.shape[1])) as u64;
            } else if self.targets_parameter(spec, &p) {
                experts += (self.r * p.shape[0] * (p.shape[1] + p.shape[2])) as u64;
            }
        }
        (linear, experts)
    }
}

/// How the frozen linear weights are held.
#[derive(Debug, Clone, Copy)]
pub enum FrozenFormat {
    /// bitsandbytes 4-bit with this blocksize and double quantization.
    FourBit {
        blocksize: usize,
        double_quant: bool,
    },
    /// Unquantized in the compute dtype (`load_in_4bit: false`).
    SixteenBit,
}

/// Memory of one GPU before activations.
#[derive(Debug, Clone, Default)]
pub struct MemoryEstimate {
    /// The frozen linear weights (attention, experts, shared expert, dense MLP): 4-bit codes and
    /// statistics, or 16-bit values.
    pub frozen_linear: u64,
    /// Embeddings, norms, routers, biases and lm_head in the compute dtype.
    pub dense_weights: u64,
    pub lora_params_linear: u64,
    pub lora_params_experts: u64,
    /// fp32 LoRA weights, their gradients and two fp32 AdamW moments: 16 bytes per parameter.
    pub lora_and_optimizer: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.frozen_linear + self.dense_weights + self.lora_and_optimizer
    }
}

/// One GPU's share when `ranks` GPUs spread the experts (expert parallelism: each holds at most
/// ⌈E / ranks⌉ experts and their adapters; everything else on every GPU). `ranks` 1: one GPU.
pub fn estimate(
    spec: &ArchSpec,
    format: FrozenFormat,
    compute_dtype_bytes: u64,
    lora: &LoraPlan,
    ranks: usize,
) -> MemoryEstimate {
    // The largest rank's experts out of E, as a fraction.
    let experts = spec.num_experts.max(1);
    let share = |bytes: u64| bytes * experts.div_ceil(ranks.max(1)) as u64 / experts as u64;
    let mut est = MemoryEstimate::default();
    for p in spec.params() {
        let bytes = match (p.quantized, format) {
            (
                true,
                FrozenFormat::FourBit {
                    blocksize,
                    double_quant,
                },
            ) => nf4_bytes(p.numel(), blocksize, double_quant),
            _ => p.numel() as u64 * compute_dtype_bytes,
        };
        match (p.quantized, p.component == Component::Experts) {
            (true, true) => est.frozen_linear += share(bytes),
            (true, false) => est.frozen_linear += bytes,
            (false, _) => est.dense_weights += bytes,
        }
    }
    let (linear, experts) = lora.lora_params(spec);
    est.lora_params_linear = linear;
    est.lora_params_experts = share(experts);
    est.lora_and_optimizer = 16 * (linear + est.lora_params_experts);
    est
}

#[cfg(test)]
mod tests {
    use super::target_matches;

    /// PEFT's rule: the whole name or a suffix starting at a dot, never part of a component.
    #[test]
    fn targets_match_whole_names_and_dotted_suffixes() {
        let q = "model.layers.3.self_attn.q_proj";
        for t in ["q_proj", "self_attn.q_proj", "layers.3.self_attn.q_proj", q] {
            assert!(target_matches(q, t), "{t}");
        }
        for t in [
            "proj",
            "_proj",
            "attn.q_proj",
            "k_proj",
            "self_attn",
            "x.model.layers.3.self_attn.q_proj",
        ] {
            assert!(!target_matches(q, t), "{t}");
        }
        let gu = "model.layers.0.mlp.experts.gate_up_proj";
        assert!(target_matches(gu, "experts.gate_up_proj"));
        assert!(target_matches(gu, "mlp.experts.gate_up_proj"));
        assert!(!target_matches(gu, "up_proj"));
    }
}
