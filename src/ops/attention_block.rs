//! The attention block between the projections as one op: per-head RMSNorm of q and k (for the
//! architectures that have it), the rotary embedding of q and k, and causal attention within
//! packed sequences (with gpt-oss's sliding window and sinks where `BlockArgs` has them) —
//! q `[N, nh·hd]`, k and v `[N, kvh·hd]` → `[N, nh·hd]`. The same functions
//! as the separate ops (`rms_norm`, `apply_rope`, `attention`) run in the same order, so the
//! results are equal bit for bit (tests/attention_ops.rs), in one graph node: the separate ops
//! put six reshape, norm and rotary edges on q and k, and candle's backward gives each edge's
//! gradient a zero-filled buffer plus an add — a full pass over q per edge. On CUDA the norm and
//! the rotation of q and of k run as one kernel each way (`ops::norm_rope`).
//! The backward reuses the rotated q and k, the attention output and (fused kernels) its
//! log-sum-exp from the forward that recorded the node (in training, the recompute just before),
//! and that recompute runs the attention again — or, with `recompute_attention: false`, takes
//! the attention output of the first forward (`BlockArgs::memo`).

use super::attention::{attention_backward, attention_forward, RowSamples, WindowSinks};
use super::norm_rope::{norm_rope_backward, norm_rope_forward, HeadNorm};
use candle_core::{CustomOp3, Result, Tensor};
use std::cell::RefCell;
use std::sync::Mutex;

/// What the block needs besides q, k and v.
pub struct BlockArgs<'a> {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// A value head's size (`head_dim` but for latent attention).
    pub v_head_dim: usize,
    /// Per-head RMSNorm weights of q and k (`[head_dim]`) and epsilon.
    pub norms: Option<(&'a Tensor, &'a Tensor, f64)>,
    /// Rotary tables `[N, 1, head_dim]` (cos, sin); None when q and k come rotated (a rotation
    /// of part of the head, done by the layer; then `norms` is None too).
    pub rotary: Option<(&'a Tensor, &'a Tensor)>,
    /// `[B, S]` u32 on the inputs' device.
    pub segments: &'a Tensor,
    /// What the host knows of the samples in the rows (whole rows, cuDNN's ragged layout).
    pub samples: &'a RowSamples,
    /// Keys a query sees, its own included (gpt-oss's sliding layers); None: all earlier keys
    /// of its sample.
    pub window: Option<usize>,
    /// One logit per query head (`[heads]`, f32, on the inputs' device) in each row's softmax
    /// denominator (gpt-oss); frozen. See `attention::WindowSinks`.
    pub sinks: Option<&'a Tensor>,
    pub scale: f64,
    /// Query block of the blocked attention (see `attention::query_block`).
    pub block: usize,
    /// Where a pass without a graph leaves its attention output (and lse) and a later pass
    /// over the same inputs takes it instead of computing it again (the layer recompute right
    /// before the backward: same inputs, deterministic kernels, so the same values).
    pub memo: Option<&'a RefCell<Option<Memo>>>,
}

/// An attention output `[B, S, heads, hd]` and, from the fused kernels, its lse.
pub type Memo = (Tensor, Option<Tensor>);

/// The forward's rotated q and k (`[B, S, heads, hd]`), attention output and lse.
type Saved = (Tensor, Tensor, Tensor, Option<Tensor>);

struct AttentionBlock {
    /// batch, seq, heads, kv heads, q/k head, v head.
    dims: (usize, usize, usize, usize, usize, usize),
    norms: Option<(Tensor, Tensor, f64)>,
    rotary: Option<(Tensor, Tensor)>,
    segments: Tensor,
    samples: RowSamples,
    /// Checked (`WindowSinks::prepared`).
    extras: WindowSinks,
    scale: f64,
    block: usize,
    /// The attention output (and lse) of an earlier pass over the same inputs.
    reuse: Option<Memo>,
    /// Whether the forward keeps what the backward reuses.
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

impl AttentionBlock {
    /// The per-head norms of q and k, if the architecture has them.
    fn head_norms(&self) -> (HeadNorm<'_>, HeadNorm<'_>) {
        match &self.norms {
            Some((wq, wk, eps)) => (Some((wq, *eps)), Some((wk, *eps))),
            None => (None, None),
        }
    }

    /// q or k `[N, heads, hd]` normed and rotated (when the block does it).
    fn prepare(&self, x: &Tensor, norm: HeadNorm) -> Result<Tensor> {
        match &self.rotary {
            Some((cos, sin)) => norm_rope_forward(x, norm, cos, sin),
            None => Ok(x.clone()),
        }
    }

    /// Whether q/k and v go to the attention as they are: equal head sizes, or rows the
    /// attention takes with heads of two sizes (every kernel but cuDNN's ragged layout of packed
    /// rows, whose offsets are of one head size). Otherwise the smaller side is zero-padded
    /// ([`pad_last`]): zeros add nothing to q·k and give zero columns in the output.
    fn native(&self, q: &Tensor, _k: &Tensor, v: &Tensor) -> bool {
        q.dims().last() == v.dims().last() || self.samples.whole || self.samples.ragged.is_none()
    }

