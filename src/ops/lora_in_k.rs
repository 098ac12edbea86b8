//! The expert adapters inside the base products' K (`LORA_IN_K`, on unless `MOEQ_LORA_IN_K=0`:
//! +3.3% tokens/s with expert LoRA at micro-batch 8, launch/bench/NOTES.md items 58 and 59).
//!
//! A projection's output with its adapter, x·Wᵀ + s·(x·Aᵀ)·Bᵀ, is one product over K + r:
//! [x | h]·[W | s·B]ᵀ with h = x·Aᵀ. gate_up's rows are gathered r columns wider than the
//! hidden size (`routing::gather_forward_wide`), down's activations written r columns wider
//! than I (`swiglu::packed_forward_wide`); h is projected into those last columns
//! (`thin_gemm::project_into`), and each dequantized chunk of experts is laid `[E_c, out, in +
//! r]` with s·B_e in the last r columns of each row (`ExpertWeights::dequantize_with`). The
//! update joins the base product's accumulation — one rounding of the sum, where the separate
//! update rounds it and then the addition — and the pass that added it to the output is gone
//! (a read and a write of the output: at micro-batch 8 ≈ 0.8 GB for gate_up, in the forward
//! and the recompute, ≈ 1.1 GB for down, in the forward). The products' K grows by r. The
//! backward reads x and h where they lie: row-strided views of the one buffer, which the thin
//! kernels read in place.

use super::experts::{expert_matmul_with, ExpertWeights};
use super::grouped_lora::{lora_factors, GroupedLora};
use super::routing::{gather_forward, gather_forward_wide, RowOrder};
use super::thin_gemm::{self, MAX_RANK};
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{bail, DType, Result, Tensor};

pub static LORA_IN_K: EnvSwitch = EnvSwitch::new("MOEQ_LORA_IN_K", true, ON_OFF);

/// The routed rows of `x` `[N, H]` by expert: `[N·k, H]`, or `[N·k, H + r]` for gate_up's
/// adapter of rank r (`in_k`: Some(r) where the rows may take it — one rank, unscaled rows)
/// where it [`fits`]. The last r columns are left to [`forward`].
pub(crate) fn gather_rows(x: &Tensor, order: &RowOrder, in_k: Option<usize>) -> Result<Tensor> {
    match in_k {
        Some(r) if fits(x, r, x.dim(1)?) => gather_forward_wide(x, order, r),
        _ => gather_forward(x, order),
    }
}

/// Whether an adapter of rank `r` goes inside the K of a product over rows of `cols` inputs
/// in `x`'s dtype and device: the switch on, r and cols multiples of 8 and r ≤ `MAX_RANK` (the
/// thin kernels' shapes, required on every device so that the CPU and the GPU take the same
/// path for the same model), bf16 — or f32 on the CPU (the tests' reference; f32 on CUDA keeps
/// the separate update: the thin kernels are bf16).
pub(crate) fn fits(x: &Tensor, r: usize, cols: usize) -> bool {
    let shapes = r > 0 && r % 8 == 0 && r <= MAX_RANK && cols % 8 == 0;
    let dtype = match x.dtype() {
        DType::BF16 => true,
        DType::F32 => !x.device().is_cuda(),
        _ => false,
    };
    LORA_IN_K.get() && shapes && dtype
}

/// Whether `w`'s adapter of rank `r` goes inside its product's K over rows of `cols` in `x`:
/// the weights take it (`ExpertWeights::takes_in_k`: 4-bit) and `fits` (the row gathers ask
/// the weights first and `fits` inside `gather_rows`: the same decision).
pub(crate) fn takes(w: &ExpertWeights, x: &Tensor, r: usize, cols: usize) -> bool {
    w.takes_in_k() && fits(x, r, cols)
}

/// The output over wide rows `xw` `[M, in + r]` (the projection's input in the first `in`
/// columns; the last r are written here) with the adapter (A `[r·E, in]`, B `[out, r·E]`) in
/// the product's K → (the output `[M, out]`, h = x·Aᵀ as a view `[M, r]` of xw's last
/// columns: the hidden `GroupedLora::forward_into` gives, the same values).
pub(crate) fn forward(
    l: &GroupedLora,
    xw: &Tensor,
    w: &ExpertWeights,
    (a, b): (&Tensor, &Tensor),
    chunk_bytes: usize,
) -> Result<(Tensor, Tensor)> {
    let (m, wide) = xw.dims2()?;
    let (inp, r) = (w.in_features, l.r);
    if wide != inp + r || !xw.is_contiguous() {
        bail!(
            "lora in K: rows {:?} for {inp} inputs and rank {r}",
            xw.dims()
        );
    }
    let (a3, b3) = lora_factors(a, b, r, xw.dtype())?;
    let (x, h) = (xw.narrow(1, 0, inp)?, xw.narrow(1, inp, r)?);
    if l.plan.applies(&x, r, &[inp, b.dim(0)?]) {
        thin_gemm::project_into(&x, &a3, &l.plan, 1.0, &h)?;
    } else {
        xw.slice_set(&l.hidden(&x, &a3)?.reshape((m, r))?, 1, inp)?;
    }
    let tail = (b3.narrow(0, l.first, l.counts.len())? * l.scaling)?;
    let y = expert_matmul_with(xw, w, &l.counts, (true, chunk_bytes), &tail)?;
    Ok((y, h))
}

