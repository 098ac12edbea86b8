//! The architectures as rows of data (docs/ARCHITECTURE.md, decision 6): for each model type,
//! which config.json keys name what and what the transformers config class defaults to when a
//! key is absent. `spec::ArchSpec::from_json` reads a config through its row; the model reads
//! only the resulting spec. The row's fields are declared in `row_fields.rs`.

use super::cfg_linear::LinearProjections;
pub(super) use super::row_fields::{AttentionRow, MoeLayers, RouterRow, Row, SharedRow};
use super::spec::{GroupScore, QkNorm, Scoring};

/// The model families moeq implements. Adding one is a row in `ModelType::row` plus, at most,
/// a small hook in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    Qwen3Moe,
    Qwen2Moe,
    Mixtral,
    Olmoe,
    Glm4Moe,
    Glm4MoeLite,
    DeepseekV2,
    DeepseekV3,
    KimiK2,
    FlexOlmo,
    MinimaxM2,
    Ernie45Moe,
    GraniteMoe,
    HunyuanV1Moe,
    GptOss,
    GraniteMoeShared,
    Llama4Text,
    Qwen3Next,
    Qwen35MoeText,
}

/// Every model type with its config.json name and transformers class.
const TYPES: &[(ModelType, &str, &str)] = &[
    (ModelType::Qwen3Moe, "qwen3_moe", "Qwen3MoeForCausalLM"),
    (ModelType::Qwen2Moe, "qwen2_moe", "Qwen2MoeForCausalLM"),
    (ModelType::Mixtral, "mixtral", "MixtralForCausalLM"),
    (ModelType::Olmoe, "olmoe", "OlmoeForCausalLM"),
    (ModelType::Glm4Moe, "glm4_moe", "Glm4MoeForCausalLM"),
    (
        ModelType::Glm4MoeLite,
        "glm4_moe_lite",
        "Glm4MoeLiteForCausalLM",
    ),
    (
        ModelType::DeepseekV2,
        "deepseek_v2",
        "DeepseekV2ForCausalLM",
    ),
    (
        ModelType::DeepseekV3,
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
    ),
    // Kimi K2 is the DeepSeek-V3 architecture under its own model_type (its hub config names
    // DeepSeek-V3's classes through auto_map).
    (ModelType::KimiK2, "kimi_k2", "DeepseekV3ForCausalLM"),
    (ModelType::FlexOlmo, "flex_olmo", "FlexOlmoForCausalLM"),
    (ModelType::MinimaxM2, "minimax_m2", "MiniMaxM2ForCausalLM"),
    (
        ModelType::Ernie45Moe,
        "ernie4_5_moe",
        "Ernie4_5_MoeForCausalLM",
    ),
    (ModelType::GraniteMoe, "granitemoe", "GraniteMoeForCausalLM"),
    (
        ModelType::HunyuanV1Moe,
        "hunyuan_v1_moe",
        "HunYuanMoEV1ForCausalLM",
    ),
    (ModelType::GptOss, "gpt_oss", "GptOssForCausalLM"),
    (
        ModelType::GraniteMoeShared,
        "granitemoeshared",
        "GraniteMoeSharedForCausalLM",
    ),
    (ModelType::Llama4Text, "llama4_text", "Llama4ForCausalLM"),
    (ModelType::Qwen3Next, "qwen3_next", "Qwen3NextForCausalLM"),
    (
        ModelType::Qwen35MoeText,
        "qwen3_5_moe_text",
        "Qwen3_5MoeForCausalLM",
    ),
];

/// `name` with the module prefix `from` (at its start or after a dot) spelled `to`.
fn respell(name: &str, from: &str, to: &str) -> String {
    match name.strip_prefix(from) {
        Some(rest) => format!("{to}{rest}"),
        None => name.replace(&format!(".{from}"), &format!(".{to}")),
    }
}

/// The supported `model_type` names, comma-separated (for messages).
pub fn supported_model_types() -> String {
    TYPES.iter().map(|t| t.1).collect::<Vec<_>>().join(", ")
}

const SOFTMAX: RouterRow = RouterRow {
    scoring: Scoring::Softmax,
    reads_norm_topk: true,
    default_norm_topk: false,
    always_renormalize: false,
    correction_bias: false,
    groups: None,
    reads_scaling: false,
    bias_owner: "mlp.gate",
};

