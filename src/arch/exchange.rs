//! What an MoE layer needs from expert parallelism, declared by the model and implemented by
//! the distributed layer (`distributed::dispatch::ExpertParallel`), so the model never names a
//! rank or a communicator (docs/ARCHITECTURE.md, decision 4).
//!
//! One MoE layer with an exchange: the router's rows, sorted by global expert, go to their
//! experts' owners (`dispatch`), the held experts compute them, and the outputs come back in
//! the original row order (`combine`); the weighted sum happens where the rows came from.

use candle_core::{Device, Result, Tensor};
use std::ops::Range;

/// The experts this process holds and how routed rows reach them. `Send + Sync` like the
/// model that holds it.
pub trait ExpertExchange: Send + Sync {
    /// Global indices of the experts held here (all of them when nothing is spread).
    fn held(&self) -> Range<usize>;

    /// The exchange of one layer for one micro-batch: `counts[e]` is this process's rows for
    /// global expert e. Called once per layer and micro-batch; the recompute replays the plan.
    fn plan(&self, counts: &[usize], device: &Device) -> Result<Box<dyn ExchangePlan>>;
}

/// One planned exchange. Both directions are differentiable: the gradient of each travels back
/// the way its rows came (the backward of `dispatch` is a `combine`-shaped exchange and vice
/// versa), so a layer's backward runs the same exchanges in reverse on every process.
pub trait ExchangePlan {
    /// xs [M, H] sorted by global expert → [R, H] grouped by held expert.
    fn dispatch(&self, xs: &Tensor) -> Result<Tensor>;

    /// y [R, H] grouped by held expert → [M, H] in the order of the dispatched `xs`.
    fn combine(&self, y: &Tensor) -> Result<Tensor>;

    /// Rows per held expert after `dispatch`.
    fn held_counts(&self) -> &[usize];
}
