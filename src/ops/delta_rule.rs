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
//! holds the recurrent-vs-chunked proof).
//!
//! What trains ([`fused`]): on CUDA the chunked equations as one op with a written-out backward
//! ([`super::delta_chunk_op`]: each chunk's terms in one block of `kernels/delta_chunk.cu`, the
//! pass over chunks in `kernels/delta_carry.cu`), or for heads its kernels do not take (over 128)
//! the recurrence token by token ([`super::delta_rule_op`], `kernels/delta_rule.cu`); elsewhere [`chunkwise`], the
//! same chunked equations with every chunk's terms as one batched matmul (the inverse by
//! doubling) and only the pass over chunks sequential ([`super::delta_carry_op`]). All are tested
//! against [`recurrent`], forward and backward, on the CPU and by `moeq gpu-check` on CUDA.

pub use super::delta_prep_op::Heads;
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
    gates_fit(g, beta, (b, t, h))?;
    Ok(Dims { b, t, h, dk, dv })
}

/// g and beta must be `[B, T, H]` (H: the value heads).
pub(super) fn gates_fit(g: &Tensor, beta: &Tensor, (b, t, h): (usize, usize, usize)) -> Result<()> {
    for (name, x) in [("g", g), ("beta", beta)] {
        if x.dims() != [b, t, h] {
            bail!(
                "delta_rule: {name} {:?} must be [B, T, H] = [{b}, {t}, {h}]",
                x.dims()
            );
        }
    }
    Ok(())
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
/// [`recurrent`]: on CUDA the chunk op ([`super::delta_chunk_op`]: per-chunk kernels around the
/// carry kernel; key and value heads ≤ 128, key heads a multiple of 4) or, for other heads (key
/// heads ≤ 256), the token-by-token kernels of [`super::delta_rule_op::scan`]; elsewhere
/// [`chunkwise`]; chunks of min([`CHUNK`], T) (a short sample is not padded to 64), but of 64 for
/// the chunk op on CUDA. `MOEQ_DELTA_RULE` picks another form
/// for A/B runs: `recurrent` (the token-by-token kernels), `chunks` (the chunk op, on the CPU its
/// twin), `chunkwise` (on CUDA: key heads ≤ 256 and a multiple of 4) or `chunked` (the reference
/// ops); shapes a form's kernels do not take run [`chunked`].
///
/// Measured at 32 heads × 2,048 positions (one H200, `launch/bench/delta-rule.sh`), forward +
/// backward: the chunk op 10.5 ms, the token-by-token kernels 12.9, [`chunkwise`] 22.3 (its
/// batched matmuls with candle's element-wise passes between them); in training (Qwen3.5-35B-A3B,
/// the recompute keeping the carry for the backward) the chunk op is 6% (micro-batch 1) and 9%
/// (micro-batch 4) faster than the token-by-token kernels (BENCHMARKS.md).
pub fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let chunk = CHUNK.min(q.dim(1)?).max(1);
    let (cuda, dk, dv) = (v.device().is_cuda(), q.dim(3)?, v.dim(3)?);
    let chunks = super::delta_chunk_op::kernel_takes(dk, dv);
    let form = match form() {
        // Heads the chunk kernels do not take: the token-by-token kernels (up to 256).
        None | Some(Form::Chunks) if cuda && !chunks => Form::Recurrent,
        Some(f) => f,
        None if cuda => Form::Chunks,
        None => Form::Chunkwise,
    };
    match form {
        Form::Recurrent if cuda && dk <= 256 => {
            super::delta_rule_op::scan(q, k, v, g, beta, initial_state)
        }
        Form::Chunkwise if !cuda || super::delta_carry_op::kernel_takes(dk, chunk) => {
            chunkwise(q, k, v, g, beta, initial_state, chunk)
        }
        Form::Chunks if !cuda || chunks => {
            // On CUDA chunks of 64 whatever T (a short sample padded), as gpu-check runs them.
            let c = if cuda { CHUNK } else { chunk };
            let engine = super::delta_rule_op::Engine::Chunks(c);
            super::delta_rule_op::scan_by(engine, q, k, v, g, beta, initial_state)
        }
        _ => chunked(q, k, v, g, beta, initial_state, chunk),
    }
}

