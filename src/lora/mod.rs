//! LoRA adapters with PEFT's shapes, initialisation and names (docs/ARCHITECTURE.md, "Formats"):
//! - linear target `[out, in]`: `A [r, in]`, `B [out, r]`, `y = base(x) + s·B(A(x))`;
//! - 3-D expert parameter `[E, out, in]` (`target_parameters`, PEFT `ParamWrapper`):
//!   `A [r·E, in]` with expert-major rows (`A_e = A[e·r..(e+1)·r]`) and `B [out, r·E]` with
//!   expert-minor columns (`B_e = B[:, e::E]`); `ΔW_e = s·B_e·A_e`, never materialised.
//!
//! `s = alpha/r`, or `alpha/√r` with rsLoRA. A is Kaiming-uniform (a=√5, i.e. U(±1/√in)),
//! B is zero, so training starts from the base model exactly. Values are drawn from a ChaCha
//! stream per adapter name, so initialisation does not depend on iteration order.

pub mod export;
pub mod merge;
pub mod parts;
pub mod peft;

use crate::arch::{target_matches, ArchSpec, Component};
use candle_core::{Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Uniform};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module names (`q_proj`…) or `all-linear`.
    pub target_modules: Vec<String>,
    /// Parameter suffixes such as `mlp.experts.gate_up_proj`.
    pub target_parameters: Vec<String>,
}

impl LoraSettings {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Adapter of one linear weight.
pub struct LinearLora {
    pub a: Var,
    pub b: Var,
}

/// Adapter of one 3-D expert parameter, for the experts `first..first + num_experts` this
/// rank holds (all of them with one rank): `a [r·num_experts, in]`, `b [out, r·num_experts]`
/// in PEFT's layout over the held experts — or, where `swapped`, `a [r·E, out]` and
/// `b [in, r·E]` (see [`ExpertLora::swapped`]).
pub struct ExpertLora {
    pub a: Var,
    pub b: Var,
    pub num_experts: usize,
    pub r: usize,
    /// Global index of the first held expert.
    pub first: usize,
    /// Experts of the whole parameter.
    pub total: usize,
    /// PEFT reads the transformers parameter as `[E, out, in]` unless its module says
    /// `is_transposed` (gpt-oss's does); Llama 4's experts are `[E, in, out]` and do not, so
    /// PEFT's `lora_A` spans the output side and `lora_B` the input side: expert e's update
    /// (moeq's `[out, in]` orientation) is `s · A_eᵀ · B_eᵀ` (`ModelType::peft_swaps_experts`).
    pub swapped: bool,
}

/// `[d, r·E]` (expert-minor columns, B's layout) → `[r·E, d]` (expert-major rows, A's), each
/// expert's block transposed: column `k·E + e` becomes row `e·r + k`.
pub fn rows_of_columns(t: &Tensor, r: usize, e: usize) -> Result<Tensor> {
    let d = t.dim(0)?;
    t.reshape((d, r, e))?
        .permute((2, 1, 0))?
        .contiguous()?
        .reshape((e * r, d))
}

/// The inverse of [`rows_of_columns`]: `[r·E, d]` → `[d, r·E]`.
pub fn columns_of_rows(t: &Tensor, r: usize, e: usize) -> Result<Tensor> {
    let d = t.dim(1)?;
    t.reshape((e, r, d))?
        .permute((2, 1, 0))?
        .contiguous()?
        .reshape((d, r * e))
}

impl ExpertLora {
    /// The factors in moeq's orientation, A `[r·E, in]` and B `[out, r·E]`, from `(a, b)` of
    /// this adapter's layout (the tensors, or their detached or live copies).
    pub fn oriented(&self, a: Tensor, b: Tensor) -> Result<(Tensor, Tensor)> {
        match self.swapped {
            false => Ok((a, b)),
            true => Ok((
                rows_of_columns(&b, self.r, self.num_experts)?,
                columns_of_rows(&a, self.r, self.num_experts)?,
            )),
        }
    }

