//! Training: optimizer and learning-rate schedule so far; the loop, per-layer recompute and
//! saving arrive with the trainer.

pub mod adamw;
pub mod loss;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::Schedule;
