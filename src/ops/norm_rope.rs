//! The per-head RMSNorm of q or k (for the architectures that have it) and the rotary
//! embedding as one pass: x `[N, heads, hd]` → `[N, heads, hd]`. On CUDA for heads of 64, 128
//! and 256 one kernel (`kernels/norm_rope.cu`) reads x once and writes the rotated rows once,
//! and its backward reads x and dy once; the separate ops (`ops::norm`, `ops::rope`) made four
//! passes forward and four backward, at a third of the memory bandwidth. Elsewhere (the CPU,
//! other head sizes) the separate ops run, in the same order with the same roundings: they
//! are the reference the kernel is checked against (`moeq gpu-check`, the "norm_rope" entries).

use super::norm::{rms_norm_backward, rms_norm_forward};
use super::rope::rope_forward;
use candle_core::{CustomOp3, Result, Tensor};

/// The per-head norm's weight (`[hd]`, x's dtype, contiguous from offset 0) and epsilon.
pub(crate) type HeadNorm<'a> = Option<(&'a Tensor, f64)>;

/// Whether the fused kernel takes x `[N, heads, hd]` with these other operands: on CUDA, heads
/// of 64, 128 or 256, every operand contiguous from offset 0 (the kernel's loads are aligned
/// to whole rows).
#[cfg(feature = "cuda")]
fn fused(x: &Tensor, others: &[&Tensor]) -> bool {
    let from_zero = |t: &Tensor| t.layout().contiguous_offsets() == Some((0, t.elem_count()));
    x.device().is_cuda()
        && matches!(x.dims().last(), Some(64 | 128 | 256))
        && from_zero(x)
        && others.iter().all(|t| from_zero(t))
}

/// norm (if any) then rotary embedding of x `[N, heads, hd]`, no graph; cos/sin `[N, 1, hd]`
/// in x's dtype; all contiguous from offset 0.
pub(crate) fn norm_rope_forward(
    x: &Tensor,
    norm: HeadNorm,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, &[cos, sin]) && norm.is_none_or(|(w, _)| fused(x, &[w])) {
        return cuda::run(x, norm, cos, sin, None);
    }
    let z = match norm {
        Some((w, eps)) => super::at_offset_zero(&rms_norm_forward(x, w, eps)?)?,
        None => x.clone(),
    };
    rope_forward(&z, cos, sin, false)
}

/// dL/dx of [`norm_rope_forward`] for upstream `dy` (x's shape and dtype, contiguous from
/// offset 0), no graph.
pub(crate) fn norm_rope_backward(
    x: &Tensor,
    norm: HeadNorm,
    cos: &Tensor,
    sin: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, &[cos, sin, dy]) && norm.is_none_or(|(w, _)| fused(x, &[w])) {
        return cuda::run(x, norm, cos, sin, Some(dy));
    }
    let dz = rope_forward(dy, cos, sin, true)?;
    match norm {
        Some((w, eps)) => rms_norm_backward(x, w, &dz, eps),
        None => Ok(dz),
    }
}

/// [`norm_rope_forward`] as a graph op on (x, cos, sin): x gets the gradient, the tables none.
pub fn norm_rope(x: &Tensor, norm: HeadNorm, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, _, hd) = x.dims3()?;
    let bad_weight = norm.is_some_and(|(w, _)| w.dims() != [hd]);
    if hd % 2 != 0 || cos.dims() != [n, 1, hd] || sin.dims() != [n, 1, hd] || bad_weight {
        candle_core::bail!(
            "norm_rope: x {:?} with cos {:?}, sin {:?} and a norm weight of {:?}",
            x.dims(),
            cos.dims(),
            sin.dims(),
            norm.map(|(w, _)| w.dims().to_vec())
        );
    }
    let z = super::at_offset_zero;
    let own = |t: &Tensor| z(&t.to_dtype(x.dtype())?.detach());
    let op = NormRope {
        norm: norm.map(|(w, eps)| own(w).map(|w| (w, eps))).transpose()?,
    };
    let (x, cos, sin) = (z(x)?, own(cos)?, own(sin)?);
    if super::records_graph(&[&x]) {
        x.apply_op3(&cos, &sin, op)
    } else {
        super::direct(op.fwd(&x, &cos, &sin)?)
    }
}

