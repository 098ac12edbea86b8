//! Custom ops with a CPU reference and a CUDA implementation (kernels in `kernels/`), each
//! with a backward pass, tested against each other.

pub mod check;
pub mod kernels;
pub mod swiglu;

pub use swiglu::swiglu;
