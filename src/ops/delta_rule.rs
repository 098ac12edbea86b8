//! The gated delta rule of Qwen3-Next / Qwen3.5 linear attention ("Gated DeltaNet"), as
//! transformers 5.17 computes it (`torch_recurrent_gated_delta_rule` and
//! `torch_chunk_gated_delta_rule` in `models/qwen3_next/modeling_qwen3_next.py`, both with
//! `use_qk_l2norm_in_kernel=True`, which is how `Qwen3NextGatedDeltaNet` calls them).
//!
//! Shapes: q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H]; state: [B, H, Dk, Dv].
//! The heads of q and k must already be repeated to v's head count (the layer does that with
//! `repeat_interleave` before the call). The caller computes `g = −exp(A_log)·softplus(a + dt_bias)`
//! (so g ≤ 0) and `beta = sigmoid(b)`; both arrive here as plain tensors.
//!
//! Per (batch, head), in f32, with q and k first L2-normalised along D as transformers' `l2norm`
//! (`x · rsqrt(Σx² + 1e-6)`, eps inside the root) and q then scaled by Dk^-½:
//!
//! ```text
//! S'   = exp(g_t) · S_{t-1}                       decay first
//! δ_t  = β_t · (v_t − S'ᵀ k_t)                    the delta reads the decayed state
//! S_t  = S' + k_t ⊗ δ_t                           [Dk, Dv]
//! o_t  = S_tᵀ q_t                                 the output reads the updated state
//! ```
//!
//! so `S_t = exp(g_t)·(I − β_t k_t k_tᵀ)·S_{t-1} + β_t k_t v_tᵀ`.
//!
//! The chunked form ([`chunked`]) is the same recurrence in blocks of C positions (T padded with
//! zeros to a multiple of C; padded positions have k = 0, so they leave the state untouched, and
//! their outputs are dropped). Inside a chunk, with c_i = Σ_{j≤i} g_j (cumulative log-decay from
//! the chunk's start) and Γ_ij = exp(c_i − c_j) for j ≤ i, 0 above the diagonal (masked *before*
//! the exp, since c_i − c_j > 0 there and could overflow):
//!
//! ```text
//! A    = strict_lower((β k) kᵀ ⊙ Γ)               the diagonal is ignored (unit triangle)
//! U    = (I + A)⁻¹ (β v)                          [C, Dv], the UT/WY transform
//! W    = (I + A)⁻¹ (β k ⊙ exp(c))                 [C, Dk]
//! per chunk, in order, with the state S entering the chunk:
//! V'   = U − W S                                  corrected values
//! O    = (q ⊙ exp(c)) S + ((q kᵀ) ⊙ Γ) V'         Γ keeps its diagonal here
//! S    = exp(c_C) S + (k ⊙ exp(c_C − c))ᵀ V'
//! ```
//!
//! Transformers solves with `torch.linalg.solve_triangular`; here (I + A)⁻¹ is built by forward
//! substitution, row by row (as its export path does), from differentiable candle ops. Both
//! functions are CPU references made only of candle ops with autograd, so `backward()` through
//! them gives the gradients of q, k, v, g, beta and the initial state (`tests/delta_rule.rs`
//! holds the recurrent-vs-chunked proof). The CUDA path is the recurrent form as one op with a
//! written-out backward ([`super::delta_rule_op`], `kernels/delta_rule.cu`), tested against
//! [`recurrent`] forward and backward; [`fused`] picks it on CUDA and [`chunked`] elsewhere.

use candle_core::{bail, DType, Result, Tensor, D};

/// Default chunk length of transformers' `torch_chunk_gated_delta_rule`.
pub const CHUNK: usize = 64;

/// The eps of transformers' (and FLA's) `l2norm`, inside the square root.
const L2_EPS: f64 = 1e-6;

/// Dimensions of one call, checked once.
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) h: usize,
    pub(super) dk: usize,
    pub(super) dv: usize,
}