    /// The transpose of [`Self::prepare`] for upstream `dy`.
    fn prepare_backward(&self, x: &Tensor, norm: HeadNorm, dy: &Tensor) -> Result<Tensor> {
        match &self.rotary {
            Some((cos, sin)) => norm_rope_backward(x, norm, cos, sin, dy),
            None => Ok(dy.clone()),
        }
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, s, nh, kvh, hd, vd) = self.dims;
        let n = b * s;
        let z = super::at_offset_zero;
        let (qh, kh) = (z(&q.reshape((n, nh, hd))?)?, z(&k.reshape((n, kvh, hd))?)?);
        let (nq, nk) = self.head_norms();
        let qr = self.prepare(&qh, nq)?.reshape((b, s, nh, hd))?;
        let kr = self.prepare(&kh, nk)?.reshape((b, s, kvh, hd))?;
        let v4 = z(&v.reshape((b, s, kvh, vd))?)?;
        let (qr, kr, v4) = match self.native(&qr, &kr, &v4) {
            true => (qr, kr, v4),
            false => (pad_last(&qr, vd)?, pad_last(&kr, vd)?, pad_last(&v4, hd)?),
        };
        let (out, lse) = match &self.reuse {
            Some((out, lse)) => (out.clone(), lse.clone()),
            None => attention_forward(
                &qr,
                &kr,
                &v4,
                (&self.segments, &self.samples),
                &self.extras,
                self.scale,
                self.block,
            )?,
        };
        let ctx = out.narrow(3, 0, vd)?.reshape((n, nh * vd))?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((qr, kr, out, lse));
        }
        Ok(ctx)
    }

    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, dctx: &Tensor) -> Result<[Tensor; 3]> {
        let (b, s, nh, kvh, hd, vd) = self.dims;
        let n = b * s;
        let z = super::at_offset_zero;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (qr, kr, out, lse) = match saved {
            Some(saved) => saved,
            None => {
                let again = AttentionBlock {
                    dims: self.dims,
                    norms: self.norms.clone(),
                    rotary: self.rotary.clone(),
                    segments: self.segments.clone(),
                    samples: self.samples.clone(),
                    extras: self.extras.clone(),
                    scale: self.scale,
                    block: self.block,
                    reuse: self.reuse.clone(),
                    keep: true,
                    saved: Mutex::new(None),
                };
                again.forward(q, k, v)?;
                let saved = again.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
                saved.ok_or_else(|| {
                    candle_core::Error::Msg("attention block: nothing saved".into())
                })?
            }
        };
        // Padded in the forward unless q/k and v kept their sizes (`native`).
        let padded = qr.dim(3)? != hd || out.dim(3)? != vd;
        let pad = |x: Tensor, to: usize| if padded { pad_last(&x, to) } else { Ok(x) };
        let v4 = pad(z(&v.reshape((b, s, kvh, vd))?)?, hd)?;
        let dout = pad(z(&dctx.to_dtype(q.dtype())?.reshape((b, s, nh, vd))?)?, hd)?;
        let [dqr, dkr, dv] = attention_backward(
            &qr,
            &kr,
            &v4,
            (&self.segments, &self.samples),
            &self.extras,
            self.scale,
            self.block,
            (&out, lse.as_ref()),
            &dout,
        )?;
        let (nq, nk) = self.head_norms();
        let (qh, kh) = (z(&q.reshape((n, nh, hd))?)?, z(&k.reshape((n, kvh, hd))?)?);
        let unpad = |t: &Tensor, d: usize| z(&t.narrow(3, 0, d)?);
        let dq = self.prepare_backward(&qh, nq, &unpad(&dqr, hd)?.reshape((n, nh, hd))?)?;
        let dk = self.prepare_backward(&kh, nk, &unpad(&dkr, hd)?.reshape((n, kvh, hd))?)?;
        Ok([
            dq.reshape((n, nh * hd))?,
            dk.reshape((n, kvh * hd))?,
            unpad(&dv, vd)?.reshape((n, kvh * vd))?,
        ])
    }
}

impl CustomOp3 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention_block"
    }

    super::tensor_forward!(3, "attention_block", forward);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dctx: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: attention", q.device());
        let [dq, dk, dv] = self.backward(&q.detach(), &k.detach(), &v.detach(), dctx)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// q `[N, nh·hd]`, k and v `[N, kvh·hd]` (N = batch·seq) → the attention output `[N, nh·hd]`:
