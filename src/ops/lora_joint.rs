//! The adapters of projections that read one input — an attention's q, k and v, an MLP's gate
//! and up — with their factor products over that input joined (`JOINT_LORA`, on by default:
//! +1.3% at micro-batch 8 with `JOINT_IN_K`; `MOEQ_JOINT_LORA=0` turns it off for A/B runs;
//! docs/ARCHITECTURE.md decision 38, launch/bench/NOTES.md item 63).
//!
//! Each projection is `lora_linear`'s `y = (x·Wᵀ + bias) + s·(x·Aᵀ)·Bᵀ`, the sum rounded once.
//! Apart, each adapter reads x for its hidden `x·Aᵀ` in the forward (and in the recompute) and
//! for `dA = dhᵀ·x` in the backward, and adds `dh·A` into dx with a pass of its own over dx.
//! Joined, A stacked `[Σr, in]`: one product `x·Aᵀ` gives every hidden, one `dHᵀ·x` every dA,
//! and one `dH·A` adds them all into dx — for q, k and v at micro-batch 8 of the
//! Qwen3-30B-A3B shape (x `[16,384, 2,048]` bf16, 67 MB) two reads of x fewer in each forward
//! and in the backward and two passes over dx fewer (≈ 0.7 GB a layer, ≈ 0.2 ms predicted on
//! an H100; gate and up save one of each). The base products and each adapter's `s·h·Bᵀ` and
//! `dH`'s parts are those of the separate path; what changes is where the hiddens, dA and the
//! dx sum are rounded (one product over K = Σr instead of one over each r), so the values
//! agree within bf16 rounding, not bit for bit.

use super::grouped_gemm::{add_product, Gemm};
use super::lora_linear::backward_into;
use super::nf4_linear::{forward as nf4_forward, FrozenWeight};
use super::thin_gemm::{self, ThinPlan, MAX_RANK};
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{bail, DType, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

pub static JOINT_LORA: EnvSwitch = EnvSwitch::new("MOEQ_JOINT_LORA", true, ON_OFF);

/// The joined updates inside the base products' K ([`forward_wide`]; with `JOINT_LORA` only).
pub static JOINT_IN_K: EnvSwitch = EnvSwitch::new("MOEQ_JOINT_IN_K", true, ON_OFF);

/// Joined forwards so far, by their number of members (0 to 3, more counted as 3).
static FORWARDS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static WIDE_FORWARDS: AtomicU64 = AtomicU64::new(0);

/// How many joined forwards of `members` projections this process ran (what tests read to
/// know the path was taken: 3 for q/k/v, 2 for gate/up).
pub fn forwards(members: usize) -> u64 {
    FORWARDS[members.min(3)].load(Ordering::Relaxed)
}

/// How many of them had the updates inside the base products' K ([`forward_wide`]).
pub fn wide_forwards() -> u64 {
    WIDE_FORWARDS.load(Ordering::Relaxed)
}

/// One projection of the group: its frozen weight and bias, and its factors A `[r, in]` and B
/// `[out, r]` in x's dtype.
pub(crate) struct Member<'a> {
    pub w: &'a FrozenWeight,
    pub bias: Option<&'a Tensor>,
    pub a: Tensor,
    pub b: Tensor,
}

/// What [`backward`] needs of the forward: A stacked, each B and hidden `x·Aᵀ` `[N, r]`.
pub(crate) struct JointTape {
    a: Tensor,
    parts: Vec<(Tensor, Tensor)>,
    scaling: f64,
}

/// That every member fits `inf` inputs (A `[r, inf]`, B `[out, r]` for a `[out, inf]`
/// weight), biases only where `biases`; x (the rows as given) for the message.
fn check(x: &Tensor, members: &[Member], inf: usize, biases: bool) -> Result<()> {
    for m in members {
        let (r, ain) = m.a.dims2()?;
        let (wo, wi) = (m.w.out_features(), m.w.in_features());
        let bias = m.bias.is_some() && !biases;
        if wi != inf || ain != inf || m.b.dims2()? != (wo, r) || bias {
            bail!(
                "joint lora: rows {:?}, a {:?}, b {:?}, bias {} for a [{wo}, {wi}] weight",
                x.dims(),
                m.a.dims(),
                m.b.dims(),
                m.bias.is_some()
            );
        }
    }
    Ok(())
}

