//! The canonical parameter list of a model: every tensor with its transformers v5 runtime
//! name, shape and role. Synthesis writes it, the checkpoint reader checks against it,
//! `inspect` counts it, and quantization decides from `Component` what becomes NF4.

use super::spec::{ArchSpec, LatentSpec, LinearAttnSpec, LinearProjections, QkNorm};

/// What a tensor is, for accounting and for the quantize-or-not decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Embedding,
    LmHead,
    Norm,
    /// q/k/v/o projections (and their biases).
    Attention,
    Router,
    /// The fused expert parameters `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`.
    Experts,
    /// gpt-oss's expert biases `gate_up_proj_bias [E, 2I]` and `down_proj_bias [E, H]`.
    ExpertBias,
    /// qwen2_moe shared expert projections and its sigmoid gate.
    SharedExpert,
    /// MLP of dense (non-MoE) layers.
    DenseMlp,
}

impl Component {
    pub fn label(self) -> &'static str {
        match self {
            Component::Embedding => "embeddings",
            Component::LmHead => "lm_head",
            Component::Norm => "norms",
            Component::Attention => "attention",
            Component::Router => "routers",
            Component::Experts => "experts",
            Component::ExpertBias => "expert biases",
            Component::SharedExpert => "shared experts",
            Component::DenseMlp => "dense MLPs",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// transformers v5 runtime name, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub name: String,
    pub shape: Vec<usize>,
    pub component: Component,
    /// Frozen NF4 in QLoRA: every `nn.Linear`-equivalent weight (attention, experts, shared
    /// expert and dense projections). Embeddings, norms, routers, biases and `lm_head` stay in
    /// the compute dtype, as bitsandbytes leaves them.
    pub quantized: bool,
    /// Fraction of this tensor used per token (top_k / E for routed experts, 1 otherwise).
    pub active_fraction: f64,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether this is a linear weight a LoRA adapter can target: 4-bit and 2-D, but neither a
    /// router (Hunyuan's is linear) nor the shared expert's `[1, H]` gate, which are quantized
    /// and never adapted.
    pub fn adaptable_linear(&self) -> bool {
        self.quantized
            && !matches!(self.component, Component::Experts | Component::Router)
            && self.name.ends_with(".weight")
            && !self.name.ends_with(".shared_expert_gate.weight")
    }
}

/// Canonical names of one layer's expert parameters.
pub fn gate_up_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.experts.gate_up_proj")
}

pub fn down_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.experts.down_proj")
}

/// Adds one parameter: name, shape, component, quantized.
type Push<'a> = dyn FnMut(String, Vec<usize>, Component, bool) + 'a;

impl ArchSpec {
    /// q/k/v/o projections (with their biases) and the q/k norms of ordinary attention.
    fn head_params(&self, a: &str, push: &mut Push) {
        let h = self.hidden_size;
        let (qd, kvd) = (self.q_dim(), self.kv_dim());
        // With an output gate, q_proj also yields the gate: each head's q then its gate.
        let q_out = qd * (1 + usize::from(self.attn_output_gate));
        for (proj, out_dim, in_dim) in [("q", q_out, h), ("k", kvd, h), ("v", kvd, h), ("o", h, qd)]
        {
            push(
                format!("{a}.{proj}_proj.weight"),
                vec![out_dim, in_dim],
                Component::Attention,
                true,
            );
            let has_bias = if proj == "o" {
                self.o_bias
            } else {
                self.qkv_bias
            };
            if has_bias {
                push(
                    format!("{a}.{proj}_proj.bias"),
                    vec![out_dim],
                    Component::Attention,
                    false,
                );
            }
        }
        let (qn, kn) = self.model_type.qk_norm_names();
        let widths = match self.qk_norm {
            QkNorm::None | QkNorm::L2AfterRotary => None,
            QkNorm::PerHead | QkNorm::PerHeadAfterRotary => Some((self.head_dim, self.head_dim)),
            QkNorm::FullProjection => Some((qd, kvd)),
        };
        if self.attention_sinks {
            push(
                format!("{a}.sinks"),
                vec![self.num_heads],
                Component::Attention,
                false,
            );
        }
        if let Some((q_width, k_width)) = widths {
            push(
                format!("{a}.{qn}.weight"),
                vec![q_width],
                Component::Norm,
                false,
            );
            push(
                format!("{a}.{kn}.weight"),
                vec![k_width],
                Component::Norm,
                false,
            );
        }
    }