/// per-head RMSNorm of q and k (`args.norms`), rotary embedding, causal attention within the
/// packed sequences of `args.segments`.
pub fn attention_block(q: &Tensor, k: &Tensor, v: &Tensor, args: &BlockArgs) -> Result<Tensor> {
    let (q, k, v) = (
        super::at_offset_zero(q)?,
        super::at_offset_zero(k)?,
        super::at_offset_zero(v)?,
    );
    let graph = super::records_graph(&[&q, &k, &v]);
    let op = block_op(&q, &k, &v, args, graph, graph || args.memo.is_some())?;
    if graph {
        return q.apply_op3(&k, &v, op);
    }
    let ctx = super::direct(op.forward(&q, &k, &v)?)?;
    if let Some(memo) = args.memo {
        let saved = op.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        *memo.borrow_mut() = saved.map(|(_, _, out, lse)| (out, lse));
    }
    Ok(ctx)
}

/// The block's forward for a hand-written backward (`arch::backward`), no graph: the output
/// (taken from `args.memo` when an earlier pass left it there) and what [`BlockTape::backward`]
/// needs.
pub(crate) fn attention_block_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    args: &BlockArgs,
) -> Result<(Tensor, BlockTape)> {
    let z = super::at_offset_zero;
    let (q, k, v) = (z(q)?, z(k)?, z(v)?);
    let op = block_op(&q, &k, &v, args, true, true)?;
    let ctx = super::direct(op.forward(&q, &k, &v)?)?;
    Ok((ctx, BlockTape(op)))
}

/// What the block's forward kept (rotated q and k, output, lse).
pub(crate) struct BlockTape(AttentionBlock);

impl BlockTape {
    /// [dq, dk, dv] for upstream `dctx`, given the forward's q, k and v.
    pub(crate) fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dctx: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let _t = crate::util::phases::Span::start("bwd: attention", q.device());
        self.0.backward(q, k, v, dctx)
    }
}

/// The op for q, k, v (contiguous from offset 0): `reuse` takes the memo's output, `keep` makes
/// the forward keep what the backward needs.
fn block_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    args: &BlockArgs,
    reuse: bool,
    keep: bool,
) -> Result<AttentionBlock> {
    let (b, s, nh, kvh, hd, vd) = (
        args.batch,
        args.seq,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.v_head_dim,
    );
    let n = b * s;
    let table_dims = args
        .rotary
        .map(|(c, s)| (c.dims().to_vec(), s.dims().to_vec()));
    if q.dims() != [n, nh * hd]
        || k.dims() != [n, kvh * hd]
        || v.dims() != [n, kvh * vd]
        || kvh == 0
        || nh % kvh != 0
        || hd % 2 != 0
        || table_dims
            .as_ref()
            .is_some_and(|(c, s)| c != &[n, 1, hd] || s != &[n, 1, hd])
        || (args.rotary.is_none() && args.norms.is_some())
        || args.segments.dims() != [b, s]
        || args.segments.dtype() != candle_core::DType::U32
        || args.block == 0
    {
        candle_core::bail!(
            "attention block: q {:?}, k {:?}, v {:?}, rotary {:?} (norms {}), segments {:?} for {b}×{s} positions of {nh}/{kvh} heads of {hd} (values {vd})",
            q.dims(),
            k.dims(),
            v.dims(),
            table_dims,
            args.norms.is_some(),
            args.segments.dims()
        );
    }
    let z = super::at_offset_zero;
    let dtype = q.dtype();
    let weight = |w: &Tensor| -> Result<Tensor> {
        if w.dims() != [hd] {
            candle_core::bail!(
                "attention block: norm weight {:?} for heads of {hd}",
                w.dims()
            );
        }
        z(&w.to_dtype(dtype)?.detach())
    };
    let norms = match args.norms {
        Some((wq, wk, eps)) => Some((weight(wq)?, weight(wk)?, eps)),
        None => None,
    };
    let table = |t: &Tensor| z(&t.to_dtype(dtype)?.detach());
    let extras = WindowSinks {
        window: args.window,
        sinks: args.sinks.cloned(),
    }
    .prepared(nh, q.device())?;
    let reuse = match args.memo {
        Some(memo) if reuse => memo.borrow_mut().take().filter(|(out, _)| {
            out.dims()[..3] == [b, s, nh] && [vd, hd.max(vd)].contains(&out.dims()[3])
        }),
        _ => None,
    };
    Ok(AttentionBlock {
        dims: (b, s, nh, kvh, hd, vd),
        norms,
        rotary: match args.rotary {
            Some((c, s)) => Some((table(c)?, table(s)?)),
            None => None,
        },
        segments: z(args.segments)?,
        samples: args.samples.clone(),
        extras,
        scale: args.scale,
        block: args.block,
        reuse,
        keep,
        saved: Mutex::new(None),
    })
}

/// x `[B, S, heads, d]` with zeros after its last dim up to `to` (contiguous from offset 0):
/// q and k of a smaller head than v, or v of a smaller one than q and k, meet in one attention
/// of the larger size (zeros add nothing to q·k, and the output's extra dims are dropped).
fn pad_last(x: &Tensor, to: usize) -> Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    if d >= to {
        return super::at_offset_zero(x);
    }
    let zeros = Tensor::zeros((b, s, h, to - d), x.dtype(), x.device())?;
    Tensor::cat(&[x, &zeros], 3)
}
