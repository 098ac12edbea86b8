//! Gated DeltaNet's gated RMSNorm ([`super::linear_attn_parts::gated_rms_norm`]) as one op with
//! a written-out backward, for x, gate and a frozen weight of one dtype (f32, bf16 or f16). Per
//! row of D, with round = a rounding to that dtype (the reference's casts, in its order):
//!
//! ```text
//! r  = 1/√(mean(x²) + eps)     n = round(x·r)     p = round(n·w)     y = round(p·silu(gate))
//! backward, in f32 (rounded once at the end):
//! dgate = dy·p·σ(gate)·(1 + gate·(1 − σ(gate)))
//! g = dy·silu(gate)·w          dx = r·(g − x·r·mean(g·x·r))
//! ```
//!
//! It replaces the reference's dozen candle ops (and their autograd) per linear-attention
//! layer. CUDA kernels: `kernels/gated_norm.cu` (a warp per row); the CPU twin is here (sums in
//! index order; the kernels sum over lanes: f32 ulps). `tests/linear_attn_ops.rs` proves the
//! twin against autograd through the reference, `moeq gpu-check` ("gated_norm") the kernels.

use super::{f32s, rounding};
use candle_core::{bail, CustomOp2, DType, Device, Result, Tensor, D};

/// The gated RMSNorm for the layer: the op on CUDA when x, gate and the weight share a dtype
/// it takes and the weight is frozen; the reference ops otherwise.
pub fn gated_rms_norm(x: &Tensor, gate: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let one = x.dtype() == gate.dtype() && x.dtype() == weight.dtype();
    let takes = one && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !x.device().is_cuda() || !takes || weight.track_op() {
        return super::linear_attn_parts::gated_rms_norm(x, gate, weight, eps);
    }
    apply(x, gate, weight, eps)
}

/// The op on any device (the CPU twin on the CPU). x, gate `[.., D]`, weight `[D]` (frozen: it
/// gets no gradient).
pub fn apply(x: &Tensor, gate: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gate.dims() != x.dims() || weight.dims() != [d] {
        bail!(
            "gated_norm op: gate {:?} must match x {:?} and the weight {:?} be [D] = [{d}]",
            gate.dims(),
            x.dims(),
            weight.dims()
        );
    }
    if x.dtype() != gate.dtype() || x.dtype() != weight.dtype() || weight.track_op() {
        bail!("gated_norm op: x, gate and weight of one dtype, the weight frozen");
    }
    let (x0, g0) = (super::at_offset_zero(x)?, super::at_offset_zero(gate)?);
    let op = GatedNorm {
        weight: super::at_offset_zero(weight)?,
        eps: eps as f32,
    };
    if super::records_graph(&[&x0, &g0]) {
        x0.apply_op2(&g0, op)
    } else {
        super::direct(forward(&x0, &g0, &op.weight, op.eps)?)
    }
}

struct GatedNorm {
    weight: Tensor,
    eps: f32,
}

impl GatedNorm {
    fn forward(&self, x: &Tensor, gate: &Tensor) -> Result<Tensor> {
        forward(x, gate, &self.weight, self.eps)
    }
}

impl CustomOp2 for GatedNorm {
    fn name(&self) -> &'static str {
        "gated_norm"
    }

    super::tensor_forward!(2, "gated_norm", forward);

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = super::at_offset_zero(&dy.to_dtype(x.dtype())?)?;
        let (dx, dgate) = backward(x, gate, &self.weight, &dy, self.eps)?;
        Ok((Some(dx), Some(dgate)))
    }
}

fn rows(x: &Tensor) -> Result<(usize, usize)> {
    let d = x.dim(D::Minus1)?;
    Ok((x.elem_count() / d.max(1), d))
}

