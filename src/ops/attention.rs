//! Causal attention over packed sequences in blocks of query rows, as one op with its own
//! backward: `softmax(scale·q·kᵀ + mask)·v` with grouped-query heads, never holding more than one
//! block's scores. A block of `C` query positions `q0..q1` only meets keys `k0..q1` (later keys
//! are masked; `k0` is 0, or the first key a sliding window lets `q0` see), so the scores are
//! `[B, H, C, q1 − k0]` and the causal half of the work (and what lies left of the window) is
//! skipped. gpt-oss's additions, a sliding window and per-head sink logits, are [`WindowSinks`].
//! Forward keeps nothing but its inputs; backward recomputes each block's probabilities and
//! runs `dP = dO·vᵀ`, `dS = softmax_bwd(P, dP)`, `dq = dS·k`, `dk += dSᵀ·q`, `dv += Pᵀ·dO`
//! (the FlashAttention recurrence, with cuBLAS GEMMs and the masked-softmax kernels between).
//! The same code runs on the CPU; the primitive-op version it is tested against is
//! [`attention_reference`]. On CUDA in bf16 with head size 64 or 128, [`attention`] runs the
//! fused kernels of `super::flash_attn` instead (the blocked op is their reference).

use super::attn_softmax::{masked_softmax_reference, softmax_block, softmax_block_bwd};
use candle_core::{CustomOp3, DType, Device, Result, Tensor};

/// What gpt-oss adds to causal attention: a sliding window over the keys and one sink logit per
/// query head. With a window of `W`, query `i` sees key `j` only when `i − j < W` (`W` keys, `i`
/// itself included), besides the causal, per-sample mask. A sink `s_h` joins each row's softmax
/// denominator as one more logit, not scaled, whose probability is then dropped:
/// `p_ij = exp(x_ij − m) / (Σ_l exp(x_il − m) + exp(s_h − m))` with `x = scale·q·kᵀ`, so a row's
/// probabilities sum to less than one. Sinks are frozen: no gradient reaches them. The default
/// (no window, no sinks) is plain causal attention.
#[derive(Clone, Debug, Default)]
pub struct WindowSinks {
    /// Keys a query sees, its own included (gpt-oss: `sliding_window` on its sliding layers).
    pub window: Option<usize>,
    /// `[query heads]` f32 on the inputs' device.
    pub sinks: Option<Tensor>,
}

impl WindowSinks {
    /// A copy checked for `heads` query heads on `device`, the sinks as f32 without a graph,
    /// contiguous from offset 0.
    pub(crate) fn prepared(&self, heads: usize, device: &Device) -> Result<Self> {
        if self.window == Some(0) {
            candle_core::bail!(
                "attention: a sliding window of 0 keys (a query sees at least itself)"
            );
        }
        let sinks = match &self.sinks {
            None => None,
            Some(s) if s.dims() == [heads] && s.device().same_device(device) => {
                Some(super::at_offset_zero(&s.detach().to_dtype(DType::F32)?)?)
            }
            Some(s) => candle_core::bail!(
                "attention: sinks {:?} on {:?} for {heads} query heads on {device:?} (one per query head, on the inputs' device)",
                s.dims(),
                s.device()
            ),
        };
        Ok(WindowSinks {
            window: self.window,
            sinks,
        })
    }

    /// The first key that query `q0` (and so any later query) may see.
    pub(crate) fn first_key(&self, q0: usize) -> usize {
        self.window.map_or(0, |w| q0.saturating_sub(w.max(1) - 1))
    }

    /// The window as the kernels take it: `i32::MAX` for none.
    #[cfg(feature = "cuda")]
    pub(crate) fn kernel_window(&self) -> i32 {
        self.window
            .map_or(i32::MAX, |w| i32::try_from(w).unwrap_or(i32::MAX))
    }
}

/// What the host knows of a micro-batch's samples, built once per micro-batch (`Model::inputs`)
/// for the kernels that take it on the host side (`cudnn_attn`).
#[derive(Clone, Debug, Default)]
pub struct RowSamples {
    /// Every row is one sample (no packing, no padding): plain causal attention.
    pub whole: bool,
    /// Packed rows as cuDNN's ragged layout takes them (CUDA, when cuDNN may serve them).
    pub ragged: Option<Ragged>,
}

