//! The fields of an architecture row (`rows::Row`) and the kinds they take: which layers are
//! MoE, how the router chooses, attention's and the shared expert's forms. `rows.rs` holds the
//! rows themselves.

use super::spec::{GroupScore, QkNorm, Scoring};

/// Which layers are MoE.
#[derive(Clone, Copy)]
pub(super) enum MoeLayers {
    /// Every layer.
    All,
    /// Qwen: `decoder_sparse_step` and `mlp_only_layers`.
    SparseStep,
    /// DeepSeek and GLM: the first `first_k_dense_replace` layers are dense (then every
    /// `moe_layer_freq`-th).
    FirstKDense { default_k: usize },
    /// GLM-4.7-Flash: `mlp_layer_types` ("dense" / "sparse" per layer), by default the first
    /// layer dense.
    LayerTypes,
    /// ERNIE-4.5: layer `l` is MoE iff `(l + 1) % moe_layer_interval == 0` and
    /// `moe_layer_start_index <= l <= moe_layer_end_index` (−1: the last layer).
    Interval,
    /// Llama 4: the layers listed in `moe_layers`, by default every
    /// `interleave_moe_layer_step`-th layer (the step's last: 1, 3, 5, … for a step of 2).
    InterleaveStep,
}

/// How the router chooses and weighs experts.
#[derive(Clone, Copy)]
pub(super) struct RouterRow {
    pub scoring: Scoring,
    /// Reads `norm_topk_prob` (default below); DeepSeek-V2's router ignores it.
    pub reads_norm_topk: bool,
    pub default_norm_topk: bool,
    pub always_renormalize: bool,
    /// `e_score_correction_bias` added to the scores for the choice only (`noaux_tc`).
    pub correction_bias: bool,
    /// Reads `n_group` / `topk_group`; for softmax routers only when `topk_method` is
    /// `group_limited_greedy`.
    pub groups: Option<GroupScore>,
    /// Reads `routed_scaling_factor`.
    pub reads_scaling: bool,
    /// The module under the layer that holds `e_score_correction_bias`: the router
    /// (`mlp.gate`, DeepSeek), the MoE block (`mlp`, MiniMax-M2) or the router's statistics
    /// (`mlp.gate.moe_statics`, ERNIE-4.5, which stores it as `[1, E]`).
    pub bias_owner: &'static str,
}

/// Attention's form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum AttentionRow {
    /// q/k/v/o projections with grouped-query heads.
    Heads,
    /// Multi-head latent attention (DeepSeek-V2).
    Latent,
}

/// The shared expert's form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SharedRow {
    None,
    /// qwen2_moe: `shared_expert_intermediate_size`, sigmoid-gated, `mlp.shared_expert`.
    QwenGated,
    /// Hunyuan: one MLP of the experts' width at `<module>` (under the layer), summed.
    Plain {
        module: &'static str,
    },
    /// Granite MoE (shared): one MLP of `size_key`'s width (none when 0) at `<module>`, gate and
    /// up fused in `input_linear`, down `output_linear`, summed.
    Fused {
        module: &'static str,
        size_key: &'static str,
    },
    /// DeepSeek / GLM: `n_shared_experts` × `moe_intermediate_size`, summed, `mlp.shared_experts`
    /// (ERNIE-4.5: `moe_num_shared_experts`); the count's key and its default.
    Summed {
        count_key: &'static str,
        default_count: usize,
    },
}

