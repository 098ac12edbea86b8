//! The adapters of projections that read one input — an attention's q, k and v — with their
//! factor products over that input joined (`JOINT_LORA`, off by default until measured:
//! `MOEQ_JOINT_LORA=1`; launch/bench/NOTES.md item 63).
//!
//! Each projection is `lora_linear`'s `y = (x·Wᵀ + bias) + s·(x·Aᵀ)·Bᵀ`, the sum rounded once.
//! Apart, each adapter reads x for its hidden `x·Aᵀ` in the forward (and in the recompute) and
//! for `dA = dhᵀ·x` in the backward, and adds `dh·A` into dx with a pass of its own over dx.
//! Joined, A stacked `[Σr, in]`: one product `x·Aᵀ` gives every hidden, one `dHᵀ·x` every dA,
//! and one `dH·A` adds them all into dx — at micro-batch 8 of the Qwen3-30B-A3B shape (x
//! `[16,384, 2,048]` bf16, 67 MB) two reads of x fewer in each forward and in the backward and
//! two passes over dx fewer (≈ 0.7 GB a layer, ≈ 0.2 ms on an H100). The base products and
//! each adapter's `s·h·Bᵀ` and `dH`'s parts are those of the separate path; what changes is
//! where the hiddens, dA and the dx sum are rounded (one product over K = Σr instead of three
//! over r), so the values agree within bf16 rounding, not bit for bit.

use super::grouped_gemm::{add_product, Gemm};
use super::lora_linear::backward_into;
use super::nf4_linear::{forward as nf4_forward, FrozenWeight};
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::{bail, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

pub static JOINT_LORA: EnvSwitch = EnvSwitch::new("MOEQ_JOINT_LORA", false, ON_OFF);

static FORWARDS: AtomicU64 = AtomicU64::new(0);

/// How many joined forwards this process ran (what tests read to know the path was taken).
pub fn forwards() -> u64 {
    FORWARDS.load(Ordering::Relaxed)
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

/// Each member's output for x `[N, in]` (without a graph), and the tape.
pub(crate) fn forward(
    x: &Tensor,
    members: &[Member],
    scaling: f64,
) -> Result<(Vec<Tensor>, JointTape)> {
    let (_, inf) = x.dims2()?;
    for m in members {
        let (r, ain) = m.a.dims2()?;
        let (wo, wi) = (m.w.out_features(), m.w.in_features());
        if wi != inf || ain != inf || m.b.dims2()? != (wo, r) {
            bail!(
                "joint lora: x {:?}, a {:?}, b {:?} for a [{wo}, {wi}] weight",
                x.dims(),
                m.a.dims(),
                m.b.dims()
            );
        }
    }
    FORWARDS.fetch_add(1, Ordering::Relaxed);
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

/// dx for the members' upstream gradients `dys` (in the members' order) and each member's
/// (dA, dB), x the forward's input.
pub(crate) fn backward(
    x: &Tensor,
    ws: &[&FrozenWeight],
    tape: JointTape,
    dys: &[Tensor],
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
    let mut dx = None;
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
    let da = dh.t()?.matmul(x)?; // [Σr, in]
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

#[cfg(test)]
mod tests {
    use super::{backward, forward, Member};
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

    /// Three projections of one input (a q of 48 outputs, k and v of 16, one with a bias) on
    /// the CPU, joined against `lora_linear`'s separate forward and backward with the same
    /// factors: in f32 within 1e-5 of each tensor's scale (the same sums, dA and dx's update
    /// over K = 3r instead of three products of r: f32 rounding of O(1) terms), in bf16 within
    /// 2e-2 (one bf16 rounding of the hidden or of the dx sum placed differently: ≈ 2⁻⁸ of the
    /// scale, twice).
    #[test]
    fn joined_factor_products_give_the_separate_projections() -> Result<()> {
        let cpu = &Device::Cpu;
        let (n, inf, r) = (11usize, 64usize, 4usize);
        let outs = [48usize, 16, 16];
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
            let rnd =
                |shape: (usize, usize), s: f32| Tensor::randn(0f32, s, shape, cpu)?.to_dtype(dtype);
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
                    bias: (i == 1).then_some(&bias),
                    a: a.clone(),
                    b: b.clone(),
                })
                .collect();
            let (ys, tape) = forward(&x, &members, 2.0)?;
            let dys = outs
                .iter()
                .map(|&o| rnd((n, o), 1.0))
                .collect::<Result<Vec<_>>>()?;
            let wr: Vec<&FrozenWeight> = ws.iter().collect();
            let (dx, grads) = backward(&x, &wr, tape, &dys)?;
            let mut want_dx: Option<Tensor> = None;
            for (i, m) in members.iter().enumerate() {
                let (y, t) = forward_taped(&x, m.w, m.bias, (&m.a, &m.b), 2.0, None)?;
                let close = |got: &Tensor, want: &Tensor, what: &str| -> Result<()> {
                    let scale = max_abs(want)?;
                    assert!(scale > 0.05, "{what}: a zero tensor checks nothing");
                    let d = max_abs(&(got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?)?;
                    assert!(
                        d <= tol * scale,
                        "{dtype:?} {what} {i}: off by {d} ({scale})"
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
            assert!(d <= tol * scale, "{dtype:?} dx off by {d} ({scale})");
        }
        Ok(())
    }
}