/// Packed rows as cuDNN's ragged layout takes them: every sample and every padding run of the
/// micro-batch, in token order, is one sequence — attended causally within itself, as the
/// segments mask does. Counts are rounded up to powers of two so a few graphs serve every batch;
/// the sequences past the real ones are empty.
#[derive(Clone, Debug)]
pub struct Ragged {
    /// Sequences the graphs are built for: the real count rounded up to a power of two.
    pub seqs: usize,
    /// The longest sequence rounded up to a power of two, at least 64 and at most the row length.
    pub max_len: usize,
    /// `[seqs + 1]` u32 (read as int32) on the device: each sequence's first element in q (and
    /// the output) — its first token × heads × head size; the empty ones at the end.
    pub q_offsets: Tensor,
    /// `[seqs + 1]`: the same in k and v (× kv heads × head size).
    pub kv_offsets: Tensor,
    /// `[seqs]`: each sequence's length, 0 for the empty ones.
    pub lens: Tensor,
    /// `[B·S]`: each token's row of the per-sequence statistics `[seqs, heads, max_len]` seen
    /// as `[seqs·max_len, heads]` (sequence × max_len + position in it).
    pub stats_rows: Tensor,
}

impl Ragged {
    /// The layout of packed rows (`segments [B·S]`, the sample of each position) for heads of
    /// `head_dim`, on `device` (`cudnn_attn::ragged` decides whether cuDNN takes them).
    pub fn of(
        segments: &[u32],
        (b, s): (usize, usize),
        (heads, kv_heads, head_dim): (usize, usize, usize),
        device: &Device,
    ) -> Result<Self> {
        if segments.len() != b * s {
            candle_core::bail!(
                "ragged layout: {} segment ids for {b} × {s} positions",
                segments.len()
            );
        }
        // Runs of one segment id within a row, in token order: (first token, length).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for row in 0..b {
            let ids = &segments[row * s..(row + 1) * s];
            let mut start = 0;
            for t in 1..=s {
                if t == s || ids[t] != ids[start] {
                    runs.push((row * s + start, t - start));
                    start = t;
                }
            }
        }
        let longest = runs.iter().map(|r| r.1).max().unwrap_or(1);
        let seqs = runs.len().next_power_of_two();
        let max_len = longest.next_power_of_two().max(64).min(s);
        let mut stats_rows = vec![0u32; b * s];
        for (seq, &(first, len)) in runs.iter().enumerate() {
            for t in 0..len {
                stats_rows[first + t] = (seq * max_len + t) as u32;
            }
        }
        let offsets = |per_token: usize| -> Vec<u32> {
            let mut o: Vec<u32> = runs.iter().map(|r| (r.0 * per_token) as u32).collect();
            o.resize(seqs + 1, (b * s * per_token) as u32);
            o
        };
        let mut lens: Vec<u32> = runs.iter().map(|r| r.1 as u32).collect();
        lens.resize(seqs, 0);
        Ok(Ragged {
            seqs,
            max_len,
            q_offsets: Tensor::from_vec(offsets(heads * head_dim), seqs + 1, device)?,
            kv_offsets: Tensor::from_vec(offsets(kv_heads * head_dim), seqs + 1, device)?,
            lens: Tensor::from_vec(lens, seqs, device)?,
            stats_rows: Tensor::from_vec(stats_rows, b * s, device)?,
        })
    }
}

/// Bytes of one block's scores the block size is chosen for (each of the backward's four
/// block tensors is this large).
const BLOCK_SCORE_BYTES: usize = 256 << 20;

/// Query rows per block: as many as fit [`BLOCK_SCORE_BYTES`] of scores against all `s` keys,
/// at most 256 (smaller blocks skip more of the masked half) and at least 16.
pub fn query_block(batch: usize, heads: usize, s: usize, dtype: DType) -> usize {
    let per_row = (batch * heads * s * dtype.size_in_bytes()).max(1);
    (BLOCK_SCORE_BYTES / per_row).clamp(16, 256).min(s.max(1))
}