/// Each member's output for x `[N, in]` (without a graph), and the tape.
pub(crate) fn forward(
    x: &Tensor,
    members: &[Member],
    scaling: f64,
) -> Result<(Vec<Tensor>, JointTape)> {
    check(x, members, x.dim(1)?, true)?;
    FORWARDS[members.len().min(3)].fetch_add(1, Ordering::Relaxed);
    let x = super::at_offset_zero(x)?;
    let a = Tensor::cat(&members.iter().map(|m| &m.a).collect::<Vec<_>>(), 0)?;
    let h = x.matmul(&a.t()?)?; // [N, Σr]
    let (mut ys, mut parts, mut at) = (Vec::new(), Vec::new(), 0);
    for m in members {
        let r = m.a.dim(0)?;
        let hm = h.narrow(1, at, r)?.contiguous()?;
        at += r;
        let mut y = nf4_forward(&x, m.w)?;
        if let Some(bias) = m.bias {
            y = y.broadcast_add(bias)?;
        }
        ys.push(super::direct(add_product(
            y,
            &hm,
            &m.b,
            Gemm::nt(scaling),
        )?)?);
        parts.push((m.b.clone(), hm));
    }
    Ok((ys, JointTape { a, parts, scaling }))
}

/// Whether the hiddens of `members` go inside the base products' K over `x`'s rows: the
/// switch on, 4-bit weights (a 16-bit base's product reads its weight in place; widened it
/// would be copied every pass), no bias (its sum would come in another order), and the thin
/// kernels' shapes — Σr a multiple of 8 up to `MAX_RANK`, the inputs a multiple of 8 — asked
/// on every device so the CPU and the GPU take the same path; bf16, or f32 on the CPU (the
/// tests' reference). Some(Σr) where they do.
pub(crate) fn in_k_fits(x: &Tensor, members: &[(&FrozenWeight, bool, usize)]) -> Option<usize> {
    let ranks: usize = members.iter().map(|m| m.2).sum();
    let inf = x.dim(1).unwrap_or(0);
    let four_bit = members.iter().all(|m| matches!(m.0, FrozenWeight::Nf4(_)));
    let biased = members.iter().any(|m| m.1);
    let shapes = ranks > 0 && ranks % 8 == 0 && ranks <= MAX_RANK && inf % 8 == 0;
    let dtype = match x.dtype() {
        DType::BF16 => true,
        DType::F32 => !x.device().is_cuda(),
        _ => false,
    };
    (JOINT_IN_K.get() && four_bit && !biased && shapes && dtype).then_some(ranks)
}

/// [`forward`] over wide rows `xw` `[N, in + Σr]` (the input in the first `in` columns, e.g.
/// `norm::rms_norm_wide`'s; the hiddens are written into the last Σr here) with each update
/// inside its base product's K: `y = [x | H]·[W | 0 … s·B … 0]ᵀ`, s·B in the member's own
/// columns of H. The pass that added each update to its output is gone (a read and a write of
/// the output), and the sum is rounded once in the product's accumulator.
pub(crate) fn forward_wide(
    xw: &Tensor,
    members: &[Member],
    scaling: f64,
) -> Result<(Vec<Tensor>, JointTape)> {
    let (n, wide) = xw.dims2()?;
    let ranks: usize = members.iter().map(|m| m.a.dim(0)).sum::<Result<usize>>()?;
    let inf = wide.saturating_sub(ranks);
    check(xw, members, inf, false)?;
    if !xw.is_contiguous() {
        bail!("joint lora in K: the wide rows must be contiguous");
    }
    FORWARDS[members.len().min(3)].fetch_add(1, Ordering::Relaxed);
    WIDE_FORWARDS.fetch_add(1, Ordering::Relaxed);
    let a = Tensor::cat(&members.iter().map(|m| &m.a).collect::<Vec<_>>(), 0)?;
    let (x, h) = (xw.narrow(1, 0, inf)?, xw.narrow(1, inf, ranks)?);
    let plan = ThinPlan::new(vec![(0, 0, n)]);
    if plan.applies(&x, ranks, &[inf]) {
        thin_gemm::project_into(&x, &a.unsqueeze(0)?, &plan, 1.0, &h)?;
    } else {
        xw.slice_set(&x.contiguous()?.matmul(&a.t()?)?, 1, inf)?;
    }
    let (mut ys, mut parts, mut at) = (Vec::new(), Vec::new(), 0);
    for m in members {
        let (out, r) = m.b.dims2()?;
        let zeros = |c: usize| Tensor::zeros((out, c), xw.dtype(), xw.device());
        let mut tail = Vec::new();
        if at > 0 {
            tail.push(zeros(at)?);
        }
        tail.push((&m.b * scaling)?);
        if at + r < ranks {
            tail.push(zeros(ranks - at - r)?);
        }
        let w = m.w.values_wide(xw.dtype(), &Tensor::cat(&tail, 1)?)?;
        ys.push(super::direct(xw.matmul(&w.t()?)?)?);
        parts.push((m.b.clone(), h.narrow(1, at, r)?.contiguous()?));
        at += r;
    }
    Ok((ys, JointTape { a, parts, scaling }))
}

