//! Routing weights on the experts' input (Llama 4): each routed row of x is multiplied by its
//! slot's weight before the expert, and the expert outputs are summed unweighted. transformers
//! rounds the weight to x's dtype and the product once: `x · w` in x's dtype.

use super::routing::RowOrder;
use candle_core::{DType, Result, Tensor};

/// Each slot's weight in the routed rows' order `[M, 1]`, rounded to `dtype`, as f32.
fn row_weights(w: &Tensor, order: &RowOrder, dtype: DType) -> Result<Tensor> {
    w.flatten_all()?
        .index_select(&order.slots, 0)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)
}

/// Routed rows xs `[M, H]` (in `order`) times their slots' weights `w [N, k]` (f32) → `[M, H]`
/// in xs's dtype. Differentiable through candle's graph when an input records one.
pub fn scale_rows(xs: &Tensor, w: &Tensor, order: &RowOrder) -> Result<Tensor> {
    let dtype = xs.dtype();
    xs.to_dtype(DType::F32)?
        .broadcast_mul(&row_weights(w, order, dtype)?)?
        .to_dtype(dtype)
}

/// The backward of [`scale_rows`]: (the gradient of its output `[M, H]`, its input xs, w) →
/// (dxs `[M, H]` in xs's dtype, dw `[N, k]` in w's dtype; f32 sums).
pub fn scale_rows_backward(
    d: &Tensor,
    xs: &Tensor,
    w: &Tensor,
    order: &RowOrder,
) -> Result<(Tensor, Tensor)> {
    let d32 = d.to_dtype(DType::F32)?;
    let dxs = d32
        .broadcast_mul(&row_weights(w, order, xs.dtype())?)?
        .to_dtype(xs.dtype())?;
    let per_row = (d32 * xs.to_dtype(DType::F32)?)?.sum(1)?; // [M]
    let dw = per_row
        .index_select(&order.inv, 0)?
        .reshape(w.dims2()?)?
        .to_dtype(w.dtype())?;
    Ok((dxs, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The hand-written backward equals candle's autograd through `scale_rows` (random rows
    /// and weights; f32 throughout, so only the sums' order differs: 1e-6 relative).
    #[test]
    fn backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, h) = (5, 2, 7);
        // Slot t·k + j of row r: a permutation of the 10 slots.
        let slots: Vec<u32> = vec![3, 0, 7, 9, 1, 4, 8, 2, 6, 5];
        let tokens: Vec<u32> = slots.iter().map(|s| s / k as u32).collect();
        let order = RowOrder::new(tokens, slots, k, &dev)?;
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n * k, h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::rand(0f32, 1.0, (n, k), &dev)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (n * k, h), &dev)?;
        let out = scale_rows(xs.as_tensor(), w.as_tensor(), &order)?;
        let grads = (out * &upstream)?.sum_all()?.backward()?;
        let (dxs, dw) = scale_rows_backward(&upstream, xs.as_tensor(), w.as_tensor(), &order)?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let want_dxs = grads.get(xs.as_tensor()).expect("dxs");
        let want_dw = grads.get(w.as_tensor()).expect("dw");
        assert!(rel(&dxs, want_dxs)? < 1e-6, "dxs");
        assert!(rel(&dw, want_dw)? < 1e-6, "dw");
        Ok(())
    }
}
