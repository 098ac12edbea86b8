//! gpu-check entries for the gated delta rule's three CUDA forms — the chunk op
//! (`ops::delta_chunk_op`: `kernels/delta_chunk.cu` around the carry kernel, what trains), the
//! chunkwise form (`ops::delta_rule::chunkwise`: batched matmuls and the carry op of
//! `kernels/delta_carry.cu`) and the token-by-token op (`ops::delta_rule_op::scan`,
//! `kernels/delta_rule.cu`); on CUDA the chunk op and the token-by-token op also recorded under
//! `keeping_checkpoints`, their backwards reading what their forwards kept
//! — against autograd through their reference
//! (`ops::delta_rule::recurrent`) on the CPU in f32: o, the final state and the gradients of q,
//! k, v, g, beta and the initial state for loss = Σ o·up_o + Σ S_T·up_s. Shapes: the tiny model's
//! heads (Dk = Dv = 8, T = 70: two chunks of 64, the last short; five of the token-by-token
//! kernels' checkpoints), the real ones (Dk = Dv = 128, T = 512: eight full chunks, 32
//! checkpoints) and Dv ≠ Dk at the real width with a short last chunk (Dk 128, Dv 64, T = 520:
//! nine chunks, the last of 8 positions). q, k, v and beta arrive in the compared dtype
//! (g and the state are f32, as in the model); the reference gets the same rounded values in f32
//! and the upstream gradients are exact in bf16, so a bf16 row measures only the op's own
//! roundings (o, dq, dk, dv, dbeta are rounded once to bf16; the state, dg and d state stay f32).

use super::{compare, lookup, Comparison, Pass};
use crate::ops::delta_rule::{chunkwise, recurrent, CHUNK};
use crate::ops::delta_rule_op::{
    keeping_checkpoints, kept_checkpoints_read, scan, scan_by, Engine,
};
use candle_core::{DType, Device, Result, Tensor, Var};

type Form =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<(Tensor, Tensor)>;

/// n values of (i·7919 mod 128 − 64) / 64: in [−1, 1), exact in bf16.
fn upstream(shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + 31) % 128) as f32 / 64.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The chunkwise form in chunks of min(64, T), as training runs it.
fn chunkwise_form(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    chunkwise(q, k, v, g, beta, s0, CHUNK.min(q.dim(1)?))
}

/// The chunked op (`kernels/delta_chunk.cu` around the carry) in chunks of 64, as it trains.
fn chunk_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    scan_by(Engine::Chunks(CHUNK), q, k, v, g, beta, s0)
}

/// The chunked op recorded as the layer recompute records it (its backward reading the carry's
/// inputs and output its forward kept).
fn chunk_op_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    keeping_checkpoints(|| chunk_op(q, k, v, g, beta, s0))
}

/// The token-by-token op recorded as the layer recompute records it.
fn scan_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    keeping_checkpoints(|| scan(q, k, v, g, beta, s0))
}

pub(super) fn check_delta_rule(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    for (b, t, h, dk, dv) in [
        (2usize, 70usize, 4usize, 8usize, 8usize),
        (1, 512, 4, 128, 128),
        (1, 520, 2, 128, 64),
    ] {
        let q = Tensor::randn(0f32, 1.0, (b, t, h, dk), cpu)?;
        let k = Tensor::randn(0f32, 1.0, (b, t, h, dk), cpu)?;
        let v = Tensor::randn(0f32, 1.0, (b, t, h, dv), cpu)?;
        // g = −A·softplus(a + 1) with A in [0.02, 0.5] per head, beta = sigmoid(·): as the layer
        // makes them, decays from 0.97 to 0.2 per token.
        let a_log = Tensor::rand(0.02f32, 0.5, h, cpu)?.log()?;
        let a = Tensor::randn(0f32, 1.0, (b, t, h), cpu)?;
        let softplus = ((a + 1.0)?.exp()? + 1.0)?.log()?;
        let g = softplus.broadcast_mul(&a_log.exp()?)?.neg()?;
        let beta = candle_nn::ops::sigmoid(&Tensor::randn(0f32, 1.0, (b, t, h), cpu)?)?;
        let s0 = Tensor::randn(0f32, 1.0, (b, h, dk, dv), cpu)?;
        let (up_o, up_s) = (upstream(&[b, t, h, dv])?, upstream(&[b, h, dk, dv])?);
        let rounded = |x: &Tensor| x.to_dtype(dtype)?.to_dtype(DType::F32);
        let (q, k, v, beta) = (rounded(&q)?, rounded(&k)?, rounded(&v)?, rounded(&beta)?);

        // (o, final state, [dq, dk, dv, dg, dbeta, d state]) on the CPU.
        let run = |d: &Device, dt: DType, form: Form| -> Result<Vec<Tensor>> {
            let var = |x: &Tensor, dt: DType| Var::from_tensor(&x.to_dtype(dt)?.to_device(d)?);
            let vars = [
                var(&q, dt)?,
                var(&k, dt)?,
                var(&v, dt)?,
                var(&g, DType::F32)?,
                var(&beta, dt)?,
                var(&s0, DType::F32)?,
            ];
            let [vq, vk, vv, vg, vb, vs] = vars.each_ref().map(|v| v.as_tensor());
            let (o, s) = form(vq, vk, vv, vg, vb, Some(vs))?;
            let loss = ((o.to_dtype(DType::F32)? * up_o.to_device(d)?)?.sum_all()?
                + (&s * up_s.to_device(d)?)?.sum_all()?)?;
            let grads = loss.backward()?;
            let mut res = vec![o.to_device(cpu)?, s.to_device(cpu)?];
            for v in &vars {
                let gr = grads.get(v.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg("delta_rule: an input got no gradient".into())
                })?;
                res.push(gr.to_device(cpu)?);
            }
            Ok(res)
        };
        let want = run(cpu, DType::F32, recurrent)?;
        let parts = [
            "o",
            "final state",
            "dq",
            "dk",
            "dv",
            "dg",
            "dbeta",
            "d state",
        ];
        let mut forms = vec![
            ("delta_chunkwise", "", chunkwise_form as Form),
            ("delta_chunk", "", chunk_op as Form),
            ("delta_rule", "", scan as Form),
        ];
        // On CUDA also the backward reading the forward's own checkpoints (the recompute's way).
        if device.is_cuda() {
            forms.push(("delta_rule", " kept checkpoints", scan_keeping as Form));
            forms.push(("delta_chunk", " kept carry", chunk_op_keeping as Form));
        }
        for (op, how, form) in forms {
            let read = kept_checkpoints_read();
            let got = run(device, dtype, form)?;
            if !how.is_empty() && kept_checkpoints_read() == read {
                candle_core::bail!(
                    "{op}{how} B{b} T{t}: the backward reran the forward instead of reading \
                     what the forward kept"
                );
            }
            for (i, part) in parts.iter().enumerate() {
                let pass = if i < 2 { Pass::Forward } else { Pass::Backward };
                out.push(compare(
                    &format!("{op}{how} B{b} T{t} H{h} Dk{dk} Dv{dv} {dtype:?} {part}"),
                    &got[i],
                    &want[i],
                    lookup(op, dtype.as_str(), pass)?,
                )?);
            }
        }
    }
    Ok(out)
}
