//! Architectures as data: `ArchSpec` from config.json and the canonical parameter list.

mod attn;
mod backward;
mod cfg;
mod cfg_heads;
mod cfg_linear;
mod cfg_llama4;
mod decode;
pub mod exchange;
mod inputs;
mod joint;
mod latent;
mod layers;
mod linear_attn;
mod memory;
mod mlp_tape;
pub mod model;
mod moe_tape;
mod params;
mod row_fields;
mod rows;
mod side;
mod spec;

pub use backward::{AdapterGrads, LayerTape};
pub use decode::KvCache;
pub use exchange::{ExchangePlan, ExpertExchange};
pub use memory::{estimate, nf4_bytes, target_matches, FrozenFormat, LoraPlan, MemoryEstimate};
pub use model::{Inputs, LayerStats, LoraCtx, Model};
pub use params::{down_name, gate_up_name, Component, ParamInfo};
pub use spec::{
    supported_model_types, ArchSpec, Glu, GroupLimit, GroupScore, LatentSpec, LinearAttnSpec,
    LinearProjections, ModelType, Mup, NopeTemperature, QkNorm, RopeSpec, Rotary, RouterSpec,
    Scoring, SharedExpertSpec, SpecError, LATENT_NORM_EPS,
};