/// [`fused`] over the heads of Gated DeltaNet's conv output `[B, T, 2·Hk·Dk + Hv·Dv]` (q heads,
/// k heads, v heads), q and k repeated to the value heads as transformers' `repeat_interleave`:
/// on CUDA with the chunk op or the token-by-token kernels (as [`fused`] picks them), the repeat
/// and the L2 norms run in one op ([`super::delta_rule_op::scan_conv`]); otherwise [`heads`],
/// then [`fused`].
pub fn fused_conv(
    conv: &Tensor,
    h: Heads,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    use super::delta_rule_op::Engine;
    let chunks = super::delta_chunk_op::kernel_takes(h.dk, h.dv);
    let engine = match form() {
        None | Some(Form::Chunks) if chunks => Some(Engine::Chunks(CHUNK)),
        None | Some(Form::Chunks | Form::Recurrent) if h.dk <= 256 => Some(Engine::Tokens),
        _ => None,
    };
    let dtype = matches!(conv.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if let (true, true, Some(engine)) = (conv.device().is_cuda(), dtype, engine) {
        return super::delta_rule_op::scan_conv(engine, conv, h, g, beta, initial_state);
    }
    let (q, k, v) = heads(conv, h)?;
    fused(&q, &k, &v, g, beta, initial_state)
}

/// q, k `[B, T, Hv, Dk]` (repeated to the value heads) and v `[B, T, Hv, Dv]` of the conv output
/// `[B, T, 2·Hk·Dk + Hv·Dv]`, in its dtype.
pub fn heads(conv: &Tensor, h: Heads) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t) = h.check(conv)?;
    let r = h.value_heads / h.key_heads;
    let part = |at: usize, n: usize, d: usize| -> Result<Tensor> {
        conv.narrow(2, at, n * d)?.reshape((b, t, n, d))
    };
    let repeat = |x: Tensor| -> Result<Tensor> {
        match r {
            1 => Ok(x),
            r => x
                .unsqueeze(3)?
                .broadcast_as((b, t, h.key_heads, r, h.dk))?
                .reshape((b, t, h.value_heads, h.dk)),
        }
    };
    let kd = h.key_heads * h.dk;
    Ok((
        repeat(part(0, h.key_heads, h.dk)?)?,
        repeat(part(kd, h.key_heads, h.dk)?)?,
        part(2 * kd, h.value_heads, h.dv)?,
    ))
}

/// The forms [`fused`] can run.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    Chunkwise,
    Chunks,
    Recurrent,
    Chunked,
}

/// `MOEQ_DELTA_RULE` (`chunkwise`, `chunks`, `recurrent`, `chunked`), read once; `None` when
/// unset.
fn form() -> Option<Form> {
    static FORM: std::sync::OnceLock<Option<Form>> = std::sync::OnceLock::new();
    *FORM.get_or_init(|| match std::env::var("MOEQ_DELTA_RULE").as_deref() {
        Ok("chunkwise") => Some(Form::Chunkwise),
        Ok("chunks") => Some(Form::Chunks),
        Ok("recurrent") => Some(Form::Recurrent),
        Ok("chunked") => Some(Form::Chunked),
        _ => None,
    })
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

/// Strictly lower-triangular mask [C, C]: ones below the diagonal.
fn strict_lower_mask(c: usize, dev: &candle_core::Device) -> Result<Tensor> {
    causal_mask(c, dev)? - Tensor::eye(c, DType::F32, dev)?
}

/// (I + A)⁻¹ for A: [.., C, C] (only its strictly lower triangle is used) as the product
/// (I − A)(I + A²)(I + A⁴)…(I + A^(2^(L−1))) with 2^L ≥ C: the Neumann series Σ (−A)^k, which
/// ends at k = C − 1 because a strictly lower-triangular A is nilpotent. 2·(L − 1) batched
/// matmuls (10 for C = 64) instead of C dependent rows: the same inverse, parallel over chunks.
fn unit_lower_inverse_doubling(a: &Tensor) -> Result<Tensor> {
    let c = a.dim(D::Minus1)?;
    let a = a.broadcast_mul(&strict_lower_mask(c, a.device())?)?;
    let eye = Tensor::eye(c, DType::F32, a.device())?;
    let mut x = eye.broadcast_sub(&a)?; // I − A
    let mut power = a; // A^(2^j)
    let mut covered = 2; // powers 0..covered are in x
    while covered < c {
        power = bmm(&power, &power)?;
        x = (&x + bmm(&x, &power)?)?;
        covered *= 2;
    }
    Ok(x)
}

/// The chunked form's terms per chunk, [B, H, N, C, ·] in f32, before the pass over chunks.
struct Blocks {
    n: usize,
    c: usize,
    /// U = (I + A)⁻¹ (β v): [.., C, Dv].
    u: Tensor,
    /// W = (I + A)⁻¹ (β k ⊙ exp(c)): [.., C, Dk].
    w: Tensor,
    /// q ⊙ exp(c): [.., C, Dk].
    q: Tensor,
    /// (q kᵀ) ⊙ Γ, Γ with its diagonal: [.., C, C].
    intra: Tensor,
    /// K̃ = k ⊙ exp(c_C − c): [.., C, Dk].
    k_tail: Tensor,
    /// exp(c_C): [B, H, N, 1, 1].
    chunk_decay: Tensor,
    /// The state entering the first chunk: [B, H, Dk, Dv].
    s: Tensor,
}

/// [`Blocks`] for chunks of `c` positions (T padded with zeros to a multiple of `c`), the
/// triangular inverse computed by `inverse`.
#[allow(clippy::too_many_arguments)]
fn blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    d: &Dims,
    c: usize,
    inverse: fn(&Tensor) -> Result<Tensor>,
) -> Result<Blocks> {
    if c == 0 {
        bail!("delta_rule: chunk must be at least 1 (transformers uses {CHUNK})");
    }
    let (q, k, v, g, beta, s) = prologue(q, k, v, g, beta, initial_state, d)?;
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
                                               // Its diagonal (β_i |k_i|²) is never read: the inverse treats the triangle as unit.
    let ut_system = (bmm(&k_beta, &kt)? * &gamma)?;
    let intra = (bmm(&q, &kt)? * &gamma)?; // [B, H, N, C, C]
    let decayed_k_beta = k_beta.broadcast_mul(&cum_exp)?;
    let inv = inverse(&ut_system)?;
    let last = cum.narrow(3, c - 1, 1)?; // [B, H, N, 1]: c_C
    Ok(Blocks {
        n,
        c,
        u: bmm(&inv, &v_beta)?,
        w: bmm(&inv, &decayed_k_beta)?,
        q: q.broadcast_mul(&cum_exp)?,
        intra,
        k_tail: k.broadcast_mul(&last.broadcast_sub(&cum)?.exp()?.unsqueeze(4)?)?,
        chunk_decay: last.exp()?.unsqueeze(4)?,
        s,
    })
}