/// dx for the members' upstream gradients `dys` (in the members' order), added into `dx_into`
/// where given (as `lora_linear::backward_into`), and each member's (dA, dB), x the forward's
/// input.
pub(crate) fn backward(
    x: &Tensor,
    ws: &[&FrozenWeight],
    tape: JointTape,
    dys: &[Tensor],
    dx_into: Option<Tensor>,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    if ws.len() != dys.len() || ws.len() != tape.parts.len() || ws.is_empty() {
        bail!(
            "joint lora: {} weights, {} gradients, {} adapters",
            ws.len(),
            dys.len(),
            tape.parts.len()
        );
    }
    let s = tape.scaling;
    let mut dx = dx_into;
    for (w, dy) in ws.iter().zip(dys) {
        dx = Some(backward_into(x, w, None, dy, dx)?.0);
    }
    let (mut dh, mut db) = (Vec::new(), Vec::new());
    for ((b, h), dy) in tape.parts.iter().zip(dys) {
        let dy = dy.to_dtype(x.dtype())?;
        db.push((dy.t()?.matmul(h)? * s)?); // [out, r]
        dh.push((dy.matmul(b)? * s)?); // [N, r]
    }
    let dh = Tensor::cat(&dh, 1)?; // [N, Σr]
    let da = factor_grad(&dh, x, ws[0].in_features())?; // [Σr, in]
    let dx = match dx {
        Some(dx) => add_product(dx, &dh, &tape.a, Gemm::nn(1.0))?,
        None => bail!("joint lora: no members"),
    };
    let (mut grads, mut at) = (Vec::new(), 0);
    for ((_, h), db) in tape.parts.iter().zip(db) {
        let r = h.dim(1)?;
        grads.push((da.narrow(0, at, r)?.contiguous()?, db));
        at += r;
    }
    Ok((dx, grads))
}