fn forward(x: &Tensor, gate: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => {
            let (_, d) = rows(x)?;
            let round = rounding(x.dtype());
            let (xs, gs, ws) = (f32s(x)?, f32s(gate)?, f32s(w)?);
            let mut y = vec![0f32; xs.len()];
            for ((xr, gr), yr) in xs.chunks(d).zip(gs.chunks(d)).zip(y.chunks_mut(d)) {
                let r = inv_rms(xr, eps);
                for i in 0..d {
                    let p = round(round(xr[i] * r) * ws[i]);
                    yr[i] = round(p * silu(gr[i]));
                }
            }
            Tensor::from_vec(y, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::run(x, gate, w, None, eps).map(|(y, _)| y),
        _ => bail!("gated_norm op: CPU or CUDA only"),
    }
}

/// (dx, dgate) in x's dtype for dy (x's dtype, contiguous).
fn backward(
    x: &Tensor,
    gate: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    match x.device() {
        Device::Cpu => {
            let (_, d) = rows(x)?;
            let round = rounding(x.dtype());
            let (xs, gs, ws, dys) = (f32s(x)?, f32s(gate)?, f32s(w)?, f32s(dy)?);
            let (mut dx, mut dg) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
            for (row, xr) in xs.chunks(d).enumerate() {
                let span = row * d..(row + 1) * d;
                let (gr, dyr) = (&gs[span.clone()], &dys[span.clone()]);
                let r = inv_rms(xr, eps);
                let gn: f32 = (0..d)
                    .map(|i| dyr[i] * silu(gr[i]) * ws[i] * (xr[i] * r))
                    .sum();
                let mean_gn = gn / d as f32;
                for i in 0..d {
                    let p = round(round(xr[i] * r) * ws[i]);
                    let s = sigmoid(gr[i]);
                    dg[row * d + i] = dyr[i] * p * (s * (1.0 + gr[i] * (1.0 - s)));
                    let g = dyr[i] * silu(gr[i]) * ws[i];
                    dx[row * d + i] = r * (g - xr[i] * r * mean_gn);
                }
            }
            let cpu = &Device::Cpu;
            Ok((
                Tensor::from_vec(dx, x.shape(), cpu)?.to_dtype(x.dtype())?,
                Tensor::from_vec(dg, x.shape(), cpu)?.to_dtype(x.dtype())?,
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (dx, dg) = cuda::run(x, gate, w, Some(dy), eps)?;
            match dg {
                Some(dg) => Ok((dx, dg)),
                None => bail!("gated_norm kernel: no gate gradient"),
            }
        }
        _ => bail!("gated_norm op: CPU or CUDA only"),
    }
}

/// 1/√(mean(x²) + eps), as the reference (mean, + eps, sqrt, reciprocal; the mean as Σ/D where
/// candle multiplies by 1/D: the same for a power-of-two D, as the models' heads, an ulp apart
/// otherwise).
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// SiLU as candle computes it: v / (1 + e^−v).
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, Result, Storage, Tensor};

    const WARPS: usize = 8;

    /// The forward (`dy` None: (y, None)) or the backward ((dx, Some(dgate))); every input
    /// contiguous from offset 0, of one dtype.
    pub(super) fn run(
        x: &Tensor,
        gate: &Tensor,
        w: &Tensor,
        dy: Option<&Tensor>,
        eps: f32,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, d) = super::rows(x)?;
        if rows == 0 {
            let empty = || Tensor::zeros(x.shape(), x.dtype(), x.device());
            return Ok((empty()?, dy.map(|_| empty()).transpose()?));
        }
        let guards = [Some(x), Some(gate), Some(w), dy].map(|t| t.map(|t| t.storage_and_layout()));
        let mut cs = Vec::with_capacity(4);
        for g in guards.iter().flatten() {
            match &*g.0 {
                Storage::Cuda(c) => cs.push(c),
                _ => bail!("gated_norm kernel: a tensor not on CUDA"),
            }
        }
        let dev = &cs[0].device;
        let stream = dev.cuda_stream();
        let blocks = u32::try_from(rows.div_ceil(WARPS))
            .map_err(|_| candle_core::Error::Msg(format!("gated_norm kernel: {rows} rows")))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows_i = rows as i64;
        let d_i = i32::try_from(d)
            .map_err(|_| candle_core::Error::Msg(format!("gated_norm kernel: rows of {d}")))?;
        macro_rules! go {
            ($variant:ident, $t:ty, $name:literal) => {{
                let mut ins: Vec<&CudaSlice<$t>> = Vec::with_capacity(4);
                for c in &cs {
                    match &c.slice {
                        S::$variant(s) => ins.push(s),
                        _ => bail!("gated_norm kernel: inputs of one dtype"),
                    }
                }
                let n = rows * d;
                let kind = if dy.is_some() { "bwd" } else { "fwd" };
                let f = dev
                    .get_or_load_custom_func(
                        &format!("gated_norm_{kind}_{}", $name),
                        "moeq_gated_norm",
                        crate::ops::kernels::GATED_NORM,
                    )?
                    .into_cuda_function();
                // SAFETY (both): the kernel writes every element.
                let a_out = unsafe { dev.alloc::<$t>(n)? };
                let b_out = if dy.is_some() {
                    Some(unsafe { dev.alloc::<$t>(n)? })
                } else {
                    None
                };
                let mut a = stream.launch_builder(&f);
                for s in &ins {
                    a.arg(*s);
                }
                a.arg(&a_out);
                if let Some(b) = &b_out {
                    a.arg(b);
                }
                a.arg(&rows_i).arg(&d_i).arg(&eps);
                // SAFETY: arguments match kernels/gated_norm.cu (x, gate, w[, dy], outputs,
                // rows, d, eps); every buffer holds rows·d elements (w: d).
                unsafe { a.launch(cfg) }.w()?;
                let wrap = |s| crate::ops::cuda_tensor(S::$variant(s), dev, x.shape().clone());
                (wrap(a_out), b_out.map(wrap))
            }};
        }
        Ok(match &cs[0].slice {
            S::F32(_) => go!(F32, f32, "f32"),
            S::BF16(_) => go!(BF16, half::bf16, "bf16"),
            S::F16(_) => go!(F16, half::f16, "f16"),
            _ => bail!("gated_norm kernel: f32, bf16 or f16 only"),
        })
    }
}