/// o [B, H, N·C, Dv] (f32, padded) → [B, T, H, Dv] in `dtype`.
fn unblocked(o: &Tensor, d: &Dims, dtype: DType) -> Result<Tensor> {
    o.narrow(2, 0, d.t)?
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(dtype)
}

/// The gated delta rule in chunks of `chunk` positions (WY / UT-transform form), as
/// transformers' `torch_chunk_gated_delta_rule`: T is padded with zeros to a multiple of
/// `chunk`, intra-chunk terms are matmuls, and a sequential scan carries the state across
/// chunks. Same inputs and outputs as [`recurrent`]; the reference of [`chunkwise`].
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let d = dims(q, k, v, g, beta)?;
    let x = blocks(
        q,
        k,
        v,
        g,
        beta,
        initial_state,
        &d,
        chunk,
        unit_lower_inverse,
    )?;
    let mut s = x.s.clone();
    let at = |x: &Tensor, i: usize| -> Result<Tensor> { x.narrow(2, i, 1)?.squeeze(2) };
    let mut outs = Vec::with_capacity(x.n);
    for i in 0..x.n {
        let v_new = (at(&x.u, i)? - at(&x.w, i)?.matmul(&s)?)?; // [B, H, C, Dv]
        let inter = at(&x.q, i)?.matmul(&s)?;
        outs.push((inter + at(&x.intra, i)?.matmul(&v_new)?)?);
        let k_i = at(&x.k_tail, i)?.transpose(2, 3)?.contiguous()?; // [B, H, Dk, C]
        s = (s.broadcast_mul(&at(&x.chunk_decay, i)?)? + k_i.matmul(&v_new)?)?;
    }
    Ok((unblocked(&Tensor::cat(&outs, 2)?, &d, v.dtype())?, s))
}

/// The chunked form for training and prefill, every chunk at once: the intra-chunk terms as
/// batched matmuls over all chunks (the triangular inverse by doubling), the states carried
/// across chunks by one op ([`super::delta_carry_op::carry`]: its kernel on CUDA, its twin's
/// loops on the CPU), then every chunk's output as two batched matmuls
/// (O = (q ⊙ exp(c)) S_n + ((q kᵀ) ⊙ Γ) V'). Same arguments and results as [`chunked`], whose
/// equations it computes; autograd carries the gradients through all but the carry, whose
/// backward is written out.
pub fn chunkwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let d = dims(q, k, v, g, beta)?;
    let x = blocks(
        q,
        k,
        v,
        g,
        beta,
        initial_state,
        &d,
        chunk,
        unit_lower_inverse_doubling,
    )?;
    let (n, c, bh) = (x.n, x.c, d.b * d.h);
    let (v_new, states) = super::delta_carry_op::carry(
        &x.w.reshape((bh, n, c, d.dk))?,
        &x.k_tail.reshape((bh, n, c, d.dk))?,
        &x.u.reshape((bh, n, c, d.dv))?,
        &x.chunk_decay.reshape((bh, n))?,
        &x.s.reshape((bh, d.dk, d.dv))?,
    )?; // [BH, N, C, Dv], [BH, N + 1, Dk, Dv]
    let v_new = v_new.reshape((d.b, d.h, n, c, d.dv))?;
    let states = states.reshape((d.b, d.h, n + 1, d.dk, d.dv))?;
    let entering = states.narrow(2, 0, n)?;
    let o = (bmm(&x.q, &entering)? + bmm(&x.intra, &v_new)?)?; // [B, H, N, C, Dv]
    let o = o.reshape((d.b, d.h, n * c, d.dv))?;
    let last = states.narrow(2, n, 1)?.squeeze(2)?.contiguous()?;
    Ok((unblocked(&o, &d, v.dtype())?, last))
}
