//! The gated delta rule as one custom op with a written-out backward: the CUDA kernels of
//! `kernels/delta_rule.cu` and their CPU twin (the same loops in the same order, here). The math
//! and the reference are [`super::delta_rule`]'s (`recurrent`); `tests/delta_rule.rs` proves the
//! twin's backward against autograd through it, `moeq gpu-check` ("delta_rule") the kernels.
//!
//! The L2 norm of q and k and q's Dk^-½ stay outside the op: candle ops in [`scan`], one op of
//! their own in [`scan_conv`] ([`super::delta_prep_op`], what the layer uses on CUDA); the op
//! takes, all f32 and packed so that it has three inputs and one output:
//!
//! ```text
//! qkv  [B, T, H, 2Dk + Dv]   normalised, scaled q | normalised k | v
//! gb   [B, T, H, 2]          g | beta
//! s0   [B, H, Dk, Dv]        initial state (zeros when none)
//! out  [B, H, T + Dk, Dv]    rows 0..T: o (heads first); rows T..: the final state
//! ```
//!
//! Token by token: S' = exp(g)·S; p = S'ᵀk; δ = β(v − p); S = S' + k δᵀ; o = Sᵀq. The columns of
//! the state are independent, so the kernels give each warp two of them in registers (lanes over
//! Dk ≤ 256) and split a head's columns into tiles of 32 across blocks; the twin here walks the
//! same equations column by column (its sums run in another order: f32 roundings differ, the
//! math does not). The backward reruns the forward saving the state every C tokens (the twin:
//! [`CKPT`]; the kernels: 16, or `MOEQ_DELTA_RULE_SPLIT`) — on CUDA under
//! [`keeping_checkpoints`] it reads the ones its forward kept instead —, then
//! walks each chunk backward from states recomputed out of its checkpoint (equations in
//! `backward_cpu` and the kernel's header); the kernel's sums over the columns (dq, dk, dg, dβ)
//! are added per tile, then over tiles in a fixed order (no atomics: the same bits at every
//! run). Extra memory on the backward, f32: B·H·(⌈T/C⌉ + C)·Dk·Dv for the states and
//! B·T·H·(2Dk + 2)·⌈Dv/32⌉ for the tiles' sums (≈ 302 + 270 MB per sample of T = 2,048,
//! H = 32, Dk = Dv = 128 at C = 16). C = 16 against 64: the backward 7% faster for 100 MB more
//! per sample (`SPLITS=… launch/bench/delta-rule.sh`; likely a quarter of the per-thread scratch
//! of recomputed states fitting L2 where 64 slots did not — not measured directly).

use super::delta_prep_op::Heads;
use super::delta_rule::{dims, l2norm, state_or_zeros, Dims};
use candle_core::{bail, CustomOp3, DType, Device, Result, Tensor};

/// Tokens between the CPU twin's state checkpoints (and the length of its recomputed chunks).
pub const CKPT: usize = 64;

/// The gated delta rule through the op: same arguments and results as
/// [`super::delta_rule::recurrent`] (q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H];
/// initial state [B, H, Dk, Dv] → o [B, T, H, Dv] in v's dtype, final state f32). The CUDA
/// kernels on CUDA, the CPU twin's loops on the CPU.
pub fn scan(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    scan_by(Engine::Tokens, q, k, v, g, beta, initial_state)
}

/// Which op runs the packed rule: this module's token-by-token op, or
/// [`super::delta_chunk_op`] in chunks of the given length (same inputs and output).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Engine {
    Tokens,
    Chunks(usize),
}

/// [`scan`] through the op `engine` names.
pub fn scan_by(
    engine: Engine,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let d = dims(q, k, v, g, beta)?;
    let f32 = |x: &Tensor| x.to_dtype(DType::F32);
    // [B, T, H, ·] → packed f32, q and k normalised, q scaled (as the reference's prologue).
    let qn = (l2norm(&f32(q)?)? * (d.dk as f64).powf(-0.5))?;
    let kn = l2norm(&f32(k)?)?;
    let qkv = Tensor::cat(&[&qn, &kn, &f32(v)?], 3)?;
    packed(engine, &qkv, g, beta, initial_state, &d, v.dtype())
}

