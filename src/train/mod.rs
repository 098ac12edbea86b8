//! Training: the loop (`trainer`), per-layer recompute (`step`), optimizer, schedules, the
//! chunked loss and run setup.

pub mod adamw;
pub mod check;
pub mod checkpoint;
mod error;
pub mod loss;
mod metrics;
pub mod output;
mod ranks;
mod resume;
pub mod schedule;
pub mod setup;
pub mod step;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::Schedule;