/// The initial state [B, H, Dk, Dv] in f32, zeros when none.
pub(super) fn state_or_zeros(
    initial_state: Option<&Tensor>,
    d: &Dims,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let state_shape = (d.b, d.h, d.dk, d.dv);
    match initial_state {
        Some(s) if s.dims() == [d.b, d.h, d.dk, d.dv] => s.to_dtype(DType::F32),
        Some(s) => bail!(
            "delta_rule: initial state {:?} must be [B, H, Dk, Dv] = {state_shape:?}",
            s.dims()
        ),
        None => Tensor::zeros(state_shape, DType::F32, device),
    }
}

pub(super) fn dims(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor) -> Result<Dims> {
    let (b, t, h, dk) = k.dims4()?;
    let (vb, vt, vh, dv) = v.dims4()?;
    if q.dims() != k.dims() {
        bail!(
            "delta_rule: q {:?} and k {:?} must have the same shape",
            q.dims(),
            k.dims()
        );
    }
    if (vb, vt, vh) != (b, t, h) {
        bail!(
            "delta_rule: v {:?} must be [B, T, H, Dv] with B, T, H of k {:?} (repeat q/k heads to v's)",
            v.dims(),
            k.dims()
        );
    }
    for (name, x) in [("g", g), ("beta", beta)] {
        if x.dims() != [b, t, h] {
            bail!(
                "delta_rule: {name} {:?} must be [B, T, H] = [{b}, {t}, {h}]",
                x.dims()
            );
        }
    }
    Ok(Dims { b, t, h, dk, dv })
}

/// `x · rsqrt(Σ_D x² + eps)` along the last dimension, as transformers' `l2norm`.
pub(super) fn l2norm(x: &Tensor) -> Result<Tensor> {
    let inv = (x.sqr()?.sum_keepdim(D::Minus1)? + L2_EPS)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)
}

/// The shared prologue: [B, T, H, ..] → [B, H, T, ..] in f32, q and k L2-normalised, q scaled
/// by Dk^-½ (a multiply, as the chunked path of transformers; its recurrent path divides by
/// √Dk, which differs by at most an ulp). Returns (q, k, v, g, beta, initial state or zeros).
#[allow(clippy::type_complexity)]
fn prologue(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    d: &Dims,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let heads_first = |x: &Tensor| x.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let q = l2norm(&heads_first(q)?)?;
    let q = (q * (d.dk as f64).powf(-0.5))?;
    let k = l2norm(&heads_first(k)?)?;
    let s = state_or_zeros(initial_state, d, v.device())?;
    Ok((
        q,
        k,
        heads_first(v)?,
        heads_first(g)?,
        heads_first(beta)?,
        s,
    ))
}

/// The gated delta rule for training and prefill, with the arguments and results of
/// [`recurrent`]: the CUDA kernels on CUDA ([`super::delta_rule_op::scan`]), [`chunked`] in
/// chunks of min([`CHUNK`], T) elsewhere (a short sample is not padded to 64).
/// `MOEQ_DELTA_RULE=chunked` keeps [`chunked`] on CUDA too (for A/B runs of the kernels), as do
/// key heads over 256 (the kernels' limit).
pub fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    if v.device().is_cuda() && !chunked_forced() && q.dim(3)? <= 256 {
        return super::delta_rule_op::scan(q, k, v, g, beta, initial_state);
    }
    let len = q.dim(1)?;
    chunked(q, k, v, g, beta, initial_state, CHUNK.min(len).max(1))
}

/// `MOEQ_DELTA_RULE=chunked`, read once.
fn chunked_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("MOEQ_DELTA_RULE").as_deref() == Ok("chunked"))
}