struct BlockedAttention {
    /// `[B, S]` u32 on the inputs' device.
    segments: Tensor,
    /// Checked (`WindowSinks::prepared`).
    extras: WindowSinks,
    scale: f32,
    block: usize,
}

/// Shapes of one call: batch, positions, query heads, kv heads, q/k head size, value head size.
struct Dims {
    b: usize,
    s: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    vd: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, s, nh, hd) = q.dims4()?;
        let (kb, ks, kvh, khd) = k.dims4()?;
        let (vb, vs, vkvh, vd) = v.dims4()?;
        if (kb, ks, khd) != (b, s, hd) || (vb, vs, vkvh) != (b, s, kvh) || kvh == 0 || nh % kvh != 0
        {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} are not [B, S, heads, head size] with kv heads dividing query heads",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Dims {
            b,
            s,
            nh,
            kvh,
            hd,
            vd,
        })
    }

    fn rep(&self) -> usize {
        self.nh / self.kvh
    }
}

/// Rows `q0..q0 + c` of `x [B, S, nh, w]` (w: a q/k or a value head's size) as
/// `[B, kvh, rep·c, w]`: the `rep` query heads of one kv head stacked along the rows, so one
/// batched GEMM serves a whole group.
fn query_rows(x: &Tensor, d: &Dims, q0: usize, c: usize) -> Result<Tensor> {
    let w = x.dim(3)?;
    x.reshape((d.b, d.s, d.kvh, d.rep(), w))?
        .narrow(1, q0, c)?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((d.b, d.kvh, d.rep() * c, w))
}

/// The inverse of [`query_rows`] for a block's result: `[B, kvh, rep·c, w]` → `[B, c, nh, w]`.
fn block_rows(y: &Tensor, d: &Dims, c: usize) -> Result<Tensor> {
    let w = y.dim(3)?;
    y.reshape((d.b, d.kvh, d.rep(), c, w))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((d.b, c, d.nh, w))
}

impl BlockedAttention {
    /// `segments` and `extras` on the inputs' device, `extras` checked.
    fn new(segments: &Tensor, extras: &WindowSinks, scale: f64, block: usize) -> Self {
        BlockedAttention {
            segments: segments.clone(),
            extras: extras.clone(),
            scale: scale as f32,
            block,
        }
    }

    /// `(q0, c, k0)` of every block: its first query, its rows, its first key.
    fn blocks(&self, s: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let c = self.block;
        (0..s)
            .step_by(c)
            .map(move |q0| (q0, c.min(s - q0), self.extras.first_key(q0)))
    }

    /// Keys (or values) `k0..q1` as `[B, kvh, q1 − k0, w]` from `[B, kvh, S, w]`.
    fn span(kv: &Tensor, k0: usize, q1: usize) -> Result<Tensor> {
        kv.narrow(2, k0, q1 - k0)?.contiguous()
    }