/// The input gradient through a projection whose adapter sat inside its K, and the
/// adapter's gradients: dyw `[M, out + r]` (dy in the first `out` columns; dh = s·dy·B is
/// written into the last r) → (dx = [dy | dh]·[W; A] `[M, in]`, dA, dB), with the forward's x
/// `[M, in]` and h `[M, r]` (views where they lie). The same dh, dA and dB as
/// `GroupedLora::backward_into`; dx summed in the product's accumulator.
pub(crate) fn backward(
    l: &GroupedLora,
    dyw: &Tensor,
    w: &ExpertWeights,
    (a, b): (&Tensor, &Tensor),
    (x, h): (&Tensor, &Tensor),
    chunk_bytes: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (out, r) = (w.out_features, l.r);
    if dyw.dim(1)? != out + r || !dyw.is_contiguous() {
        bail!(
            "lora in K: gradient rows {:?} for {out} outputs and rank {r}",
            dyw.dims()
        );
    }
    let (dy, inp) = (dyw.narrow(1, 0, out)?, w.in_features);
    let dh = l.back_project(&dy, (b, inp), Some((dyw, out)))?;
    let (da, db) = l.factor_grads(x, &dy, (h, &dh), (a, b))?;
    // A per expert [E, r, in] (`lora_factors`' A), the local experts' below their rows.
    let a3 = a.to_dtype(dyw.dtype())?.reshape((a.dim(0)? / r, r, inp))?;
    let tail = a3.narrow(0, l.first, l.counts.len())?;
    let dx = expert_matmul_with(dyw, w, &l.counts, (false, chunk_bytes), &tail)?;
    Ok((dx, da, db))
}

/// `t` `[M, c]` as rows `extra` wider for [`backward`]: itself where it already is, else a
/// copy with room (the graph node's combine backward gives plain rows).
pub(crate) fn widen(t: Tensor, c: usize, extra: usize) -> Result<Tensor> {
    if t.dim(1)? == c + extra && t.is_contiguous() {
        return Ok(t);
    }
    let pad = Tensor::zeros((t.dim(0)?, extra), t.dtype(), t.device())?;
    Tensor::cat(&[&t.narrow(1, 0, c)?, &pad], 1)
}

#[cfg(test)]
mod tests {
    use super::forward;
    use crate::ops::experts::{ExpertWeights, GroupedLora};
    use crate::ops::nf4_linear::Nf4Weight;
    use crate::quant::{QuantSettings, QuantizedParam};
    use candle_core::{DType, Device, Result, Tensor};

    /// Against the separate update (`GroupedLora::forward_into` on the base product), f32 on
    /// the CPU, chunks of 3 experts (some without rows): the same sums in another order, so
    /// within f32 rounding (1e-5 of the output's scale: K = 64 + 8 terms of O(1)).
    #[test]
    fn the_update_in_k_is_the_separate_update() -> Result<()> {
        let cpu = &Device::Cpu;
        let (e, inp, out, r) = (7usize, 64usize, 48usize, 8usize);
        let counts = [5usize, 0, 9, 3, 0, 0, 6];
        let m: usize = counts.iter().sum();
        let ws = (0..e)
            .map(|_| {
                let w: Vec<f32> = Tensor::randn(0f32, 0.1, out * inp, cpu)?.to_vec1()?;
                let q = QuantizedParam::quantize(&w, &[out, inp], QuantSettings::default())
                    .map_err(|err| candle_core::Error::Msg(err.to_string()))?;
                Nf4Weight::from_param(&q, cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        let w = ExpertWeights::stack(&ws)?;
        let a = Tensor::randn(0f32, 0.2, (r * e, inp), cpu)?;
        let b = Tensor::randn(0f32, 0.2, (out, r * e), cpu)?;
        let x = Tensor::randn(0f32, 1.0, (m, inp), cpu)?;
        let l = GroupedLora::new(&counts, 0, r, 2.0);
        let chunk = 3 * out * (inp + r) * DType::F32.size_in_bytes();
        let xw = Tensor::cat(&[&x, &Tensor::zeros((m, r), DType::F32, cpu)?], 1)?;
        let (y, h) = forward(&l, &xw, &w, (&a, &b), chunk)?;
        let base = crate::ops::experts::expert_matmul(&x, &w, &counts, true, chunk)?;
        let (want, want_h) = l.forward_into(base, &x, &a, &b)?;
        let diff = |p: &Tensor, q: &Tensor| -> Result<f32> {
            (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(scale > 0.1, "a zero output checks nothing");
        let d = diff(&y, &want)?;
        assert!(d <= 1e-5 * scale, "output off by {d} (scale {scale})");
        assert_eq!(diff(&h, &want_h)?, 0.0, "the hidden is the same product");
        // The rows themselves are untouched.
        assert_eq!(diff(&xw.narrow(1, 0, inp)?, &x)?, 0.0);
        Ok(())
    }
}