/// Top-k of the router's logits, then a softmax over those k: the renormalised softmax top-k
/// (Granite, Hunyuan, gpt-oss; `norm_topk_prob` not read).
const TOPK_THEN_SOFTMAX: RouterRow = RouterRow {
    reads_norm_topk: false,
    always_renormalize: true,
    ..SOFTMAX
};

/// DeepSeek-V3's `noaux_tc` router (GLM-4.5 and GLM-4.7-Flash too): sigmoid scores, the
/// correction bias in the choice, groups scored by their two best experts.
const NOAUX_TC: RouterRow = RouterRow {
    scoring: Scoring::Sigmoid,
    reads_norm_topk: true,
    default_norm_topk: true,
    always_renormalize: false,
    correction_bias: true,
    groups: Some(GroupScore::TopTwoSum),
    reads_scaling: true,
    bias_owner: "mlp.gate",
};

const DEEPSEEK_SHARED: SharedRow = SharedRow::Summed {
    count_key: "n_shared_experts",
    default_count: 1,
};

const QWEN3: Row = Row {
    experts_key: "num_experts",
    experts_alias: Some("num_local_experts"),
    top_k_key: "num_experts_per_tok",
    top_k_alias: None,
    default_tie: false,
    reads_use_bias: false,
    hub_renames: &[],
    moe_module: "mlp",
    reads_mup: false,
    router_linear: false,
    qk_norm_names: ("q_norm", "k_norm"),
    hunyuan_keys: false,
    expert_intermediate_key: "moe_intermediate_size",
    dense_intermediate_key: "intermediate_size",
    router: SOFTMAX,
    moe_layers: MoeLayers::SparseStep,
    shared: SharedRow::None,
    attention: AttentionRow::Heads,
    qk_norm: QkNorm::PerHead,
    reads_use_qk_norm: false,
    default_qkv_bias: false,
    reads_attention_bias: true,
    default_attention_bias: false,
    o_bias_follows: true,
    reads_qkv_bias: false,
    reads_clip_qkv: false,
    default_partial_rotary: None,
    default_rope_interleave: false,
    reads_rope_interleave: false,
    reads_rotary_dim: false,
    post_norms: false,
    mixtral_hub_names: false,
    gpt_oss_keys: false,
    llama4_keys: false,
    hybrid: None,
    default_rope_theta: 10000.0,
    default_eps: 1e-6,
    default_max_positions: 32768,
};

/// Qwen3-Next: Gated DeltaNet layers between gated full-attention layers (`hybrid`), a
/// quarter of each head rotated, qwen2_moe's gated shared expert.
const QWEN3_NEXT: Row = Row {
    shared: SharedRow::QwenGated,
    default_partial_rotary: Some(0.25),
    hybrid: Some(LinearProjections::Grouped),
    ..QWEN3
};

/// The softmax's top-k renormalised to sum 1 whatever `norm_topk_prob` says (Qwen3.5).
const TOPK_RENORMALIZED: RouterRow = RouterRow {
    reads_norm_topk: false,
    always_renormalize: true,
    ..SOFTMAX
};

const DEEPSEEK_V3: Row = Row {
    experts_key: "n_routed_experts",
    router: NOAUX_TC,
    moe_layers: MoeLayers::FirstKDense { default_k: 3 },
    shared: DEEPSEEK_SHARED,
    attention: AttentionRow::Latent,
    qk_norm: QkNorm::None,
    default_rope_interleave: true,
    reads_rope_interleave: true,
    default_max_positions: 4096,
    ..QWEN3
};

/// Granite MoE: top-k of the router's logits, then a softmax over those k (the renormalised
/// top-k of the softmax); the hub stores each layer's experts fused.
const GRANITE: Row = Row {
    experts_key: "num_local_experts",
    experts_alias: None,
    expert_intermediate_key: "intermediate_size",
    hub_renames: &[
        (
            ".mlp.experts.gate_up_proj",
            ".block_sparse_moe.input_linear.weight",
        ),
        (
            ".mlp.experts.down_proj",
            ".block_sparse_moe.output_linear.weight",
        ),
        (".mlp.gate.weight", ".block_sparse_moe.router.layer.weight"),
    ],
    moe_module: "block_sparse_moe",
    reads_mup: true,
    router: TOPK_THEN_SOFTMAX,
    moe_layers: MoeLayers::All,
    qk_norm: QkNorm::None,
    default_max_positions: 2048,
    ..QWEN3
};

