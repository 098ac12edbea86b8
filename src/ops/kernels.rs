//! PTX of `kernels/*.cu`, compiled by build.rs when the `cuda` feature is on.

#[cfg(feature = "cuda")]
pub const ADD: &str = include_str!(concat!(env!("OUT_DIR"), "/add.ptx"));

#[cfg(feature = "cuda")]
pub const SWIGLU: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

#[cfg(feature = "cuda")]
pub const NF4: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));

#[cfg(feature = "cuda")]
pub const ATTN_SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/attn_softmax.ptx"));

#[cfg(feature = "cuda")]
pub const ROUTING: &str = include_str!(concat!(env!("OUT_DIR"), "/routing.ptx"));

#[cfg(feature = "cuda")]
pub const ROUTER: &str = include_str!(concat!(env!("OUT_DIR"), "/router.ptx"));

#[cfg(feature = "cuda")]
pub const RMS_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

#[cfg(feature = "cuda")]
pub const RANDOM: &str = include_str!(concat!(env!("OUT_DIR"), "/random.ptx"));

#[cfg(feature = "cuda")]
pub const CROSS_ENTROPY: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));

#[cfg(feature = "cuda")]
pub const NORM_ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_rope.ptx"));

#[cfg(feature = "cuda")]
pub const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));

#[cfg(feature = "cuda")]
pub const FLASH_ATTN: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));

#[cfg(feature = "cuda")]
pub const LORA: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));

#[cfg(feature = "cuda")]
pub const ADAMW: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

#[cfg(feature = "cuda")]
pub const GROUPED_LORA: &str = include_str!(concat!(env!("OUT_DIR"), "/grouped_lora.ptx"));

#[cfg(feature = "cuda")]
pub const ADAMW8: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw8.ptx"));

#[cfg(feature = "cuda")]
pub const DELTA_CARRY: &str = include_str!(concat!(env!("OUT_DIR"), "/delta_carry.ptx"));

#[cfg(feature = "cuda")]
pub const DELTA_CHUNK: &str = include_str!(concat!(env!("OUT_DIR"), "/delta_chunk.ptx"));

#[cfg(feature = "cuda")]
pub const DELTA_RULE: &str = include_str!(concat!(env!("OUT_DIR"), "/delta_rule.ptx"));

#[cfg(feature = "cuda")]
pub const CONV_SILU: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_silu.ptx"));

#[cfg(feature = "cuda")]
pub const DELTA_PREP: &str = include_str!(concat!(env!("OUT_DIR"), "/delta_prep.ptx"));

#[cfg(feature = "cuda")]
pub const GATED_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/gated_norm.ptx"));