struct NormRope {
    norm: Option<(Tensor, f64)>,
}

impl NormRope {
    fn head_norm(&self) -> HeadNorm<'_> {
        self.norm.as_ref().map(|(w, eps)| (w, *eps))
    }

    fn fwd(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        norm_rope_forward(x, self.head_norm(), cos, sin)
    }
}

impl CustomOp3 for NormRope {
    fn name(&self) -> &'static str {
        "norm_rope"
    }

    super::tensor_forward!(3, "norm_rope", fwd);

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = super::at_offset_zero(&dy.to_dtype(x.dtype())?)?;
        let dx = norm_rope_backward(&x.detach(), self.head_norm(), cos, sin, &dy.detach())?;
        Ok((Some(super::direct(dx)?), None, None))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::HeadNorm;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{DType, Result, Storage, Tensor};

    /// The forward (`dy` None) or backward kernel over x `[N, heads, hd]`.
    pub(super) fn run(
        x: &Tensor,
        norm: HeadNorm,
        cos: &Tensor,
        sin: &Tensor,
        dy: Option<&Tensor>,
    ) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = x.device() else {
            candle_core::bail!("norm_rope: not on CUDA")
        };
        let (n, heads, hd) = x.dims3()?;
        let rows = n * heads;
        if rows > u32::MAX as usize {
            candle_core::bail!("norm_rope: {rows} rows do not fit the kernel's 32-bit index");
        }
        let suffix = match x.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("norm_rope: {other:?} not supported"),
        };
        let pass = if dy.is_some() { "bwd" } else { "fwd" };
        let func = dev.get_or_load_custom_func(
            &format!("norm_rope_{pass}_{}_{suffix}", hd / 32),
            "moeq_norm_rope",
            crate::ops::kernels::NORM_ROPE,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (gx, gc, gs) = (
            x.storage_and_layout(),
            cos.storage_and_layout(),
            sin.storage_and_layout(),
        );
        let gw = norm.map(|(w, _)| w.storage_and_layout());
        let gd = dy.map(|t| t.storage_and_layout());
        let eps = norm.map_or(0.0, |(_, eps)| eps as f32);
        let (rows32, heads32) = (rows as u32, heads as u32);
        macro_rules! run {
            ($variant:path) => {{
                macro_rules! view {
                    ($g:expr, $len:expr) => {
                        match &*$g.0 {
                            Storage::Cuda(c) => match &c.slice {
                                $variant(v) => {
                                    v.slice($g.1.start_offset()..$g.1.start_offset() + $len)
                                }
                                _ => candle_core::bail!("norm_rope: operands differ in dtype"),
                            },
                            _ => candle_core::bail!("norm_rope: not on CUDA"),
                        }
                    };
                }
                let (xv, cv, sv) = (view!(gx, rows * hd), view!(gc, n * hd), view!(gs, n * hd));
                let wv = match &gw {
                    Some(g) => Some(view!(g, hd)),
                    None => None,
                };
                let dv = match &gd {
                    Some(g) => Some(view!(g, rows * hd)),
                    None => None,
                };
                // SAFETY: the kernel writes every element of every row.
                let out = unsafe { dev.alloc(rows * hd)? };
                let null = 0u64;
                let mut b = func.builder();
                b.arg(&xv);
                match &wv {
                    Some(wv) => b.arg(wv),
                    None => b.arg(&null),
                };
                b.arg(&cv);
                b.arg(&sv);
                if let Some(dv) = &dv {
                    b.arg(dv);
                }
                b.arg(&out);
                b.arg(&rows32);
                b.arg(&heads32);
                b.arg(&eps);
                // SAFETY: arguments match kernels/norm_rope.cu (a null weight: no norm); the
                // views cover every row the kernel reads, each starting on the allocation's
                // alignment (offset-0 tensors, rows of whole loads).
                unsafe { b.launch(cfg) }.w()?;
                $variant(out)
            }};
        }
        let slice = match x.dtype() {
            DType::F32 => run!(S::F32),
            DType::BF16 => run!(S::BF16),
            _ => run!(S::F16),
        };
        Ok(crate::ops::cuda_tensor(slice, dev, x.shape().clone()))
    }
}
