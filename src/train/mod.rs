//! Training: a run assembled from its config (`run`), built on each rank (`build`), the loop
//! (`trainer`) of optimizer steps (`optimizer_step`) over micro-batches with per-layer
//! recompute (`step`), reported (`report`: metrics, evaluation, checkpoints); AdamW with fp32
//! state, schedules, the chunked loss, training checkpoints and resume, the final adapter.

pub mod adamw;
pub mod adamw8;
mod build;
pub mod checkpoint;
mod error;
pub mod loss;
mod metrics;
mod optimizer_step;
pub mod output;
pub mod plot;
mod ranks;
mod report;
mod resume;
mod run;
pub mod schedule;
pub mod setup;
pub mod step;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use error::TrainError;
pub use report::eval_set;
pub use run::run;
pub use schedule::Schedule;
pub use trainer::{EvalResult, Summary};