    /// One block's probabilities `[B, kvh, rep·c, q1 − k0]` from its queries and keys.
    fn probs(
        &self,
        d: &Dims,
        qc: &Tensor,
        kc: &Tensor,
        (q0, c, k0): (usize, usize, usize),
    ) -> Result<Tensor> {
        let keys = q0 + c - k0;
        let scores = qc.matmul(&kc.t()?)?.reshape((d.b, d.nh, c, keys))?;
        let p = softmax_block(&scores, &self.segments, (q0, k0), self.scale, &self.extras)?;
        p.reshape((d.b, d.kvh, d.rep() * c, keys))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = Dims::of(q, k, v)?;
        let kt = k.transpose(1, 2)?.contiguous()?; // [B, kvh, S, hd]
        let vt = v.transpose(1, 2)?.contiguous()?;
        let mut out = Vec::new();
        for (q0, c, k0) in self.blocks(d.s) {
            let q1 = q0 + c;
            let qc = query_rows(q, &d, q0, c)?;
            let p = self.probs(&d, &qc, &Self::span(&kt, k0, q1)?, (q0, c, k0))?;
            out.push(block_rows(&p.matmul(&Self::span(&vt, k0, q1)?)?, &d, c)?);
        }
        Tensor::cat(&out, 1)
    }

    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor) -> Result<[Tensor; 3]> {
        let d = Dims::of(q, k, v)?;
        let dout = dout.to_dtype(q.dtype())?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let vt = v.transpose(1, 2)?.contiguous()?;
        let mut dq = Vec::new();
        let mut dk = Tensor::zeros((d.b, d.kvh, d.s, d.hd), DType::F32, q.device())?;
        let mut dv = Tensor::zeros((d.b, d.kvh, d.s, d.vd), DType::F32, q.device())?;
        for (q0, c, k0) in self.blocks(d.s) {
            let (q1, keys) = (q0 + c, q0 + c - k0);
            let qc = query_rows(q, &d, q0, c)?;
            let kc = Self::span(&kt, k0, q1)?;
            let vc = Self::span(&vt, k0, q1)?;
            let p = self.probs(&d, &qc, &kc, (q0, c, k0))?;
            let doc = query_rows(&dout, &d, q0, c)?;
            let dp = doc.matmul(&vc.t()?)?.reshape((d.b, d.nh, c, keys))?;
            // A sink's column has no value, so no dP: the softmax backward is unchanged.
            let p4 = p.reshape((d.b, d.nh, c, keys))?;
            let ds = softmax_block_bwd(&p4, &dp, (q0, k0), self.scale)?.reshape((
                d.b,
                d.kvh,
                d.rep() * c,
                keys,
            ))?;
            dq.push(block_rows(&ds.matmul(&kc)?, &d, c)?);
            let pad = |t: Tensor| t.to_dtype(DType::F32)?.pad_with_zeros(2, k0, d.s - q1);
            dk = (dk + pad(ds.t()?.matmul(&qc)?)?)?;
            dv = (dv + pad(p.t()?.matmul(&doc)?)?)?;
        }
        let back = |t: Tensor| t.transpose(1, 2)?.to_dtype(q.dtype())?.contiguous();
        Ok([Tensor::cat(&dq, 1)?, back(dk)?, back(dv)?])
    }
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    super::tensor_forward!(3, "attention", forward);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: attention", q.device());
        let [dq, dk, dv] = self.backward(q, k, v, dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The forward of [`attention_with`] without a graph on q, k, v contiguous from offset 0: the
/// output and, from the fused kernels, the per-row log-sum-exp their backward takes (with the
/// sinks in it). `segments` comes with what the host knows of the samples: rows of one sample,
/// or packed rows in cuDNN's ragged layout, may run on cuDNN (`cudnn_attn`). `extras` checked
/// (`WindowSinks::prepared`).
pub(crate) fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (segments, samples): (&Tensor, &RowSamples),
    extras: &WindowSinks,
    scale: f64,
    block: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let d = Dims::of(q, k, v)?;
    #[cfg(feature = "cuda")]
    {
        let ragged = if samples.whole {
            None
        } else {
            samples.ragged.as_ref()
        };
        if (samples.whole || ragged.is_some())
            && super::cudnn_attn::serves(q, k, v, scale as f32, ragged, extras.window)
        {
            let (out, lse) = super::cudnn_attn::forward(q, k, v, scale as f32, ragged, extras)?;
            return Ok((out, Some(lse)));
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = samples;
    #[cfg(feature = "cuda")]
    if d.hd == d.vd && super::flash_attn::serves(q, k, v, d.hd) {
        let segments = super::at_offset_zero(segments)?;
        let (out, lse) = super::flash_attn::forward(q, k, v, &segments, scale as f32, extras)?;
        return Ok((out, Some(lse)));
    }
    let _ = d;
    let op = BlockedAttention::new(segments, extras, scale, block);
    Ok((op.forward(q, k, v)?, None))
}

/// The backward of [`attention_forward`]: `[dq, dk, dv]` from its inputs, output and lse and
/// the output's gradient `dout` (contiguous from offset 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (segments, samples): (&Tensor, &RowSamples),
    extras: &WindowSinks,
    scale: f64,
    block: usize,
    forward: (&Tensor, Option<&Tensor>),
    dout: &Tensor,
) -> Result<[Tensor; 3]> {
    // The fused kernels' backward needs nothing of the sinks: their output and lse come with
    // the sinks in them (`attn_sinks`).
    #[cfg(feature = "cuda")]
    if let (out, Some(lse)) = forward {
        if super::cudnn_attn::is_its_lse(lse) {
            let ragged = if samples.whole {
                None
            } else {
                samples.ragged.as_ref()
            };
            let grads = (out, dout, lse);
            let (scale, window) = (scale as f32, extras.window);
            if samples.whole && super::attn_sm90::serves(q, k, v, window) {
                return super::attn_sm90::backward(q, k, v, grads, scale);
            }
            return super::cudnn_attn::backward(q, k, v, grads, scale, ragged, window);
        }
        let segments = super::at_offset_zero(segments)?;
        let grads = (out, dout, lse);
        return super::flash_attn::backward(q, k, v, &segments, grads, scale as f32, extras);
    }
    let _ = (forward, samples);
    let op = BlockedAttention::new(segments, extras, scale, block);
    op.backward(q, k, v, dout)
}

/// Causal attention within packed sequences: q `[B, S, nh, hd]`, k `[B, S, kvh, hd]`, v
/// `[B, S, kvh, vd]` (query head `h` uses kv head `h / (nh / kvh)`), `segments [B, S]` u32 on
/// the same device → `[B, S, nh, vd]`, computed `block` query positions at a time (see [`query_block`]).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    attention_with(q, k, v, segments, scale, block, &WindowSinks::default())
}

