//! Architectures as data: `ArchSpec` from config.json and the canonical parameter list.

mod backward;
mod decode;
pub mod exchange;
mod layers;
mod memory;
pub mod model;
mod params;
mod spec;

pub use backward::{AdapterGrads, LayerTape};
pub use decode::KvCache;
pub use exchange::{ExchangePlan, ExpertExchange};
pub use memory::{estimate, nf4_bytes, target_matches, FrozenFormat, LoraPlan, MemoryEstimate};
pub use model::{Inputs, LayerStats, LoraCtx, Model};
pub use params::{down_name, gate_up_name, Component, ParamInfo};
pub use spec::{
    ArchSpec, ModelType, QkNorm, RopeSpec, RouterSpec, SharedExpertSpec, SpecError,
    SUPPORTED_MODEL_TYPES,
};