/// [`scan`] over the heads of Gated DeltaNet's conv output `[B, T, 2·Hk·Dk + Hv·Dv]` (q and k
/// not yet repeated to the value heads nor normalised: [`super::delta_prep_op`] does both in one
/// op), g and beta `[B, T, Hv]` → o `[B, T, Hv, Dv]` in conv's dtype and the final state, through
/// the op `engine` names.
pub fn scan_conv(
    engine: Engine,
    conv: &Tensor,
    heads: Heads,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = conv.dims3()?;
    let (h, dk, dv) = (heads.value_heads, heads.dk, heads.dv);
    super::delta_rule::gates_fit(g, beta, (b, t, h))?;
    let qkv = super::delta_prep_op::apply(conv, heads)?;
    let d = Dims { b, t, h, dk, dv };
    packed(engine, &qkv, g, beta, initial_state, &d, conv.dtype())
}

/// The op over packed q̂ | k̂ | v `[B, T, H, 2Dk + Dv]` (f32): o `[B, T, H, Dv]` in `dtype`,
/// the final state f32.
fn packed(
    engine: Engine,
    qkv: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    d: &Dims,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let f32 = |x: &Tensor| x.to_dtype(DType::F32);
    let gb = Tensor::stack(&[&f32(g)?, &f32(beta)?], 3)?;
    let s0 = state_or_zeros(initial_state, d, qkv.device())?;
    let at0 = super::at_offset_zero;
    let (qkv, gb, s0) = (at0(qkv)?, at0(&gb)?, at0(&s0)?);
    let out = if let Engine::Chunks(c) = engine {
        super::delta_chunk_op::apply(&qkv, &gb, &s0, c)?
    } else if super::records_graph(&[&qkv, &gb, &s0]) {
        let op = DeltaRuleOp {
            keep: keeping(),
            saved: std::sync::Mutex::new(None),
        };
        qkv.apply_op3(&gb, &s0, op)?
    } else {
        forward(&qkv, &gb, &s0)?
    };
    // out: [B, H, T + Dk, Dv] → o [B, T, H, Dv] in `dtype`, state [B, H, Dk, Dv].
    let o = out.narrow(2, 0, d.t)?.transpose(1, 2)?.contiguous()?;
    let s = out.narrow(2, d.t, d.dk)?.contiguous()?;
    Ok((o.to_dtype(dtype)?, s))
}

/// The op's sizes, from its packed inputs (checked against each other; the chunk op's too).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geo {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) h: usize,
    pub(super) dk: usize,
    pub(super) dv: usize,
}

