//! Logging and progress reporting shared by every command.

pub mod logging;
pub mod mem;
pub mod phases;
pub mod prefetch;
pub mod progress;