    /// Gradients of moeq's oriented factors `(dA, dB)` → those of this adapter's `(a, b)`.
    pub fn unoriented(&self, da: Tensor, db: Tensor) -> Result<(Tensor, Tensor)> {
        match self.swapped {
            false => Ok((da, db)),
            true => Ok((
                rows_of_columns(&db, self.r, self.num_experts)?,
                columns_of_rows(&da, self.r, self.num_experts)?,
            )),
        }
    }
}

/// `A [r·E, in]` (expert-major rows) or `B [out, r·E]` (expert-minor columns) of an expert
/// adapter, or a tensor of the same layout (its optimizer moments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPart {
    A,
    B,
}

impl ExpertLora {
    /// This rank's part of a whole-parameter tensor of layout `part` (the inverse of
    /// `train::ranks::gather_expert_part`).
    pub fn local(&self, part: ExpertPart, full: &Tensor) -> Result<Tensor> {
        let (r, first, held) = (self.r, self.first, self.num_experts);
        match part {
            ExpertPart::A => full.narrow(0, first * r, held * r)?.contiguous(),
            ExpertPart::B => {
                let out = full.dim(0)?;
                full.reshape((out, r, self.total))?
                    .narrow(2, first, held)?
                    .contiguous()?
                    .reshape((out, r * held))
            }
        }
    }

    /// `A_e [r, in]` of held expert `e` (local index).
    pub fn expert_a(&self, e: usize) -> Result<Tensor> {
        self.a.as_tensor().narrow(0, e * self.r, self.r)
    }

    /// `B_e [out, r]`: columns `e, e+E, e+2E, …`.
    pub fn expert_b(&self, e: usize) -> Result<Tensor> {
        let cols: Vec<u32> = (0..self.r)
            .map(|k| (e + k * self.num_experts) as u32)
            .collect();
        let idx = Tensor::new(cols.as_slice(), self.b.device())?;
        self.b.as_tensor().index_select(&idx, 1)
    }
}

/// All adapters of a model, by the base tensor they adapt (transformers v5 names).
pub struct Adapters {
    pub settings: LoraSettings,
    /// Keyed by the module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub linear: BTreeMap<String, LinearLora>,
    /// Keyed by the parameter path, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub experts: BTreeMap<String, ExpertLora>,
    /// The model type, whose module spelling in transformers PEFT's names carry
    /// (`ModelType::transformers_name`: Granite's `block_sparse_moe`, Llama 4's `feed_forward`).
    pub model_type: crate::arch::ModelType,
}

fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(b"lora/");
    h.update(name.as_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// Kaiming-uniform with a=√5 on an `[rows, fan_in]` matrix: U(−1/√fan_in, 1/√fan_in).
fn kaiming(seed: u64, name: &str, rows: usize, fan_in: usize, device: &Device) -> Result<Var> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let dist = Uniform::new(-bound, bound).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut rng = stream(seed, name);
    let v: Vec<f32> = (0..rows * fan_in).map(|_| dist.sample(&mut rng)).collect();
    Var::from_vec(v, (rows, fan_in), device)
}

impl Adapters {
    /// Adapters for every targeted weight of `spec`, initialised as PEFT does.
    pub fn new(
        spec: &ArchSpec,
        settings: LoraSettings,
        seed: u64,
        device: &Device,
    ) -> Result<Adapters> {
        Self::for_experts(spec, settings, seed, device, 0..spec.num_experts)
    }