impl Geo {
    pub(super) fn of(qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Geo> {
        let (b, t, h, w) = qkv.dims4()?;
        let (_, _, dk, dv) = s0.dims4()?;
        if w != 2 * dk + dv || gb.dims() != [b, t, h, 2] || s0.dims() != [b, h, dk, dv] {
            bail!(
                "delta_rule op: qkv {:?}, gb {:?}, s0 {:?} must be [B, T, H, 2Dk + Dv], \
                 [B, T, H, 2], [B, H, Dk, Dv]",
                qkv.dims(),
                gb.dims(),
                s0.dims()
            );
        }
        for x in [qkv, gb, s0] {
            if x.dtype() != DType::F32 {
                bail!(
                    "delta_rule op: packed inputs must be f32, got {:?}",
                    x.dtype()
                );
            }
        }
        Ok(Geo { b, t, h, dk, dv })
    }

    fn w(&self) -> usize {
        2 * self.dk + self.dv
    }

    /// Rows of `out` per (b, h).
    fn rows(&self) -> usize {
        self.t + self.dk
    }

    /// Checkpoints per (b, h).
    fn ckpts(&self) -> usize {
        self.t.div_ceil(CKPT)
    }

    /// Index of token t of head bh = b·H + h in the [B, T, H, ·] tensors.
    fn tok(&self, bh: usize, t: usize) -> usize {
        (bh / self.h * self.t + t) * self.h + bh % self.h
    }
}

thread_local! {
    static KEEP_CHECKPOINTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every delta-rule op it records (on CUDA) keeping its forward's state
/// checkpoints for its backward, instead of the backward rerunning the forward to make them:
/// for the layer recompute, whose backward follows at once (one layer's checkpoints alive at a
/// time: B·H·⌈T/16⌉·Dk·Dv f32, ≈ 268 MB per sample of 2,048 tokens at H = 32, Dk = Dv = 128).
/// A graph kept for the whole step (`gradient_checkpointing: false`) does not keep them: every
/// linear-attention layer would hold its own until the backward.
pub fn keeping_checkpoints<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back as it was, on return or unwinding.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            KEEP_CHECKPOINTS.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(KEEP_CHECKPOINTS.with(|k| k.replace(true)));
    f()
}

/// Whether ops recorded now keep their forward's state for their backward
/// ([`keeping_checkpoints`]).
pub(super) fn keeping() -> bool {
    KEEP_CHECKPOINTS.with(|k| k.get())
}

/// Counts one backward that read what its forward kept (see [`kept_checkpoints_read`]).
pub(super) fn count_kept_read() {
    KEPT_READ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many backward calls have read checkpoints their forward kept (on CUDA, this process):
/// what gpu-check's "kept checkpoints" entries check moved, so that a silent fallback to the
/// rerun cannot pass for the kept path.
pub fn kept_checkpoints_read() -> usize {
    KEPT_READ.load(std::sync::atomic::Ordering::Relaxed)
}

static KEPT_READ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct DeltaRuleOp {
    /// Whether the CUDA forward keeps its checkpoints in `saved` ([`keeping_checkpoints`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    keep: bool,
    saved: std::sync::Mutex<Option<Tensor>>,
}

impl DeltaRuleOp {
    fn forward(&self, qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.keep && qkv.device().is_cuda() {
            let (out, ckpt) = cuda::forward_keeping(Geo::of(qkv, gb, s0)?, qkv, gb, s0)?;
            if let Ok(mut saved) = self.saved.lock() {
                *saved = Some(ckpt);
            }
            return Ok(out);
        }
        forward(qkv, gb, s0)
    }
}

impl CustomOp3 for DeltaRuleOp {
    fn name(&self) -> &'static str {
        "delta_rule"
    }

    super::tensor_forward!(3, "delta_rule", forward);

    fn bwd(
        &self,
        qkv: &Tensor,
        gb: &Tensor,
        s0: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: delta rule", qkv.device());
        let dout = super::at_offset_zero(&dout.to_dtype(DType::F32)?)?;
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let [dqkv, dgb, ds0] = backward(qkv, gb, s0, &dout, saved)?;
        Ok((Some(dqkv), Some(dgb), Some(ds0)))
    }
}

/// `out` [B, H, T + Dk, Dv] of the packed inputs (contiguous from offset 0), no graph.
fn forward(qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Tensor> {
    let g = Geo::of(qkv, gb, s0)?;
    match qkv.device() {
        Device::Cpu => {
            let mut out = vec![0f32; g.b * g.h * g.rows() * g.dv];
            forward_cpu(g, &vec(qkv)?, &vec(gb)?, &vec(s0)?, &mut out, None);
            Tensor::from_vec(out, (g.b, g.h, g.rows(), g.dv), &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(g, qkv, gb, s0),
        _ => bail!("delta_rule op: CPU or CUDA only"),
    }
}

/// [d qkv, d gb, d s0] for the gradient `dout` of `out`; `saved`: the CUDA forward's
/// checkpoints when it kept them (the CPU twin always reruns its forward).
fn backward(
    qkv: &Tensor,
    gb: &Tensor,
    s0: &Tensor,
    dout: &Tensor,
    saved: Option<Tensor>,
) -> Result<[Tensor; 3]> {
    let g = Geo::of(qkv, gb, s0)?;
    match qkv.device() {
        Device::Cpu => {
            drop(saved); // none: the CPU forward keeps no checkpoints
            let [dqkv, dgb, ds0] = backward_cpu(g, &vec(qkv)?, &vec(gb)?, &vec(s0)?, &vec(dout)?);
            let cpu = &Device::Cpu;
            Ok([
                Tensor::from_vec(dqkv, qkv.shape(), cpu)?,
                Tensor::from_vec(dgb, gb.shape(), cpu)?,
                Tensor::from_vec(ds0, s0.shape(), cpu)?,
            ])
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(g, qkv, gb, s0, dout, saved),
        _ => bail!("delta_rule op: CPU or CUDA only"),
    }
}

fn vec(x: &Tensor) -> Result<Vec<f32>> {
    x.flatten_all()?.to_vec1()
}

/// The CPU twin of `delta_rule_fwd`: o and the final state into `out`; with `ckpt`, the state
/// entering every [`CKPT`]-th token into it ([B, H, N, Dk, Dv]).
fn forward_cpu(
    g: Geo,
    qkv: &[f32],
    gb: &[f32],
    s0: &[f32],
    out: &mut [f32],
    mut ckpt: Option<&mut [f32]>,
) {
    let (dk, dv, w, sz) = (g.dk, g.dv, g.w(), g.dk * g.dv);
    for bh in 0..g.b * g.h {
        let mut s = s0[bh * sz..(bh + 1) * sz].to_vec(); // [Dk, Dv]
        let out = &mut out[bh * g.rows() * dv..(bh + 1) * g.rows() * dv];
        for t in 0..g.t {
            if let Some(c) = ckpt.as_deref_mut() {
                if t % CKPT == 0 {
                    let at = (bh * g.ckpts() + t / CKPT) * sz;
                    c[at..at + sz].copy_from_slice(&s);
                }
            }
            let tok = g.tok(bh, t);
            let x = &qkv[tok * w..(tok + 1) * w];
            let (q, k, v) = (&x[..dk], &x[dk..2 * dk], &x[2 * dk..]);
            let (a, beta) = (gb[tok * 2].exp(), gb[tok * 2 + 1]);
            for j in 0..dv {
                let mut p = 0f32;
                for i in 0..dk {
                    s[i * dv + j] *= a;
                    p += s[i * dv + j] * k[i];
                }
                let delta = (v[j] - p) * beta;
                let mut o = 0f32;
                for i in 0..dk {
                    s[i * dv + j] += k[i] * delta;
                    o += s[i * dv + j] * q[i];
                }
                out[t * dv + j] = o;
            }
        }
        out[g.t * dv..].copy_from_slice(&s);
    }
}

/// The CPU twin of `delta_rule_bwd`: [d qkv, d gb, d s0] for `dout` ([B, H, T + Dk, Dv]: do
/// rows, then the final state's gradient). Per token t in reverse, with dS the gradient of S_t
/// (decay a = exp(g), S' = a·S_{t−1}, S_t = S' + k δᵀ):
///
/// ```text
/// o = S_tᵀq      → dS += q doᵀ;  dq = S_t do = S' do + k (δ·do)
/// S_t = S' + kδᵀ → dk += dS δ;   dδ = dSᵀk
/// δ = β(v − p)   → dv = β dδ;    dβ = Σ dδ (v − p);  dp = −β dδ
/// p = S'ᵀk       → dk += S' dp;  dS' = dS + k dpᵀ
/// S' = a S       → dS_{t−1} = a dS';  dg = a Σ dS' ⊙ S_{t−1} = Σ dS' ⊙ S'
/// ```
fn backward_cpu(g: Geo, qkv: &[f32], gb: &[f32], s0: &[f32], dout: &[f32]) -> [Vec<f32>; 3] {
    let (dk, dv, w, sz) = (g.dk, g.dv, g.w(), g.dk * g.dv);
    let mut ckpt = vec![0f32; g.b * g.h * g.ckpts() * sz];
    let mut scratch_out = vec![0f32; g.b * g.h * g.rows() * dv];
    forward_cpu(g, qkv, gb, s0, &mut scratch_out, Some(&mut ckpt));
    let mut dqkv = vec![0f32; qkv.len()];
    let mut dgb = vec![0f32; gb.len()];
    let mut ds0 = vec![0f32; s0.len()];
    let mut keep = vec![0f32; CKPT * sz]; // the state entering each token of a chunk
    let (mut sp, mut delta, mut dp) = (vec![0f32; sz], vec![0f32; dv], vec![0f32; dv]);
    for bh in 0..g.b * g.h {
        let dout = &dout[bh * g.rows() * dv..(bh + 1) * g.rows() * dv];
        let mut ds = dout[g.t * dv..].to_vec(); // [Dk, Dv]
        for n in (0..g.ckpts()).rev() {
            let (t0, t1) = (n * CKPT, g.t.min((n + 1) * CKPT));
            let at = (bh * g.ckpts() + n) * sz;
            let mut s = ckpt[at..at + sz].to_vec();
            for t in t0..t1 {
                keep[(t - t0) * sz..(t - t0 + 1) * sz].copy_from_slice(&s);
                let tok = g.tok(bh, t);
                let (k, v) = (
                    &qkv[tok * w + dk..tok * w + 2 * dk],
                    &qkv[tok * w + 2 * dk..],
                );
                let (a, beta) = (gb[tok * 2].exp(), gb[tok * 2 + 1]);
                for j in 0..dv {
                    let mut p = 0f32;
                    for i in 0..dk {
                        p += s[i * dv + j] * a * k[i];
                        s[i * dv + j] *= a;
                    }
                    let d = (v[j] - p) * beta;
                    for i in 0..dk {
                        s[i * dv + j] += k[i] * d;
                    }
                }
            }
            for t in (t0..t1).rev() {
                let tok = g.tok(bh, t);
                let x = &qkv[tok * w..(tok + 1) * w];
                let (q, k, v) = (&x[..dk], &x[dk..2 * dk], &x[2 * dk..]);
                let (a, beta) = (gb[tok * 2].exp(), gb[tok * 2 + 1]);
                let prev = &keep[(t - t0) * sz..(t - t0 + 1) * sz];
                let d_o = &dout[t * dv..(t + 1) * dv];
                let dx = &mut dqkv[tok * w..(tok + 1) * w];
                // Columns: S', p, δ; dS += q doᵀ; dδ, dv, dβ, dp.
                let mut dbeta = 0f32;
                for j in 0..dv {
                    let (mut p, mut dd) = (0f32, 0f32);
                    for i in 0..dk {
                        sp[i * dv + j] = prev[i * dv + j] * a;
                        p += sp[i * dv + j] * k[i];
                        ds[i * dv + j] += q[i] * d_o[j];
                        dd += ds[i * dv + j] * k[i];
                    }
                    delta[j] = (v[j] - p) * beta;
                    dx[2 * dk + j] = beta * dd;
                    dbeta += dd * (v[j] - p);
                    dp[j] = -beta * dd;
                }
                // Rows: dq, dk (sums over the columns).
                for i in 0..dk {
                    let (mut dq, mut dki, mut d_do) = (0f32, 0f32, 0f32);
                    for c in 0..dv {
                        dq += sp[i * dv + c] * d_o[c];
                        dki += ds[i * dv + c] * delta[c] + sp[i * dv + c] * dp[c];
                        d_do += delta[c] * d_o[c];
                    }
                    dx[i] = dq + k[i] * d_do;
                    dx[dk + i] = dki;
                }
                // Columns: dS' = dS + k dpᵀ, dg, dS_{t−1}.
                let mut dg = 0f32;
                for j in 0..dv {
                    for i in 0..dk {
                        let d = ds[i * dv + j] + k[i] * dp[j];
                        dg += d * sp[i * dv + j];
                        ds[i * dv + j] = a * d;
                    }
                }
                dgb[tok * 2] = dg;
                dgb[tok * 2 + 1] = dbeta;
            }
        }
        ds0[bh * sz..(bh + 1) * sz].copy_from_slice(&ds);
    }
    [dqkv, dgb, ds0]
}

#[cfg(feature = "cuda")]
pub(super) mod cuda;