/// The gated delta rule token by token, in transformers' order of operations (see the module
/// doc). q, k: [B, T, H, Dk], v: [B, T, H, Dv], g, beta: [B, T, H], initial state
/// [B, H, Dk, Dv] (zeros when `None`) → (o [B, T, H, Dv] in v's dtype, final state
/// [B, H, Dk, Dv] f32).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let d = dims(q, k, v, g, beta)?;
    let out_dtype = v.dtype();
    let (q, k, v, g, beta, mut s) = prologue(q, k, v, g, beta, initial_state, &d)?;
    let decay = g.exp()?; // [B, H, T]
    let mut outs = Vec::with_capacity(d.t);
    for t in 0..d.t {
        let q_t = q.narrow(2, t, 1)?.transpose(2, 3)?; // [B, H, Dk, 1]
        let k_t = k.narrow(2, t, 1)?.transpose(2, 3)?; // [B, H, Dk, 1]
        let v_t = v.narrow(2, t, 1)?; // [B, H, 1, Dv]
        let decay_t = decay.narrow(2, t, 1)?.unsqueeze(3)?; // [B, H, 1, 1]
        let beta_t = beta.narrow(2, t, 1)?.unsqueeze(3)?; // [B, H, 1, 1]
        s = s.broadcast_mul(&decay_t)?;
        let kv_mem = s.broadcast_mul(&k_t)?.sum_keepdim(2)?; // [B, H, 1, Dv]
        let delta = (v_t - kv_mem)?.broadcast_mul(&beta_t)?;
        s = (s + k_t.broadcast_mul(&delta)?)?;
        outs.push(s.broadcast_mul(&q_t)?.sum_keepdim(2)?); // [B, H, 1, Dv]
    }
    let o = Tensor::cat(&outs, 2)?; // [B, H, T, Dv]
    let o = o.transpose(1, 2)?.contiguous()?.to_dtype(out_dtype)?;
    Ok((o, s))
}

/// (I + A)⁻¹ for A: [.., C, C] strictly lower triangular (anything on or above the diagonal
/// is ignored), by forward substitution: row i of X = (I + A)⁻¹ is e_i − A[i, :i] X[:i].
fn unit_lower_inverse(a: &Tensor) -> Result<Tensor> {
    let c = a.dim(D::Minus1)?;
    let lead = &a.dims()[..a.rank() - 2];
    let eye = Tensor::eye(c, DType::F32, a.device())?;
    let e = |i: usize| -> Result<Tensor> {
        let mut shape = lead.to_vec();
        shape.extend([1, c]);
        eye.narrow(0, i, 1)?.broadcast_as(shape)?.contiguous()
    };
    let mut x = e(0)?; // [.., i, C], rows 0..i of the inverse
    for i in 1..c {
        let a_row = a.narrow(D::Minus2, i, 1)?.narrow(D::Minus1, 0, i)?; // [.., 1, i]
        let row = (e(i)? - bmm(&a_row, &x)?)?;
        x = Tensor::cat(&[&x, &row], D::Minus2)?;
    }
    Ok(x)
}

/// Batched matmul over any number of leading dimensions (candle's CPU matmul takes at most
/// two): [.., M, K] × [.., K, N] → [.., M, N].
fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = (a.dim(D::Minus2)?, a.dim(D::Minus1)?);
    let n = b.dim(D::Minus1)?;
    let lead = &a.dims()[..a.rank() - 2];
    let batch: usize = lead.iter().product();
    let y = a
        .contiguous()?
        .reshape((batch, m, k))?
        .matmul(&b.contiguous()?.reshape((batch, k, n))?)?;
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    y.reshape(shape)
}

/// Lower-triangular mask [C, C] with ones on and below the diagonal.
fn causal_mask(c: usize, dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::tril2(c, DType::F32, dev)
}

