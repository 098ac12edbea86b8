//! Masked softmax of attention scores as one op with its own backward (`kernels/attn_softmax.cu`
//! on CUDA, the loops below on the CPU): scores `[B, H, S, S]` in the compute dtype → probabilities
//! in the same dtype, scaled, masked and normalised in f32 in one pass. Query `i` sees key `j`
//! when `j ≤ i`, both are in the same packed sequence (`segments [B, S]`) and, with a sliding
//! window of `W`, `i − j < W`, as the additive mask of the primitive-op version did; no mask
//! tensor and no f32 copy of the scores exist. A head's sink logit `s_h` (`WindowSinks`) adds
//! `exp(s_h − m)` to each of its rows' denominators.
//! Backward: `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))` from the saved probabilities — the same
//! with sinks, whose column has no dP.

use super::attention::WindowSinks;
use candle_core::{CustomOp1, CustomOp2, DType, Result, Tensor};

/// Whether query `i` sees key `j` (`window`: `usize::MAX` for none).
fn visible(seg: &[u32], i: usize, j: usize, window: usize) -> bool {
    j <= i && i - j < window && seg[j] == seg[i]
}

/// A block of score rows: `[B, H, C, K]`, query positions `q0..q0 + C` against keys
/// `k0..k0 + K` (`k0 ≤ q0`: keys before `k0` are out of every row's window).
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    h: usize,
    rows: usize,
    keys: usize,
    q0: usize,
    k0: usize,
}

impl Block {
    fn of(t: &Tensor, (q0, k0): (usize, usize)) -> Result<Self> {
        let (b, h, rows, keys) = t.dims4()?;
        if q0 + rows > k0 + keys || k0 > q0 {
            candle_core::bail!(
                "masked_softmax: queries {q0}..{} are not within the keys {k0}..{} of scores {:?}",
                q0 + rows,
                k0 + keys,
                t.dims()
            );
        }
        Ok(Block {
            b,
            h,
            rows,
            keys,
            q0,
            k0,
        })
    }

    /// Calls `f(row, batch, head, query position)` for every score row.
    fn for_rows(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        for row in 0..self.b * self.h * self.rows {
            let (bh, c) = (row / self.rows, row % self.rows);
            f(row, bh / self.h, bh % self.h, self.q0 + c);
        }
    }
}

/// The CPU forward in f32; `sinks` one per head.
fn masked_softmax_cpu(
    scores: &Tensor,
    segments: &[Vec<u32>],
    blk: Block,
    scale: f32,
    (window, sinks): (usize, Option<&[f32]>),
) -> Result<Tensor> {
    let (kk, k0) = (blk.keys, blk.k0);
    let x: Vec<f32> = scores.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut p = vec![0f32; x.len()];
    blk.for_rows(|row, b, h, i| {
        let seg = &segments[b];
        let xs = &x[row * kk..(row + 1) * kk];
        let keys = || (k0..=i).filter(|&j| visible(seg, i, j, window));
        let sink = sinks.map(|s| s[h]);
        let m = keys()
            .map(|j| scale * xs[j - k0])
            .fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
        let sum: f32 = keys().map(|j| (scale * xs[j - k0] - m).exp()).sum::<f32>()
            + sink.map_or(0.0, |s| (s - m).exp());
        for j in keys() {
            p[row * kk + j - k0] = (scale * xs[j - k0] - m).exp() / sum;
        }
    });
    Tensor::from_vec(p, scores.shape(), scores.device())?.to_dtype(scores.dtype())
}