/// One architecture as data.
pub(super) struct Row {
    pub experts_key: &'static str,
    /// Other spellings transformers' `attribute_map` accepts for the expert count.
    pub experts_alias: Option<&'static str>,
    /// The top-k key and another spelling of it (ERNIE-4.5: `moe_k`, `num_experts_per_tok`).
    pub top_k_key: &'static str,
    pub top_k_alias: Option<&'static str>,
    /// `tie_word_embeddings` when absent.
    pub default_tie: bool,
    /// Reads `use_bias` (ERNIE-4.5: biases on every projection and on `lm_head`), which moeq
    /// refuses when true.
    pub reads_use_bias: bool,
    /// (canonical, hub) spellings of name parts that differ in hub checkpoints beyond the
    /// experts (ERNIE-4.5's statistics sit under the MoE block there, under its router in
    /// transformers).
    pub hub_renames: &'static [(&'static str, &'static str)],
    /// The MoE block's module name in transformers (`mlp`; Granite: `block_sparse_moe`), which
    /// PEFT's expert adapter names carry.
    pub moe_module: &'static str,
    /// Reads Granite's µP multipliers: `embedding_multiplier`, `residual_multiplier`,
    /// `logits_scaling` (a divisor) and `attention_multiplier` (the softmax scale).
    pub reads_mup: bool,
    /// The router is a linear layer at `mlp.gate.wg` (Hunyuan), quantized as every linear
    /// layer is (transformers + bitsandbytes do); else a plain weight at `mlp.gate.weight`.
    pub router_linear: bool,
    /// The q/k norms' module names (`q_norm`, `k_norm`; Hunyuan `query_layernorm`,
    /// `key_layernorm`).
    pub qk_norm_names: (&'static str, &'static str),
    /// Reads `attention_head_dim` when `head_dim` is absent (Hunyuan's own configs), and the
    /// `alpha` of a `dynamic` rope (a larger base at every length).
    pub hunyuan_keys: bool,
    pub expert_intermediate_key: &'static str,
    /// The dense layers' MLP width (`intermediate_size`; Llama 4: `intermediate_size_mlp`).
    pub dense_intermediate_key: &'static str,
    pub router: RouterRow,
    pub moe_layers: MoeLayers,
    pub shared: SharedRow,
    pub attention: AttentionRow,
    pub qk_norm: QkNorm,
    /// Reads `use_qk_norm` (GLM-4.5): per-head q/k norms when true.
    pub reads_use_qk_norm: bool,
    pub default_qkv_bias: bool,
    /// Reads `attention_bias` (bias on q, k, v and, where `o_bias_follows`, o), and its
    /// value when absent.
    pub reads_attention_bias: bool,
    pub default_attention_bias: bool,
    pub o_bias_follows: bool,
    /// Reads `qkv_bias` (q, k, v only; default `default_qkv_bias`), else they follow the above.
    pub reads_qkv_bias: bool,
    /// Reads `clip_qkv` (q, k, v clamped to ±clip after projection).
    pub reads_clip_qkv: bool,
    /// `partial_rotary_factor` when absent (GLM-4.5: 0.5); None: not read (whole heads).
    pub default_partial_rotary: Option<f64>,
    /// Reads `rope_interleave` (DeepSeek-V3: rotary pairs are adjacent dims); the value when
    /// absent. DeepSeek-V2 always interleaves.
    pub default_rope_interleave: bool,
    pub reads_rope_interleave: bool,
    /// Reads `rotary_dim` (MiniMax-M2: the rotated dims of a head) when no
    /// `partial_rotary_factor` is given.
    pub reads_rotary_dim: bool,
    /// OLMo-2's layer (FlexOlmo): no norm before attention or the MLP, a norm on each one's
    /// output (`post_attention_layernorm`, `post_feedforward_layernorm`) before it joins the
    /// residual stream.
    pub post_norms: bool,
    /// The hub checkpoint names the MoE block as Mixtral's does: `block_sparse_moe.gate`,
    /// `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down).
    pub mixtral_hub_names: bool,
    /// gpt-oss: `layer_types` of sliding-window and full attention (`sliding_window`), sinks
    /// in every attention, biases on the experts and the router, the clamped GLU
    /// (`swiglu_limit`), yarn rope when none is given, experts stored `[E, in, out]`.
    pub gpt_oss_keys: bool,
    /// Llama 4: `no_rope_layers` (layers without rotary embedding, their q scaled by
    /// `attn_temperature_tuning`), `attention_chunk_size` on the rotary layers (`layer_types`),
    /// a weightless per-head q/k norm after the rotation on rotary layers (`use_qk_norm`), the
    /// router's weight on each expert's input, experts stored `[E, in, out]` with gate and up
    /// as halves, every MLP module under `feed_forward`.
    pub llama4_keys: bool,
    /// Qwen3-Next and Qwen3.5: Gated DeltaNet (linear attention) layers with these input
    /// projections between full-attention layers (`cfg_linear`), an output gate on full
    /// attention (q_proj twice as wide: each head's q then its gate), and zero-centred norm
    /// weights (every RMSNorm but the gated one scales by `1 + w`).
    pub hybrid: Option<super::cfg_linear::LinearProjections>,
    pub default_rope_theta: f64,
    pub default_eps: f64,
    pub default_max_positions: usize,
}
