//! Shared by every command: the compute device, logging, memory accounting, phase timing,
//! ordered prefetch and progress reporting.

pub mod device;
pub mod gpu_lag;
pub mod logging;
pub mod mem;
pub mod phases;
pub mod prefetch;
pub mod progress;
pub mod switch;