impl ModelType {
    pub fn parse(s: &str) -> Option<ModelType> {
        TYPES.iter().find(|t| t.1 == s).map(|t| t.0)
    }

    pub fn as_str(self) -> &'static str {
        TYPES.iter().find(|t| t.0 == self).map_or("?", |t| t.1)
    }

    /// Whether hub checkpoints of this type name the MoE block as Mixtral's do
    /// (`block_sparse_moe.…`, experts `w1/w3/w2`).
    pub fn mixtral_hub_names(self) -> bool {
        self.row().mixtral_hub_names
    }

    /// The router's weight in MoE layer `layer`, and whether it is a linear layer's (quantized
    /// as every linear layer is).
    pub fn router_name(self, layer: usize) -> (String, bool) {
        match self.row().router_linear {
            true => (format!("model.layers.{layer}.mlp.gate.wg.weight"), true),
            false => (format!("model.layers.{layer}.mlp.gate.weight"), false),
        }
    }

    /// Whether checkpoints of this type store the fused experts `[E, in, out]` (gpt-oss, or
    /// as MXFP4 blocks and scales; Llama 4).
    pub fn experts_transposed(self) -> bool {
        let row = self.row();
        row.gpt_oss_keys || row.llama4_keys
    }

    /// Whether PEFT's expert adapters of this type are swapped (`lora::ExpertLora::swapped`):
    /// Llama 4's experts are `[E, in, out]` without transformers' `is_transposed` mark.
    pub fn peft_swaps_experts(self) -> bool {
        self.row().llama4_keys
    }

    /// Whether this type's releases ship MXFP4 experts (gpt-oss).
    pub fn ships_mxfp4(self) -> bool {
        self.row().gpt_oss_keys
    }

    /// The q/k norms' module names.
    pub fn qk_norm_names(self) -> (&'static str, &'static str) {
        self.row().qk_norm_names
    }

    /// The MoE block's module name in transformers (`mlp`; Granite: `block_sparse_moe`).
    pub fn moe_module(self) -> &'static str {
        self.row().moe_module
    }

    /// The module prefix transformers spells otherwise, and moeq's: Granite's experts
    /// (`block_sparse_moe.experts`), every MLP module of Llama 4 (`feed_forward.`).
    fn module_spelling(self) -> Option<(String, &'static str)> {
        let row = self.row();
        match (row.moe_module, row.llama4_keys) {
            ("mlp", _) => None,
            (m, true) => Some((format!("{m}."), "mlp.")),
            (m, false) => Some((format!("{m}.experts"), "mlp.experts")),
        }
    }

    /// A LoRA target or module path (`mlp.experts.gate_up_proj`, or transformers' own
    /// spelling of this type) in moeq's canonical spelling.
    pub fn canonical_target(self, target: &str) -> String {
        match self.module_spelling() {
            None => target.to_string(),
            Some((theirs, ours)) => respell(target, &theirs, ours),
        }
    }

    /// A canonical module path or target in transformers' spelling (PEFT's names).
    pub fn transformers_name(self, canonical: &str) -> String {
        match self.module_spelling() {
            None => canonical.to_string(),
            Some((theirs, ours)) => respell(canonical, ours, &theirs),
        }
    }

    /// `name` as hub checkpoints of this type spell it, where they spell it otherwise.
    pub fn hub_name(self, name: &str) -> Option<String> {
        let renames = self.row().hub_renames;
        let (from, to) = renames.iter().find(|(from, _)| name.contains(from))?;
        Some(name.replace(from, to))
    }

    /// A canonical weight name as transformers names it at run time (what `moeq quantize`
    /// writes): Llama 4's checkpoint spelling (`feed_forward`, its router `feed_forward.router`);
    /// the canonical name for the other types.
    pub fn runtime_weight_name(self, canonical: &str) -> String {
        match self.row().llama4_keys {
            true => self.hub_name(canonical),
            false => None,
        }
        .unwrap_or_else(|| canonical.to_string())
    }

    /// The class name transformers writes into `architectures`.
    pub fn architecture_class(self) -> &'static str {
        TYPES.iter().find(|t| t.0 == self).map_or("?", |t| t.2)
    }

    pub(super) fn row(self) -> Row {
        match self {
            ModelType::Qwen3Moe => QWEN3,
            ModelType::Qwen2Moe => Row {
                experts_alias: None,
                shared: SharedRow::QwenGated,
                qk_norm: QkNorm::None,
                default_qkv_bias: true,
                reads_attention_bias: false,
                reads_qkv_bias: true,
                ..QWEN3
            },
            ModelType::Mixtral => Row {
                experts_key: "num_local_experts",
                experts_alias: Some("num_experts"),
                expert_intermediate_key: "intermediate_size",
                router: RouterRow {
                    default_norm_topk: true,
                    always_renormalize: true,
                    ..SOFTMAX
                },
                moe_layers: MoeLayers::All,
                qk_norm: QkNorm::None,
                reads_attention_bias: false,
                mixtral_hub_names: true,
                default_rope_theta: 1e6,
                default_eps: 1e-5,
                default_max_positions: 131072,
                ..QWEN3
            },
            ModelType::Olmoe => Row {
                expert_intermediate_key: "intermediate_size",
                moe_layers: MoeLayers::All,
                qk_norm: QkNorm::FullProjection,
                reads_clip_qkv: true,
                default_eps: 1e-5,
                default_max_positions: 4096,
                ..QWEN3
            },
            ModelType::Glm4Moe => Row {
                experts_key: "n_routed_experts",
                router: NOAUX_TC,
                moe_layers: MoeLayers::FirstKDense { default_k: 1 },
                shared: DEEPSEEK_SHARED,
                qk_norm: QkNorm::None,
                reads_use_qk_norm: true,
                o_bias_follows: false,
                default_partial_rotary: Some(0.5),
                default_eps: 1e-5,
                default_max_positions: 131072,
                ..QWEN3
            },
            ModelType::Glm4MoeLite => Row {
                moe_layers: MoeLayers::LayerTypes,
                default_eps: 1e-5,
                default_max_positions: 202752,
                ..DEEPSEEK_V3
            },
            ModelType::DeepseekV2 => Row {
                experts_alias: Some("num_experts"),
                router: RouterRow {
                    reads_norm_topk: false,
                    correction_bias: false,
                    scoring: Scoring::Softmax,
                    groups: Some(GroupScore::Max),
                    ..NOAUX_TC
                },
                moe_layers: MoeLayers::FirstKDense { default_k: 0 },
                reads_rope_interleave: false,
                default_max_positions: 2048,
                ..DEEPSEEK_V3
            },
            ModelType::DeepseekV3 | ModelType::KimiK2 => DEEPSEEK_V3,
            ModelType::FlexOlmo => Row {
                expert_intermediate_key: "intermediate_size",
                moe_layers: MoeLayers::All,
                qk_norm: QkNorm::FullProjection,
                post_norms: true,
                default_rope_theta: 500000.0,
                default_max_positions: 4096,
                ..QWEN3
            },
            // transformers 5.17 reads only `partial_rotary_factor` and rotates whole heads of
            // a hub config, which gives `rotary_dim` (64 of 128); moeq rotates `rotary_dim` dims
            // as the model was trained (docs/ARCHITECTURE.md decision 31).
            ModelType::MinimaxM2 => Row {
                experts_key: "num_local_experts",
                experts_alias: Some("num_experts"),
                expert_intermediate_key: "intermediate_size",
                router: RouterRow {
                    reads_norm_topk: false,
                    always_renormalize: true,
                    groups: None,
                    reads_scaling: false,
                    bias_owner: "mlp",
                    ..NOAUX_TC
                },
                moe_layers: MoeLayers::All,
                qk_norm: QkNorm::FullProjection,
                reads_attention_bias: false,
                default_partial_rotary: Some(1.0),
                reads_rotary_dim: true,
                mixtral_hub_names: true,
                default_rope_theta: 5e6,
                default_max_positions: 196608,
                ..QWEN3
            },
            // Rotary pairs are adjacent dims of whole heads; the router is softmax with the
            // correction bias in the choice.
            ModelType::Ernie45Moe => Row {
                experts_key: "moe_num_experts",
                experts_alias: Some("num_experts"),
                top_k_key: "moe_k",
                top_k_alias: Some("num_experts_per_tok"),
                default_tie: true,
                reads_use_bias: true,
                hub_renames: &[(".mlp.gate.moe_statics.", ".mlp.moe_statics.")],
                router: RouterRow {
                    reads_norm_topk: false,
                    always_renormalize: true,
                    correction_bias: true,
                    bias_owner: "mlp.gate.moe_statics",
                    ..SOFTMAX
                },
                moe_layers: MoeLayers::Interval,
                shared: SharedRow::Summed {
                    count_key: "moe_num_shared_experts",
                    default_count: 2,
                },
                qk_norm: QkNorm::None,
                reads_attention_bias: false,
                default_rope_interleave: true,
                default_rope_theta: 500000.0,
                default_eps: 1e-5,
                default_max_positions: 131072,
                ..QWEN3
            },
            ModelType::GraniteMoe => GRANITE,
            // Granite MoE with a shared MLP beside the experts (`shared_intermediate_size`).
            ModelType::GraniteMoeShared => Row {
                shared: SharedRow::Fused {
                    module: "shared_mlp",
                    size_key: "shared_intermediate_size",
                },
                ..GRANITE
            },
            // Per-head q/k norms after the rotation, a linear router (quantized), an unrouted
            // MLP of the experts' width beside them, every layer MoE, top-k always
            // renormalised; `moe_topk` may be a list per layer.
            ModelType::HunyuanV1Moe => Row {
                experts_alias: Some("num_local_experts"),
                top_k_key: "moe_topk",
                top_k_alias: Some("num_experts_per_tok"),
                expert_intermediate_key: "intermediate_size",
                router: TOPK_THEN_SOFTMAX,
                router_linear: true,
                qk_norm: QkNorm::PerHeadAfterRotary,
                qk_norm_names: ("query_layernorm", "key_layernorm"),
                hunyuan_keys: true,
                moe_layers: MoeLayers::All,
                shared: SharedRow::Plain {
                    module: "mlp.shared_mlp",
                },
                default_eps: 1e-5,
                default_max_positions: 2048,
                ..QWEN3
            },
            // The router is a biased linear map (`mlp.router` in transformers): top-k of its
            // logits, then a softmax over those k.
            ModelType::GptOss => Row {
                experts_key: "num_local_experts",
                experts_alias: Some("num_experts"),
                expert_intermediate_key: "intermediate_size",
                hub_renames: &[(".mlp.gate.", ".mlp.router.")],
                router: TOPK_THEN_SOFTMAX,
                moe_layers: MoeLayers::All,
                qk_norm: QkNorm::None,
                default_attention_bias: true,
                gpt_oss_keys: true,
                default_rope_theta: 150000.0,
                default_eps: 1e-5,
                default_max_positions: 131072,
                ..QWEN3
            },
            // Top-1 sigmoid router whose weight scales the expert's input, a shared expert,
            // NoPE and chunked-attention layers; transformers names the MLP `feed_forward`
            // and the router `feed_forward.router`.
            ModelType::Llama4Text => Row {
                experts_key: "num_local_experts",
                experts_alias: None,
                expert_intermediate_key: "intermediate_size",
                dense_intermediate_key: "intermediate_size_mlp",
                hub_renames: &[
                    (".mlp.gate.weight", ".feed_forward.router.weight"),
                    (".mlp.", ".feed_forward."),
                ],
                moe_module: "feed_forward",
                router: RouterRow {
                    scoring: Scoring::Sigmoid,
                    reads_norm_topk: false,
                    ..SOFTMAX
                },
                moe_layers: MoeLayers::InterleaveStep,
                shared: SharedRow::Plain {
                    module: "mlp.shared_expert",
                },
                qk_norm: QkNorm::None,
                default_rope_interleave: true,
                llama4_keys: true,
                default_rope_theta: 500000.0,
                default_eps: 1e-5,
                default_max_positions: 131072,
                ..QWEN3
            },
            ModelType::Qwen3Next => QWEN3_NEXT,
            // Qwen3.5: every layer MoE, the top-k always renormalised, the linear-attention
            // projections split.
            ModelType::Qwen35MoeText => Row {
                router: TOPK_RENORMALIZED,
                moe_layers: MoeLayers::All,
                hybrid: Some(LinearProjections::Split),
                ..QWEN3_NEXT
            },
        }
    }
}