/// The CPU backward in f32.
fn masked_softmax_bwd_cpu(p: &Tensor, dp: &Tensor, blk: Block, scale: f32) -> Result<Tensor> {
    let kk = blk.keys;
    let pv: Vec<f32> = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let dv: Vec<f32> = dp.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut ds = vec![0f32; pv.len()];
    blk.for_rows(|row, _, _, i| {
        // Keys k0..=i; masked ones have p = 0, so dS = 0 there.
        let r = row * kk..row * kk + i + 1 - blk.k0;
        let dot: f32 = r.clone().map(|j| pv[j] * dv[j]).sum();
        for j in r {
            ds[j] = scale * pv[j] * (dv[j] - dot);
        }
    });
    Tensor::from_vec(ds, p.shape(), p.device())?.to_dtype(p.dtype())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Block;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{Result, Storage, Tensor};

    fn suffix(t: &Tensor) -> Result<&'static str> {
        Ok(match t.dtype() {
            candle_core::DType::F32 => "f32",
            candle_core::DType::BF16 => "bf16",
            candle_core::DType::F16 => "f16",
            other => candle_core::bail!("masked_softmax: {other:?} not supported"),
        })
    }

    /// Runs `name_<dtype>(a, b, out, ints..., rows, scale[, address])` with one warp per row (8
    /// per block); returns the output in a's shape and dtype.
    fn launch(
        name: &str,
        a: &Tensor,
        b: &Tensor,
        rows: usize,
        ints: &[i32],
        (scale, address): (&f32, Option<&u64>),
    ) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = a.device() else {
            candle_core::bail!("masked_softmax: not on CUDA")
        };
        let n = a.elem_count();
        let func = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(a)?),
            "moeq_attn_softmax",
            crate::ops::kernels::ATTN_SOFTMAX,
        )?;
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cuda(sa), Storage::Cuda(sb)) = (&*sa, &*sb) else {
            candle_core::bail!("masked_softmax: not on CUDA")
        };
        const WARPS: usize = 8; // kernels/attn_softmax.cu
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let total = i32::try_from(rows)
            .map_err(|_| candle_core::Error::Msg(format!("masked_softmax: {rows} rows")))?;
        macro_rules! run {
            ($x:expr, $y:expr, $wrap:path) => {{
                let x = $x.slice(la.start_offset()..la.start_offset() + n);
                let y = $y.slice(lb.start_offset()..);
                // SAFETY: the kernel writes every element of the output.
                let out = unsafe { dev.alloc(n)? };
                let mut args = func.builder();
                args.arg(&x);
                args.arg(&y);
                args.arg(&out);
                for v in ints {
                    args.arg(v);
                }
                args.arg(&total);
                args.arg(scale);
                if let Some(address) = address {
                    args.arg(address);
                }
                // SAFETY: arguments match kernels/attn_softmax.cu.
                unsafe { args.launch(cfg) }.w()?;
                $wrap(out)
            }};
        }
        let slice = match (&sa.slice, &sb.slice) {
            (S::F32(x), S::U32(y)) => run!(x, y, S::F32),
            (S::BF16(x), S::U32(y)) => run!(x, y, S::BF16),
            (S::F16(x), S::U32(y)) => run!(x, y, S::F16),
            (S::F32(x), S::F32(y)) => run!(x, y, S::F32),
            (S::BF16(x), S::BF16(y)) => run!(x, y, S::BF16),
            (S::F16(x), S::F16(y)) => run!(x, y, S::F16),
            _ => candle_core::bail!("masked_softmax: unexpected operand dtypes"),
        };
        let storage = candle_core::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            a.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    /// `extras` checked, its sinks f32 on the scores' device.
    pub fn forward(
        scores: &Tensor,
        segments: &Tensor,
        blk: Block,
        scale: f32,
        extras: &super::WindowSinks,
    ) -> Result<Tensor> {
        let seq = segments.dim(1)?;
        let int = |v: usize| v as i32;
        let ints = [
            int(blk.h),
            int(blk.rows),
            int(blk.keys),
            int(seq),
            int(blk.q0),
            int(blk.k0),
            extras.kernel_window(),
        ];
        let rows = blk.b * blk.h * blk.rows;
        // The sinks' address, 0 for none (the kernel reads a null pointer as no sinks).
        let sinks = extras.sinks.as_ref().map(|t| t.storage_and_layout());
        let address = match &sinks {
            Some((st, l)) => {
                let Storage::Cuda(c) = &**st else {
                    candle_core::bail!("masked_softmax: sinks not on CUDA")
                };
                let stream = c.device.cuda_stream();
                let view = c.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
                let (address, _sync) = view.device_ptr(&stream);
                address
            }
            None => 0,
        };
        let tail = (&scale, Some(&address));
        launch("masked_softmax_fwd", scores, segments, rows, &ints, tail)
    }

    pub fn backward(p: &Tensor, dp: &Tensor, blk: Block, scale: f32) -> Result<Tensor> {
        let ints = [blk.rows, blk.keys, blk.q0, blk.k0].map(|v| v as i32);
        let rows = blk.b * blk.h * blk.rows;
        launch("masked_softmax_bwd", p, dp, rows, &ints, (&scale, None))
    }
}

/// `(B, H, S)` of square scores `[B, H, S, S]`.
fn dims4(t: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, h, s, s2) = t.dims4()?;
    if s != s2 {
        candle_core::bail!("masked_softmax: scores [{b}, {h}, {s}, {s2}] are not square");
    }
    Ok((b, h, s))
}

fn cpu_segments(segments: &Tensor) -> Result<Vec<Vec<u32>>> {
    segments.to_device(&candle_core::Device::Cpu)?.to_vec2()
}