/// The gated delta rule in chunks of `chunk` positions (WY / UT-transform form), as
/// transformers' `torch_chunk_gated_delta_rule`: T is padded with zeros to a multiple of
/// `chunk`, intra-chunk terms are matmuls, and a sequential scan carries the state across
/// chunks. Same inputs and outputs as [`recurrent`]; it is the blueprint of the CUDA kernel.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    if chunk == 0 {
        bail!("delta_rule: chunk must be at least 1 (transformers uses {CHUNK})");
    }
    let d = dims(q, k, v, g, beta)?;
    let out_dtype = v.dtype();
    let (q, k, v, g, beta, mut s) = prologue(q, k, v, g, beta, initial_state, &d)?;
    let c = chunk;
    let pad = (c - d.t % c) % c;
    let n = (d.t + pad) / c;
    let dev = v.device();

    // [B, H, T, ..] → [B, H, N, C, ..], zero-padded at the end.
    let blocks = |x: &Tensor, w: usize| -> Result<Tensor> {
        x.pad_with_zeros(2, 0, pad)?.reshape((d.b, d.h, n, c, w))
    };
    let beta = beta.unsqueeze(3)?; // [B, H, T, 1]
    let q = blocks(&q, d.dk)?;
    let k_beta = blocks(&k.broadcast_mul(&beta)?, d.dk)?;
    let v_beta = blocks(&v.broadcast_mul(&beta)?, d.dv)?;
    let k = blocks(&k, d.dk)?;
    let g = g.pad_with_zeros(2, 0, pad)?.reshape((d.b, d.h, n, c))?;

    // Cumulative log-decay inside each chunk and the pairwise decays Γ (masked before exp).
    let cum = g.cumsum(3)?; // [B, H, N, C]
    let mask = causal_mask(c, dev)?; // [C, C]
    let diff = cum.unsqueeze(4)?.broadcast_sub(&cum.unsqueeze(3)?)?; // [.., C, C]: c_i − c_j
    let gamma = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
    let cum_exp = cum.exp()?.unsqueeze(4)?; // [B, H, N, C, 1]

    let kt = k.transpose(3, 4)?.contiguous()?; // [B, H, N, Dk, C]
                                               // Its diagonal (β_i |k_i|²) is never read: the solve treats the triangle as unit.
    let ut_system = (bmm(&k_beta, &kt)? * &gamma)?;
    let intra = (bmm(&q, &kt)? * &gamma)?; // [B, H, N, C, C]
    let decayed_k_beta = k_beta.broadcast_mul(&cum_exp)?;
    let inv = unit_lower_inverse(&ut_system)?;
    let new_values = bmm(&inv, &v_beta)?; // U: [B, H, N, C, Dv]
    let k_cumdecay = bmm(&inv, &decayed_k_beta)?; // W: [B, H, N, C, Dk]

    let q = q.broadcast_mul(&cum_exp)?;
    let last = cum.narrow(3, c - 1, 1)?; // [B, H, N, 1]: c_C
    let k_tail = k.broadcast_mul(&last.broadcast_sub(&cum)?.exp()?.unsqueeze(4)?)?;
    let chunk_decay = last.exp()?.unsqueeze(4)?; // [B, H, N, 1, 1]

    let at = |x: &Tensor, i: usize| -> Result<Tensor> { x.narrow(2, i, 1)?.squeeze(2) };
    let mut outs = Vec::with_capacity(n);
    for i in 0..n {
        let v_new = (at(&new_values, i)? - at(&k_cumdecay, i)?.matmul(&s)?)?; // [B, H, C, Dv]
        let inter = at(&q, i)?.matmul(&s)?;
        outs.push((inter + at(&intra, i)?.matmul(&v_new)?)?);
        let k_i = at(&k_tail, i)?.transpose(2, 3)?.contiguous()?; // [B, H, Dk, C]
        s = (s.broadcast_mul(&at(&chunk_decay, i)?)? + k_i.matmul(&v_new)?)?;
    }
    let o = Tensor::cat(&outs, 2)?.narrow(2, 0, d.t)?; // [B, H, T, Dv]
    let o = o.transpose(1, 2)?.contiguous()?.to_dtype(out_dtype)?;
    Ok((o, s))
}