    /// As `new`, with expert adapters for the experts `held` only; their values are the
    /// rows/columns of the whole-parameter initialisation, so any split starts identically.
    pub fn for_experts(
        spec: &ArchSpec,
        settings: LoraSettings,
        seed: u64,
        device: &Device,
        held: std::ops::Range<usize>,
    ) -> Result<Adapters> {
        let r = settings.r;
        let all_linear = settings.target_modules.iter().any(|m| m == "all-linear");
        let mut linear = BTreeMap::new();
        let mut experts = BTreeMap::new();
        for p in spec.params() {
            if p.component == Component::Experts {
                if settings
                    .target_parameters
                    .iter()
                    .any(|t| target_matches(&p.name, &spec.model_type.canonical_target(t)))
                {
                    let (e, out, inp) = (p.shape[0], p.shape[1], p.shape[2]);
                    // PEFT's in and out of the parameter (`ExpertLora::swapped`).
                    let swapped = spec.model_type.peft_swaps_experts();
                    let (out, inp) = if swapped { (inp, out) } else { (out, inp) };
                    if held.end > e {
                        candle_core::bail!("{}: experts {held:?} outside 0..{e}", p.name);
                    }
                    let a = kaiming(seed, &format!("{}.lora_A", p.name), r * e, inp, device)?;
                    let a = if held.len() == e {
                        a
                    } else {
                        Var::from_tensor(&a.as_tensor().narrow(
                            0,
                            held.start * r,
                            held.len() * r,
                        )?)?
                    };
                    let b = Var::zeros((out, r * held.len()), candle_core::DType::F32, device)?;
                    experts.insert(
                        p.name.clone(),
                        ExpertLora {
                            a,
                            b,
                            num_experts: held.len(),
                            r,
                            first: held.start,
                            total: e,
                            swapped,
                        },
                    );
                }
                continue;
            }
            if !p.adaptable_linear() {
                continue;
            }
            let module = p.name.strip_suffix(".weight").unwrap_or(&p.name);
            if all_linear
                || settings
                    .target_modules
                    .iter()
                    .any(|m| target_matches(module, m))
            {
                let path = p.name.trim_end_matches(".weight").to_string();
                let (out, inp) = (p.shape[0], p.shape[1]);
                let a = kaiming(seed, &format!("{path}.lora_A"), r, inp, device)?;
                let b = Var::zeros((out, r), candle_core::DType::F32, device)?;
                linear.insert(path, LinearLora { a, b });
            }
        }
        Ok(Adapters {
            settings,
            linear,
            experts,
            model_type: spec.model_type,
        })
    }

    /// Trainable variables by PEFT tensor name, sorted.
    pub fn vars(&self) -> Vec<(String, Var)> {
        peft::named_tensors(self).into_iter().collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Trainable parameters of the whole model: held expert adapters counted for all experts.
    pub fn num_params_global(&self) -> usize {
        let linear: usize = self
            .linear
            .values()
            .map(|l| l.a.elem_count() + l.b.elem_count())
            .sum();
        let experts: usize = self
            .experts
            .values()
            .map(|e| (e.a.elem_count() + e.b.elem_count()) / e.num_experts.max(1) * e.total)
            .sum();
        linear + experts
    }

    /// PEFT names of the expert adapters (held by their owner, not replicated).
    pub fn expert_var_names(&self) -> std::collections::BTreeSet<String> {
        let ids: std::collections::HashSet<_> = self
            .experts
            .values()
            .flat_map(|e| [e.a.as_tensor().id(), e.b.as_tensor().id()])
            .collect();
        self.vars()
            .into_iter()
            .filter(|(_, v)| ids.contains(&v.as_tensor().id()))
            .map(|(n, _)| n)
            .collect()
    }

    /// Which part of which expert adapter each expert variable is, by PEFT name.
    pub fn expert_parts(&self) -> BTreeMap<String, (&ExpertLora, ExpertPart)> {
        let vars = self.vars();
        let mut out = BTreeMap::new();
        for e in self.experts.values() {
            for (part, v) in [(ExpertPart::A, &e.a), (ExpertPart::B, &e.b)] {
                if let Some((name, _)) = vars
                    .iter()
                    .find(|(_, w)| w.as_tensor().id() == v.as_tensor().id())
                {
                    out.insert(name.clone(), (e, part));
                }
            }
        }
        out
    }
}