/// The masked softmax of a block of scores `[B, H, C, K]` (queries `q0..q0 + C`, keys
/// `k0..k0 + K`, contiguous from offset 0) on the scores' device, without autograd; `extras`
/// checked for `H` heads (`WindowSinks::prepared`).
pub(crate) fn softmax_block(
    scores: &Tensor,
    segments: &Tensor,
    (q0, k0): (usize, usize),
    scale: f32,
    extras: &WindowSinks,
) -> Result<Tensor> {
    let blk = Block::of(scores, (q0, k0))?;
    let (sb, seq) = segments.dims2()?;
    if sb != blk.b || k0 + blk.keys > seq || segments.dtype() != DType::U32 {
        candle_core::bail!(
            "masked_softmax: segments {:?} {:?} for scores {:?} from key {k0}",
            segments.dims(),
            segments.dtype(),
            scores.dims()
        );
    }
    match scores.device() {
        candle_core::Device::Cpu => {
            let window = extras.window.unwrap_or(usize::MAX);
            let sinks = match &extras.sinks {
                Some(s) => Some(s.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?),
                None => None,
            };
            let segments = cpu_segments(segments)?;
            masked_softmax_cpu(scores, &segments, blk, scale, (window, sinks.as_deref()))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda::forward(scores, segments, blk, scale, extras),
        #[allow(unreachable_patterns)]
        d => candle_core::bail!("masked_softmax: device {d:?} not supported"),
    }
}

/// The scores' gradient of [`softmax_block`] from its probabilities and their gradient (same
/// shape, contiguous from offset 0), without autograd.
pub(crate) fn softmax_block_bwd(
    p: &Tensor,
    dp: &Tensor,
    (q0, k0): (usize, usize),
    scale: f32,
) -> Result<Tensor> {
    if p.dims() != dp.dims() || p.dtype() != dp.dtype() {
        candle_core::bail!(
            "masked_softmax_bwd: probs {:?} vs grads {:?}",
            p.dims(),
            dp.dims()
        );
    }
    let blk = Block::of(p, (q0, k0))?;
    match p.device() {
        candle_core::Device::Cpu => masked_softmax_bwd_cpu(p, dp, blk, scale),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda::backward(p, dp, blk, scale),
        #[allow(unreachable_patterns)]
        d => candle_core::bail!("masked_softmax: device {d:?} not supported"),
    }
}

struct MaskedSoftmax {
    /// `[B, S]` u32 on the scores' device.
    segments: Tensor,
    /// Checked (`WindowSinks::prepared`).
    extras: WindowSinks,
    scale: f32,
}

impl MaskedSoftmax {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        softmax_block(x, &self.segments, (0, 0), self.scale, &self.extras)
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked_softmax"
    }

    super::tensor_forward!(1, "masked_softmax", fwd);

    fn bwd(&self, _x: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: attention softmax", probs.device());
        let grad = super::at_offset_zero(&grad.to_dtype(probs.dtype())?)?;
        let probs = super::at_offset_zero(&probs.detach())?;
        let ds = super::direct(MaskedSoftmaxBwd(self.scale).fwd(&probs, &grad)?)?;
        Ok(Some(ds))
    }
}

/// (probabilities, their gradient) → the scores' gradient.
struct MaskedSoftmaxBwd(f32);

impl MaskedSoftmaxBwd {
    fn fwd(&self, p: &Tensor, dp: &Tensor) -> Result<Tensor> {
        softmax_block_bwd(p, dp, (0, 0), self.0)
    }
}

impl CustomOp2 for MaskedSoftmaxBwd {
    fn name(&self) -> &'static str {
        "masked_softmax_bwd"
    }

    super::tensor_forward!(2, "masked_softmax_bwd", fwd);
}

/// `softmax(scale · scores + mask)` over the last dimension with the causal, per-sequence mask
/// of `segments [B, S]` (u32, on the scores' device), narrowed by `extras`' window and with its
/// sinks in the denominators: `[B, H, S, S]` → same shape and dtype.
pub fn masked_softmax(
    scores: &Tensor,
    segments: &Tensor,
    scale: f64,
    extras: &WindowSinks,
) -> Result<Tensor> {
    let (b, h, s) = dims4(scores)?;
    if segments.dims2()? != (b, s) || segments.dtype() != DType::U32 {
        candle_core::bail!(
            "masked_softmax: segments {:?} {:?} for scores {:?}",
            segments.dims(),
            segments.dtype(),
            scores.dims()
        );
    }
    let scores = super::at_offset_zero(scores)?;
    let op = MaskedSoftmax {
        segments: segments.clone(),
        extras: extras.prepared(h, scores.device())?,
        scale: scale as f32,
    };
    if super::records_graph(&[&scores]) {
        scores.apply_op1(op)
    } else {
        super::direct(op.fwd(&scores)?)
    }
}

/// The primitive-op version the op is tested against: an additive −∞ mask (the window in it),
/// the sinks as one more column of logits `[B, H, S, 1]`, an f32 softmax over keys and sink, and
/// the sink's column dropped.
pub fn masked_softmax_reference(
    scores: &Tensor,
    segments: &[Vec<u32>],
    scale: f64,
    extras: &WindowSinks,
) -> Result<Tensor> {
    let (b, h, s) = dims4(scores)?;
    let window = extras.window.unwrap_or(usize::MAX);
    let mut mask = vec![f32::NEG_INFINITY; b * s * s];
    for (bi, seg) in segments.iter().enumerate() {
        for i in 0..s {
            for j in 0..=i {
                if visible(seg, i, j, window) {
                    mask[(bi * s + i) * s + j] = 0.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, s, s), scores.device())?;
    let x = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    let p = match &extras.sinks {
        None => super::norm::softmax_last(&x)?,
        Some(sinks) => {
            let column = sinks
                .to_dtype(DType::F32)?
                .to_device(scores.device())?
                .reshape((1, h, 1, 1))?
                .broadcast_as((b, h, s, 1))?;
            super::norm::softmax_last(&Tensor::cat(&[&x, &column], 3)?)?.narrow(3, 0, s)?
        }
    };
    p.to_dtype(scores.dtype())
}