/// dA = dHᵀ·x `[Σr, in]`: x the forward's input `[N, in]`, or its wide rows (`[N, in + Σr]`,
/// [`forward_wide`]'s), read in place by the thin kernel where it serves them.
fn factor_grad(dh: &Tensor, x: &Tensor, inf: usize) -> Result<Tensor> {
    if x.dim(1)? == inf {
        return dh.t()?.matmul(x);
    }
    let (n, ranks) = dh.dims2()?;
    let x = x.narrow(1, 0, inf)?;
    let plan = ThinPlan::new(vec![(0, 0, n)]);
    if plan.applies(&x, ranks, &[inf]) {
        return thin_gemm::outer(dh, &x, &plan, 1, 1.0)?.squeeze(0);
    }
    dh.t()?.matmul(&x.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::{backward, forward, forward_wide, Member};
    use crate::ops::lora_linear::{backward_into, forward_taped};
    use crate::ops::nf4_linear::{FrozenWeight, Nf4Weight};
    use crate::quant::{QuantSettings, QuantizedParam};
    use candle_core::{DType, Device, Result, Tensor};

    fn max_abs(t: &Tensor) -> Result<f32> {
        t.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    /// Three projections of one input (a q of 48 outputs, k and v of 16) on the CPU, joined
    /// against `lora_linear`'s separate forward and backward with the same factors, s = 1.7
    /// (not a power of two: in K, s·B is rounded where the separate path scales in the
    /// product): apart from K with rank 4 and a bias on k, in K with rank 8 (Σr = 24) over
    /// wide rows. In f32 within 1e-5 of each tensor's scale (the same sums in another order,
    /// f32 rounding of O(1) terms), in bf16 within 2e-2 (a bf16 rounding of the hidden, of s·B
    /// or of the dx sum placed differently: ≈ 2⁻⁸ of the scale, a few times).
    #[test]
    fn joined_factor_products_give_the_separate_projections() -> Result<()> {
        let cpu = &Device::Cpu;
        let (n, inf, s) = (11usize, 64usize, 1.7);
        let outs = [48usize, 16, 16];
        for (wide, r) in [(false, 4usize), (true, 8)] {
            for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
                let ws = outs
                    .iter()
                    .map(|&o| {
                        let w: Vec<f32> = Tensor::randn(0f32, 0.1, o * inf, cpu)?.to_vec1()?;
                        let q = QuantizedParam::quantize(&w, &[o, inf], QuantSettings::default())
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        Ok(FrozenWeight::Nf4(Nf4Weight::from_param(&q, cpu)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let rnd = |shape: (usize, usize), s: f32| {
                    Tensor::randn(0f32, s, shape, cpu)?.to_dtype(dtype)
                };
                let bias = rnd((1, outs[1]), 0.5)?.squeeze(0)?;
                let x = rnd((n, inf), 1.0)?;
                let factors = outs
                    .iter()
                    .map(|&o| Ok((rnd((r, inf), 0.2)?, rnd((o, r), 0.2)?)))
                    .collect::<Result<Vec<_>>>()?;
                let members: Vec<Member> = ws
                    .iter()
                    .zip(&factors)
                    .enumerate()
                    .map(|(i, (w, (a, b)))| Member {
                        w,
                        bias: (i == 1 && !wide).then_some(&bias),
                        a: a.clone(),
                        b: b.clone(),
                    })
                    .collect();
                // In K: the rows 3r wider, their tail ones (what the forward overwrites).
                let xin = match wide {
                    false => x.clone(),
                    true => Tensor::cat(&[&x, &Tensor::ones((n, 3 * r), dtype, cpu)?], 1)?,
                };
                let (ys, tape) = match wide {
                    false => forward(&xin, &members, s)?,
                    true => forward_wide(&xin, &members, s)?,
                };
                let dys = outs
                    .iter()
                    .map(|&o| rnd((n, o), 1.0))
                    .collect::<Result<Vec<_>>>()?;
                let wr: Vec<&FrozenWeight> = ws.iter().collect();
                let (dx, grads) = backward(&xin, &wr, tape, &dys, None)?;
                let mut want_dx: Option<Tensor> = None;
                for (i, m) in members.iter().enumerate() {
                    let (y, t) = forward_taped(&x, m.w, m.bias, (&m.a, &m.b), s, None)?;
                    let close = |got: &Tensor, want: &Tensor, what: &str| -> Result<()> {
                        let scale = max_abs(want)?;
                        assert!(scale > 0.05, "{what}: a zero tensor checks nothing");
                        let (g, w) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
                        let d = max_abs(&(g - w)?)?;
                        assert!(
                            d <= tol * scale,
                            "{dtype:?} in K {wide} {what} {i}: off by {d} ({scale})"
                        );
                        Ok(())
                    };
                    close(&ys[i], &y, "output")?;
                    let (d, f) = backward_into(&x, m.w, Some(&t), &dys[i], want_dx.take())?;
                    want_dx = Some(d);
                    let (da, db) = f.expect("an adapter's gradients");
                    close(&grads[i].0, &da, "dA")?;
                    close(&grads[i].1, &db, "dB")?;
                }
                let want_dx = want_dx.expect("three members");
                let scale = max_abs(&want_dx)?;
                let d = max_abs(&(dx.to_dtype(DType::F32)? - want_dx.to_dtype(DType::F32)?)?)?;
                assert!(
                    d <= tol * scale,
                    "{dtype:?} in K {wide} dx off by {d} ({scale})"
                );
            }
        }
        Ok(())
    }
}
