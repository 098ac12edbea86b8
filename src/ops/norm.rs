//! RMSNorm as transformers computes it: in f32, `x · rsqrt(mean(x²) + eps)`, rounded back to
//! the input dtype, then multiplied by the weight.
//! x: [.., D], w: [D] → [.., D] in x's dtype. One op with its own backward
//! (`kernels/rms_norm.cu` on CUDA, candle ops on the CPU); the weight is frozen (norms are not
//! trained), so only x gets a gradient. `rms_norm_reference` is the primitive-op version it is
//! tested against (candle-nn's `rms_norm` records no backward; docs/ARCHITECTURE.md, decision 1).

use candle_core::{CustomOp1, CustomOp2, DType, Result, Tensor, D};

struct RmsNorm {
    /// [D] in x's dtype, on x's device.
    w: Tensor,
    eps: f64,
}

/// dx of RMSNorm with a frozen weight from primitive ops: g = dy·w, n = x·r,
/// dx = r·(g − n·mean(g·n)), in f32.
fn rms_norm_bwd_ops(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let n = xf.broadcast_mul(&r)?;
    let g = dy
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let mean_gn = (&g * &n)?.mean_keepdim(D::Minus1)?;
    (g - n.broadcast_mul(&mean_gn)?)?
        .broadcast_mul(&r)?
        .to_dtype(x.dtype())
}

/// The packs a lane of the `_vec` kernels holds (8 or 16) for rows of x (`[.., d]`, d > 1,024)
/// when every operand is in whole 16-byte packs on pack boundaries and they fit: at most 8 in
/// the backward (`backward`), 16 in the forward. `None`: the other kernels.
#[cfg(feature = "cuda")]
fn vec_packs(x: &Tensor, operands: &[&Tensor], backward: bool) -> Option<usize> {
    let d = x.dims().last().copied().unwrap_or(0);
    let per_pack = 16 / x.dtype().size_in_bytes();
    let aligned = operands
        .iter()
        .all(|t| t.layout().start_offset() % per_pack == 0 && t.dtype() == x.dtype());
    let lanes_packs = (d / per_pack).div_ceil(32);
    let most = if backward { 8 } else { 16 };
    (d > 1024 && d % per_pack == 0 && aligned && lanes_packs <= most)
        .then_some(if lanes_packs <= 8 { 8 } else { 16 })
}

/// The norm (no `dy`), its backward, or its backward plus `plus` (`x`'s shape; the `_vec`
/// kernels only: [`vec_packs`] must serve it).
#[cfg(feature = "cuda")]
fn rms_norm_cuda(
    x: &Tensor,
    w: &Tensor,
    dy: Option<&Tensor>,
    plus: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    rms_norm_cuda_wide(x, w, dy, plus, eps, 0)
}

/// [`rms_norm_cuda`] with the forward's rows `extra` wider (`rms_norm_fwd_wide_vec`: the
/// `_vec` kernels only, `extra` whole packs), the last columns not written.
#[cfg(feature = "cuda")]
fn rms_norm_cuda_wide(
    x: &Tensor,
    w: &Tensor,
    dy: Option<&Tensor>,
    plus: Option<&Tensor>,
    eps: f64,
    extra: usize,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::Storage;
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("rms_norm: not on CUDA")
    };
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let suffix = match x.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("rms_norm: {other:?} not supported"),
    };
    let pass = match (dy, plus) {
        (None, _) => "fwd",
        (Some(_), None) => "bwd",
        (Some(_), Some(_)) => "bwd_plus",
    };
    // Rows of up to 1,024 (the per-head q/k norms): one warp per row, 8 rows per block.
    // Longer rows where `vec_packs` serves them: one warp per row holding it in registers.
    let operands: Vec<&Tensor> = [Some(x), Some(w), dy, plus].into_iter().flatten().collect();
    let vec = vec_packs(x, &operands, dy.is_some());
    if plus.is_some() && vec.is_none() {
        candle_core::bail!("rms_norm: the backward plus a residual needs the _vec kernels");
    }
    let per_pack = 16 / x.dtype().size_in_bytes();
    if extra > 0 && (dy.is_some() || vec.is_none() || extra % per_pack != 0) {
        candle_core::bail!("rms_norm: rows {extra} wider need the _vec forward and whole packs");
    }
    let per_warp = d <= 1024 || vec.is_some();
    let kind = match (d <= 1024, vec) {
        (true, _) => "_warp".to_string(),
        (false, Some(packs)) => format!("_vec{packs}"),
        (false, None) => String::new(),
    };
    let wide = if extra > 0 { "_wide" } else { "" };
    let func = dev.get_or_load_custom_func(
        &format!("rms_norm_{pass}{wide}{kind}_{suffix}"),
        "moeq_rms_norm",
        super::kernels::RMS_NORM,
    )?;
    let gx = x.storage_and_layout();
    let gw = w.storage_and_layout();
    let gd = dy.map(|t| t.storage_and_layout());
    let gp = plus.map(|t| t.storage_and_layout());
    let cfg = LaunchConfig {
        grid_dim: (if per_warp { rows.div_ceil(8) } else { rows } as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let eps32 = eps as f32;
    let d32 = d as i32;
    macro_rules! run {
        ($variant:path) => {{
            macro_rules! view {
                ($g:expr, $n:expr) => {
                    match &*$g.0 {
                        Storage::Cuda(c) => match &c.slice {
                            $variant(v) => v.slice($g.1.start_offset()..$g.1.start_offset() + $n),
                            _ => candle_core::bail!("rms_norm: operands differ in dtype"),
                        },
                        _ => candle_core::bail!("rms_norm: not on CUDA"),
                    }
                };
            }
            let (xv, wv) = (view!(gx, rows * d), view!(gw, d));
            let dv = match &gd {
                Some(g) => Some(view!(g, rows * d)),
                None => None,
            };
            let pv = match &gp {
                Some(g) => Some(view!(g, rows * d)),
                None => None,
            };
            // SAFETY: the kernel writes every row (a wide row's last `extra` columns are the
            // caller's to write).
            let out = unsafe { dev.alloc(rows * (d + extra))? };
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&wv);
            if let Some(dv) = &dv {
                b.arg(dv);
            }
            if let Some(pv) = &pv {
                b.arg(pv);
            }
            b.arg(&out);
            let ld = d + extra;
            if per_warp {
                b.arg(&rows);
                b.arg(&d32);
                if extra > 0 {
                    b.arg(&ld);
                }
            } else {
                b.arg(&d);
            }
            b.arg(&eps32);
            // SAFETY: arguments match kernels/rms_norm.cu.
            unsafe { b.launch(cfg) }.w()?;
            $variant(out)
        }};
    }
    let slice = match x.dtype() {
        DType::F32 => run!(S::F32),
        DType::BF16 => run!(S::BF16),
        _ => run!(S::F16),
    };
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last += extra;
    }
    Ok(super::cuda_tensor(slice, dev, shape.into()))
}