/// [`attention`] with a sliding window and sinks (`extras`, sinks on the inputs' device).
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
    block: usize,
    extras: &WindowSinks,
) -> Result<Tensor> {
    let d = Dims::of(q, k, v)?;
    if segments.dims2()? != (d.b, d.s) || segments.dtype() != DType::U32 || block == 0 {
        candle_core::bail!(
            "attention: segments {:?} {:?} (block {block}) for q {:?}",
            segments.dims(),
            segments.dtype(),
            q.dims()
        );
    }
    let extras = extras.prepared(d.nh, q.device())?;
    #[cfg(feature = "cuda")]
    if d.hd == d.vd && super::flash_attn::serves(q, k, v, d.hd) {
        let z = super::at_offset_zero;
        let (q, k, v) = (z(q)?, z(k)?, z(v)?);
        return super::flash_attn::attention(&q, &k, &v, segments, scale as f32, &extras);
    }
    let op = BlockedAttention::new(segments, &extras, scale, block);
    let z = super::at_offset_zero;
    let (q, k, v) = (z(q)?, z(k)?, z(v)?);
    if super::records_graph(&[&q, &k, &v]) {
        q.apply_op3(&k, &v, op)
    } else {
        super::direct(op.forward(&q, &k, &v)?)
    }
}

/// The primitive-op version the op is tested against: the whole `[B, nh, S, S]` score matrix,
/// the additive-mask softmax of [`masked_softmax_reference`] and k/v repeated per query head,
/// differentiated by candle's autograd. `segments` as rows of u32.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<u32>],
    scale: f64,
) -> Result<Tensor> {
    attention_reference_with(q, k, v, segments, scale, &WindowSinks::default())
}

/// [`attention_reference`] with a sliding window and sinks: the window in the additive mask, the
/// sinks as one more score column that the softmax normalises over and that is then dropped.
pub fn attention_reference_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<u32>],
    scale: f64,
    extras: &WindowSinks,
) -> Result<Tensor> {
    let d = Dims::of(q, k, v)?;
    let heads = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(1, 2)?.contiguous()?; // [B, kvh, S, hd]
        let idx: Vec<u32> = (0..d.nh).map(|h| (h / d.rep()) as u32).collect();
        t.index_select(&Tensor::new(idx, t.device())?, 1)
    };
    let qt = q.transpose(1, 2)?.contiguous()?; // [B, nh, S, hd]
    let scores = qt.matmul(&heads(k)?.t()?)?;
    let p = masked_softmax_reference(&scores, segments, scale, extras)?;
    p.matmul(&heads(v)?)?.transpose(1, 2)?.contiguous()
}