    /// Latent attention's projections and norms (`attention_bias` puts biases on `q_a_proj`,
    /// `kv_a_proj_with_mqa` and `o_proj`).
    fn latent_params(&self, a: &str, l: LatentSpec, push: &mut Push) {
        let (h, nh) = (self.hidden_size, self.num_heads);
        let bias = self.o_bias;
        let mut linear = |name: &str, out: usize, inp: usize, with_bias: bool| {
            push(
                format!("{a}.{name}.weight"),
                vec![out, inp],
                Component::Attention,
                true,
            );
            if with_bias {
                push(
                    format!("{a}.{name}.bias"),
                    vec![out],
                    Component::Attention,
                    false,
                );
            }
        };
        match l.q_lora_rank {
            None => linear("q_proj", nh * self.head_dim, h, false),
            Some(r) => {
                linear("q_a_proj", r, h, bias);
                linear("q_b_proj", nh * self.head_dim, r, false);
            }
        }
        linear("kv_a_proj_with_mqa", l.kv_lora_rank + l.rope_dim, h, bias);
        linear(
            "kv_b_proj",
            nh * (l.nope_dim + l.v_head_dim),
            l.kv_lora_rank,
            false,
        );
        linear("o_proj", h, nh * l.v_head_dim, bias);
        if let Some(r) = l.q_lora_rank {
            push(
                format!("{a}.q_a_layernorm.weight"),
                vec![r],
                Component::Norm,
                false,
            );
        }
        push(
            format!("{a}.kv_a_layernorm.weight"),
            vec![l.kv_lora_rank],
            Component::Norm,
            false,
        );
    }

    /// A Gated DeltaNet layer's projections, convolution, decay parameters and output norm.
    fn linear_attn_params(&self, a: &str, l: LinearAttnSpec, push: &mut Push) {
        let (h, hv) = (self.hidden_size, l.value_heads);
        let (kd, vd) = (l.key_dim(), l.value_dim());
        let projections: &[(&str, usize, usize)] = match l.projections {
            LinearProjections::Grouped => &[
                ("in_proj_qkvz", 2 * kd + 2 * vd, h),
                ("in_proj_ba", 2 * hv, h),
                ("out_proj", h, vd),
            ],
            LinearProjections::Split => &[
                ("in_proj_qkv", 2 * kd + vd, h),
                ("in_proj_z", vd, h),
                ("in_proj_b", hv, h),
                ("in_proj_a", hv, h),
                ("out_proj", h, vd),
            ],
        };
        for &(name, out, inp) in projections {
            push(
                format!("{a}.{name}.weight"),
                vec![out, inp],
                Component::Attention,
                true,
            );
        }
        let dense = [
            ("conv1d.weight", vec![l.conv_dim(), 1, l.conv_kernel]),
            ("dt_bias", vec![hv]),
            ("A_log", vec![hv]),
        ];
        for (name, shape) in dense {
            push(format!("{a}.{name}"), shape, Component::Attention, false);
        }
        push(
            format!("{a}.norm.weight"),
            vec![l.value_head_dim],
            Component::Norm,
            false,
        );
    }