impl RmsNorm {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return rms_norm_cuda(x, &self.w, None, None, self.eps);
        }
        rms_norm_reference(x, &self.w, self.eps)
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    super::tensor_forward!(1, "rms_norm", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: rms_norm", x.device());
        let dy = super::at_offset_zero(&dy.to_dtype(x.dtype())?)?;
        let bwd = RmsNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(super::direct(bwd.fwd(&x.detach(), &dy)?)?))
    }
}

/// (x, dy) → dx.
struct RmsNormBwd {
    w: Tensor,
    eps: f64,
}

impl RmsNormBwd {
    fn fwd(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return rms_norm_cuda(x, &self.w, Some(dy), None, self.eps);
        }
        rms_norm_bwd_ops(x, &self.w, dy, self.eps)
    }
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
    }

    super::tensor_forward!(2, "rms_norm_bwd", fwd);
}

/// The op's forward on any device, no graph: x `[.., d]`, w `[d]` in x's dtype, contiguous.
pub(crate) fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    RmsNorm { w: w.clone(), eps }.fwd(x)
}

/// The op's backward on any device, no graph: dx from x and dy (x's dtype, contiguous).
pub(crate) fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    RmsNormBwd { w: w.clone(), eps }.fwd(x, dy)
}

/// `plus + rms_norm_backward(x, w, dy)` (a pre-norm residual's input gradient), all in x's
/// dtype, contiguous: on CUDA one pass where the `_vec` kernels serve the rows (the same values
/// as the separate add), else the backward then [`super::add::add`].
pub(crate) fn rms_norm_backward_plus(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    plus: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && plus.dims() == x.dims()
        && plus.is_contiguous()
        && vec_packs(x, &[x, w, dy, plus], true).is_some()
    {
        return rms_norm_cuda(x, w, Some(dy), Some(plus), eps);
    }
    super::add::add(plus, &rms_norm_backward(x, w, dy, eps)?)
}

/// RMSNorm of x with a frozen weight (no gradient for `w`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _t = crate::util::phases::Span::start("rms_norm", x.device());
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} for {d} features", w.dims());
    }
    let w = super::at_offset_zero(&w.to_dtype(x.dtype())?.detach())?;
    let x = super::at_offset_zero(x)?;
    let op = RmsNorm { w, eps };
    if super::records_graph(&[&x]) {
        x.apply_op1(op)
    } else {
        super::direct(op.fwd(&x)?)
    }
}

/// RMSNorm of x `[N, d]` (no graph) into rows `extra` columns wider, `[N, d + extra]`: the
/// norm in the first d columns (the values of [`rms_norm`]), the last `extra` left for the
/// caller to write — uninitialised on CUDA where the `_vec` kernels serve the rows (the norm
/// written in place, no copy), zeros otherwise (the norm, then a concatenation).
pub(crate) fn rms_norm_wide(x: &Tensor, w: &Tensor, eps: f64, extra: usize) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    if w.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} for {d} features", w.dims());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && extra % (16 / x.dtype().size_in_bytes()) == 0 {
        let w = super::at_offset_zero(&w.to_dtype(x.dtype())?.detach())?;
        let x = super::at_offset_zero(x)?;
        if vec_packs(&x, &[&x, &w], false).is_some() {
            let _t = crate::util::phases::Span::start("rms_norm", x.device());
            return rms_norm_cuda_wide(&x, &w, None, None, eps, extra);
        }
    }
    let normed = rms_norm(&x.detach(), w, eps)?;
    let room = Tensor::zeros((n, extra), normed.dtype(), normed.device())?;
    Tensor::cat(&[&normed, &room], 1)
}

/// The primitive-op RMSNorm (gradients to x and w through candle's autograd).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

/// Softmax over the last dimension from primitive ops, the max subtracted as a constant
/// (it cancels in the gradient). x: [.., N] → [.., N].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