    /// All parameters in a fixed order (embedding, layers in order, final norm, lm_head).
    pub fn params(&self) -> Vec<ParamInfo> {
        let h = self.hidden_size;
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, component: Component, quantized: bool| {
            out.push(ParamInfo {
                name,
                shape,
                component,
                quantized,
                active_fraction: 1.0,
            })
        };
        push(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
            Component::Embedding,
            false,
        );
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            let [attn_norm, mlp_norm] = self.layer_norm_names(l);
            push(attn_norm, vec![h], Component::Norm, false);
            match (self.latent, self.linear_attn) {
                (_, Some(la)) if self.linear_layers[l] => {
                    self.linear_attn_params(&format!("{p}.linear_attn"), la, &mut push)
                }
                (Some(lat), _) => self.latent_params(&format!("{p}.self_attn"), lat, &mut push),
                (None, _) => self.head_params(&format!("{p}.self_attn"), &mut push),
            }
            push(mlp_norm, vec![h], Component::Norm, false);
            if self.moe_layers[l] {
                let (e, i) = (self.num_experts, self.expert_intermediate_size);
                let (router, quantized) = self.model_type.router_name(l);
                push(router, vec![e, h], Component::Router, quantized);
                if self.router.logit_bias {
                    push(
                        format!("{p}.mlp.gate.bias"),
                        vec![e],
                        Component::Router,
                        false,
                    );
                }
                if self.router.correction_bias {
                    push(
                        self.correction_bias_name(l),
                        self.correction_bias_shape(),
                        Component::Router,
                        false,
                    );
                }
                push(gate_up_name(l), vec![e, 2 * i, h], Component::Experts, true);
                push(down_name(l), vec![e, h, i], Component::Experts, true);
                if self.expert_bias {
                    let biases = [(gate_up_name(l), 2 * i), (down_name(l), h)];
                    for (name, width) in biases {
                        push(
                            format!("{name}_bias"),
                            vec![e, width],
                            Component::ExpertBias,
                            false,
                        );
                    }
                }
                if let Some(shared) = self.shared_expert {
                    let si = shared.intermediate_size;
                    let s = format!("{p}.{}", shared.module);
                    let projections = match shared.fused {
                        false => vec![
                            ("gate_proj", vec![si, h]),
                            ("up_proj", vec![si, h]),
                            ("down_proj", vec![h, si]),
                        ],
                        true => vec![
                            ("input_linear", vec![2 * si, h]),
                            ("output_linear", vec![h, si]),
                        ],
                    };
                    for (name, shape) in projections {
                        push(
                            format!("{s}.{name}.weight"),
                            shape,
                            Component::SharedExpert,
                            true,
                        );
                    }
                    if shared.gated {
                        // An nn.Linear(H, 1): bitsandbytes' loader makes it 4-bit too.
                        push(
                            format!("{p}.mlp.shared_expert_gate.weight"),
                            vec![1, h],
                            Component::SharedExpert,
                            true,
                        );
                    }
                }
            } else {
                let di = self.dense_intermediate_size;
                push(
                    format!("{p}.mlp.gate_proj.weight"),
                    vec![di, h],
                    Component::DenseMlp,
                    true,
                );
                push(
                    format!("{p}.mlp.up_proj.weight"),
                    vec![di, h],
                    Component::DenseMlp,
                    true,
                );
                push(
                    format!("{p}.mlp.down_proj.weight"),
                    vec![h, di],
                    Component::DenseMlp,
                    true,
                );
            }
        }
        push("model.norm.weight".into(), vec![h], Component::Norm, false);
        if !self.tie_word_embeddings {
            push(
                "lm_head.weight".into(),
                vec![self.vocab_size, h],
                Component::LmHead,
                false,
            );
        }
        let routed = self.router.top_k as f64 / self.num_experts as f64;
        let per_expert = [Component::Experts, Component::ExpertBias];
        for p in out.iter_mut().filter(|p| per_expert.contains(&p.component)) {
            p.active_fraction = routed;
        }
        out
    }

    /// Whether norm weight `name` is neutral at 1 (a plain scale), not at 0 (`norm_offset`'s
    /// zero-centred weights; Gated DeltaNet's output norm keeps a plain scale).
    pub fn unit_norm(&self, name: &str) -> bool {
        !self.norm_offset || name.ends_with(".linear_attn.norm.weight")
    }

    pub fn total_params(&self) -> u64 {
        self.params().iter().map(|p| p.numel() as u64).sum()
    }

    /// Parameters touched per token: routed experts count `top_k` of `E`; embeddings and
    /// `lm_head` count in full, as the published "active" figures do.
    pub fn active_params(&self) -> u64 {
        self.active_params_without(&[])
    }

    /// Active parameters without the given components. Publishers count differently: Qwen and
    /// Mixtral include both embedding tables, DeepSeek leaves out the input embedding (a
    /// lookup), GLM both tables.
    pub fn active_params_without(&self, left_out: &[Component]) -> u64 {
        self.params()
            .iter()
            .filter(|p| !left_out.contains(&p.component))
            .map(|p| (p.numel() as f64 * p.active_fraction).round() as u64)
            .sum()
    }
}
