//! SwiGLU: `out = silu(gate) * up`, the activation of every expert and dense MLP.
//! gate, up: [.., I] (same shape, any dtype of f32/bf16/f16) → out: same shape and dtype.
//! Forward is one custom op (CPU loop or `kernels/swiglu.cu`), computed in f32 with one
//! rounding to the storage dtype; backward is expressed in tensor ops so it runs on every
//! device and keeps gradients flowing to both inputs.

use crate::ops::contiguous_slice;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

#[cfg(feature = "cuda")]
mod cuda;

struct SwiGlu;

/// The gated activation of a fused gate_up projection's output `[rows, 2·I]` → `[rows, I]`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Glu {
    /// `silu(gate) · up`, gate in the first half of each row (transformers' fused experts).
    Silu,
    /// gpt-oss: (gate, up) pairs interleaved along the row, gate clamped above at `limit` and
    /// up to `±limit`, then `gate · σ(alpha · gate) · (up + 1)`.
    Clamped { alpha: f32, limit: f32 },
}

impl Glu {
    /// Column of gate `c` and of up `c` in a row of `2·half`.
    fn columns(self, c: usize, half: usize) -> (usize, usize) {
        match self {
            Glu::Silu => (c, half + c),
            Glu::Clamped { .. } => (2 * c, 2 * c + 1),
        }
    }

    /// The activation of one (gate, up) pair, in f32.
    fn value(self, g: f32, u: f32) -> f32 {
        match self {
            Glu::Silu => silu_mul(g, u),
            Glu::Clamped { alpha, limit } => {
                let (g, u) = (g.min(limit), u.clamp(-limit, limit));
                g / (1.0 + (-alpha * g).exp()) * (u + 1.0)
            }
        }
    }

    /// (∂/∂gate, ∂/∂up) of one pair times `d`, in f32 (zero where a clamp holds the input:
    /// beyond the limits, the limits themselves included in the pass-through as a clamp's
    /// gradient does).
    fn grads(self, g: f32, u: f32, d: f32) -> (f32, f32) {
        match self {
            Glu::Silu => {
                let sig = 1.0 / (1.0 + (-g).exp());
                (d * u * sig * (1.0 + g * (1.0 - sig)), d * g * sig)
            }
            Glu::Clamped { alpha, limit } => {
                let (gc, uc) = (g.min(limit), u.clamp(-limit, limit));
                let sig = 1.0 / (1.0 + (-alpha * gc).exp());
                let dg = match g <= limit {
                    true => d * (uc + 1.0) * sig * (1.0 + alpha * gc * (1.0 - sig)),
                    false => 0.0,
                };
                let du = match u.abs() <= limit {
                    true => d * gc * sig,
                    false => 0.0,
                };
                (dg, du)
            }
        }
    }
}

fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

fn cpu_apply<T: Copy>(g: &[T], u: &[T], to: impl Fn(T) -> f32, from: impl Fn(f32) -> T) -> Vec<T> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| from(silu_mul(to(g), to(u))))
        .collect()
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(cpu_apply(
                contiguous_slice(g, l1, "swiglu")?,
                contiguous_slice(u, l2, "swiglu")?,
                |x| x,
                |x| x,
            )),
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(cpu_apply(
                contiguous_slice(g, l1, "swiglu")?,
                contiguous_slice(u, l2, "swiglu")?,
                bf16::to_f32,
                bf16::from_f32,
            )),
            (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(cpu_apply(
                contiguous_slice(g, l1, "swiglu")?,
                contiguous_slice(u, l2, "swiglu")?,
                f16::to_f32,
                f16::from_f32,
            )),
            _ => candle_core::bail!("swiglu: gate and up must both be f32, bf16 or f16"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
        use candle_core::CudaDevice;

        fn launch<T: DeviceRepr>(
            dev: &CudaDevice,
            name: &str,
            g: &CudaSlice<T>,
            l1: &Layout,
            u: &CudaSlice<T>,
            l2: &Layout,
        ) -> Result<CudaSlice<T>> {
            let (Some((g0, g1)), Some((u0, _))) =
                (l1.contiguous_offsets(), l2.contiguous_offsets())
            else {
                candle_core::bail!("swiglu: inputs must be contiguous")
            };
            let n = g1 - g0;
            let func = dev.get_or_load_custom_func(name, "moeq_swiglu", super::kernels::SWIGLU)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(n)? };
            let (g, u) = (g.slice(g0..g1), u.slice(u0..u0 + n));
            let mut b = func.builder();
            b.arg(&g);
            b.arg(&u);
            b.arg(&out);
            b.arg(&n);
            let cfg = LaunchConfig::for_num_elems(n.min(1 << 30) as u32);
            // SAFETY: argument types match the kernel signature in kernels/swiglu.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }

        let dev = &s1.device;
        let slice = match (&s1.slice, &s2.slice) {
            (S::F32(g), S::F32(u)) => S::F32(launch(dev, "swiglu_fwd_f32", g, l1, u, l2)?),
            (S::BF16(g), S::BF16(u)) => S::BF16(launch(dev, "swiglu_fwd_bf16", g, l1, u, l2)?),
            (S::F16(g), S::F16(u)) => S::F16(launch(dev, "swiglu_fwd_f16", g, l1, u, l2)?),
            _ => candle_core::bail!("swiglu: gate and up must both be f32, bf16 or f16"),
        };
        Ok((
            candle_core::CudaStorage {
                slice,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }

    /// d/dg [silu(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))),  d/du = silu(g).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: swiglu", gate.device());
        let dtype = gate.dtype();
        let (g, u, dy) = (
            gate.to_dtype(DType::F32)?,
            up.to_dtype(DType::F32)?,
            grad.to_dtype(DType::F32)?,
        );
        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (&g * &sig)?;
        let d_up = (&dy * &silu)?;
        let one_minus = sig.affine(-1.0, 1.0)?;
        let d_gate = (&dy * &u)?.mul(&sig)?.mul(&((&g * &one_minus)? + 1.0)?)?;
        Ok((Some(d_gate.to_dtype(dtype)?), Some(d_up.to_dtype(dtype)?)))
    }
}

/// The backward of [`swiglu`] on tensors, no graph: (d gate, d up) for upstream `dy`.
pub(crate) fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du) = SwiGlu.bwd(gate, up, dy, dy)?;
    match (dg, du) {
        (Some(dg), Some(du)) => Ok((dg, du)),
        _ => candle_core::bail!("swiglu: backward gave no gradient"),
    }
}

/// `silu(gate) * up`, with gradients to both inputs.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The same function from candle's primitive ops: the reference the custom op is tested
/// against, forward and backward.
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
    (gate * sig)?.mul(up)
}

/// SwiGLU over a fused gate_up projection `[rows, 2·I]` (gate in the first half, as in
/// transformers' fused experts) → `[rows, I]`, forward and backward each one pass (CUDA kernels
/// in `kernels/swiglu.cu`): no narrow copies, and the gradient comes back packed.
pub fn swiglu_packed(gu: &Tensor) -> Result<Tensor> {
    glu_packed(gu, Glu::Silu)
}

/// The gated activation `glu` over a fused gate_up projection `[rows, 2·I]` → `[rows, I]`.
pub fn glu_packed(gu: &Tensor, glu: Glu) -> Result<Tensor> {
    let (_, two_i) = gu.dims2()?;
    if two_i % 2 != 0 {
        candle_core::bail!("swiglu_packed: {two_i} columns do not split into gate and up");
    }
    let gu = super::at_offset_zero(gu)?;
    if super::records_graph(&[&gu]) {
        gu.apply_op1(Packed(glu))
    } else {
        super::direct(Packed(glu).fwd(&gu)?)
    }
}

/// The primitive-op reference of `swiglu_packed`.
pub fn swiglu_packed_reference(gu: &Tensor) -> Result<Tensor> {
    let half = gu.dim(1)? / 2;
    swiglu_reference(&gu.narrow(1, 0, half)?, &gu.narrow(1, half, half)?)
}

/// The primitive-op reference of the clamped GLU (`Glu::Clamped`) over interleaved pairs.
pub fn clamped_glu_reference(gu: &Tensor, alpha: f64, limit: f64) -> Result<Tensor> {
    let (rows, two_i) = gu.dims2()?;
    let pairs = gu.reshape((rows, two_i / 2, 2))?;
    let g = pairs.narrow(2, 0, 1)?.squeeze(2)?;
    let u = pairs.narrow(2, 1, 1)?.squeeze(2)?;
    let g = g.minimum(limit)?;
    let u = u.clamp(-limit, limit)?;
    let sig = ((&g * -alpha)?.exp()? + 1.0)?.recip()?;
    (g * sig)?.mul(&(u + 1.0)?)
}

/// f32 rows of the packed op on the CPU: `fwd` → out `[rows, I]`; with `dy`, → dgu.
fn packed_cpu(gu: &Tensor, dy: Option<&Tensor>, glu: Glu) -> Result<Tensor> {
    let (rows, two_i) = gu.dims2()?;
    let half = two_i / 2;
    let v: Vec<f32> = gu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let out = match dy {
        None => {
            let mut out = Vec::with_capacity(rows * half);
            for r in 0..rows {
                let row = &v[r * two_i..(r + 1) * two_i];
                for c in 0..half {
                    let (gc, uc) = glu.columns(c, half);
                    out.push(glu.value(row[gc], row[uc]));
                }
            }
            Tensor::from_vec(out, (rows, half), gu.device())?
        }
        Some(dy) => {
            let d: Vec<f32> = dy.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; rows * two_i];
            for r in 0..rows {
                for c in 0..half {
                    let (gc, uc) = glu.columns(c, half);
                    let (g, u) = (v[r * two_i + gc], v[r * two_i + uc]);
                    let (dg, du) = glu.grads(g, u, d[r * half + c]);
                    out[r * two_i + gc] = dg;
                    out[r * two_i + uc] = du;
                }
            }
            Tensor::from_vec(out, (rows, two_i), gu.device())?
        }
    };
    out.to_dtype(gu.dtype())
}

struct Packed(Glu);

impl Packed {
    fn fwd(&self, gu: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if gu.device().is_cuda() {
            return cuda::packed_cuda(gu, None, self.0, 0);
        }
        packed_cpu(gu, None, self.0)
    }
}

impl candle_core::CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "swiglu_packed"
    }

    super::tensor_forward!(1, "swiglu_packed", fwd);

    fn bwd(&self, gu: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: swiglu", gu.device());
        Ok(Some(packed_backward(gu, grad, self.0)?))
    }
}

/// The packed activation's forward on tensors, no graph: gu `[rows, 2·I]` → `[rows, I]`.
pub(crate) fn packed_forward(gu: &Tensor, glu: Glu) -> Result<Tensor> {
    super::direct(Packed(glu).fwd(gu)?)
}

/// `packed_forward` into rows `extra` columns wider, `[rows, I + extra]`, for a caller that
/// writes the last columns itself (`ops::lora_in_k`; zeros on the CPU, unwritten on CUDA,
/// where silu's vectorised kernel takes the rows — else `packed_forward` and a concatenation).
pub(crate) fn packed_forward_wide(gu: &Tensor, glu: Glu, extra: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let per_pack = 16 / gu.dtype().size_in_bytes();
        let packs = (gu.dim(1)? / 2) % per_pack == 0 && extra % per_pack == 0;
        if gu.device().is_cuda() && glu == Glu::Silu && packs {
            return cuda::packed_cuda(&super::at_offset_zero(gu)?, None, glu, extra);
        }
    }
    let act = packed_forward(gu, glu)?;
    let pad = Tensor::zeros((act.dim(0)?, extra), act.dtype(), act.device())?;
    Tensor::cat(&[&act, &pad], 1)
}

/// The packed activation's backward, no graph: (gu, dy `[rows, I]`) → dgu `[rows, 2·I]` in
/// gu's dtype.
pub(crate) fn packed_backward(gu: &Tensor, dy: &Tensor, glu: Glu) -> Result<Tensor> {
    let dy = super::at_offset_zero(&dy.to_dtype(gu.dtype())?)?;
    super::direct(PackedBwd(glu).fwd(&gu.detach(), &dy)?)
}

/// `packed_backward` and, per row, the dot product of dy with the activation `act` as the
/// forward stored it: dot `[rows]` (f32) = Σ_c dy[c] · act[c]. A routed row's output y = act ·
/// W_dᵀ (+ its adapter's update, + a bias) is affine in act, so with dy = dL/d(act) this dot is
/// ⟨dL/dy, y⟩ less the bias's part — for a row a routing weight w scaled, w times that weight's
/// gradient; the weighted combine's backward then need not read y (`ops::routed_experts`).
/// CUDA with silu and rows of whole 16-byte packs: one kernel (`swiglu_packed_bwd_dot_vec`);
/// elsewhere the activation recomputed and the dots summed by tensor ops (the kernel's twin).
pub(crate) fn packed_backward_dot(gu: &Tensor, dy: &Tensor, glu: Glu) -> Result<(Tensor, Tensor)> {
    let dy = super::at_offset_zero(&dy.to_dtype(gu.dtype())?)?;
    #[cfg(feature = "cuda")]
    if gu.device().is_cuda() && glu == Glu::Silu {
        if let Some(both) = cuda::packed_dot_cuda(&super::at_offset_zero(gu)?, &dy, 0)? {
            return Ok(both);
        }
    }
    packed_backward_dot_reference(gu, &dy, glu)
}

static IN_PLACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many backwards [`packed_backward_in_place`] served in this process (gpu-check asserts
/// its rows ran them).
pub fn in_place_launches() -> u64 {
    IN_PLACE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The packed backward written over `gu` (consumed: its buffer then holds dgu) where CUDA's
/// vectorised silu kernels serve the rows — Some(each row's dot where `dots`, as
/// `packed_backward_dot`) — else None and `gu` untouched (the caller runs the allocating
/// backward). The same values as `packed_backward` / `packed_backward_dot`.
pub(crate) fn packed_backward_in_place(
    gu: &Tensor,
    dy: &Tensor,
    glu: Glu,
    dots: bool,
) -> Result<Option<Option<Tensor>>> {
    #[cfg(feature = "cuda")]
    if gu.device().is_cuda() && glu == Glu::Silu {
        let dy = dy.to_dtype(gu.dtype())?;
        let served = cuda::packed_bwd_in_place(gu, &dy, dots)?;
        if served.is_some() {
            IN_PLACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        return Ok(served);
    }
    let _ = (gu, dy, glu, dots);
    Ok(None)
}

/// The packed backward into rows `extra` columns wider, `[rows, 2·I + extra]` (the last
/// columns left to the caller: `ops::lora_in_k`; zeros on the CPU, unwritten on CUDA where
/// silu's vectorised kernels take the rows — else the plain backward and a concatenation),
/// with each row's dot where `dots` (as `packed_backward_dot`).
pub(crate) fn packed_backward_wide(
    gu: &Tensor,
    dy: &Tensor,
    glu: Glu,
    extra: usize,
    dots: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dy = super::at_offset_zero(&dy.to_dtype(gu.dtype())?)?;
    #[cfg(feature = "cuda")]
    if gu.device().is_cuda() && glu == Glu::Silu {
        let gu = super::at_offset_zero(gu)?;
        let per_pack = 16 / gu.dtype().size_in_bytes();
        match dots {
            true => {
                if let Some((dgu, dot)) = cuda::packed_dot_cuda(&gu, &dy, extra)? {
                    return Ok((dgu, Some(dot)));
                }
            }
            false if (gu.dim(1)? / 2) % per_pack == 0 && extra % per_pack == 0 => {
                return Ok((cuda::packed_cuda(&gu, Some(&dy), glu, extra)?, None));
            }
            false => {}
        }
    }
    let (dgu, dot) = match dots {
        true => {
            let (dgu, dot) = packed_backward_dot_reference(gu, &dy, glu)?;
            (dgu, Some(dot))
        }
        false => (packed_backward(gu, &dy, glu)?, None),
    };
    if extra == 0 {
        return Ok((dgu, dot));
    }
    let pad = Tensor::zeros((dgu.dim(0)?, extra), dgu.dtype(), dgu.device())?;
    Ok((Tensor::cat(&[&dgu, &pad], 1)?, dot))
}

/// `packed_backward_dot` by tensor ops: the CPU's and the reference the kernel is checked
/// against (gpu-check "swiglu_packed dot").
pub fn packed_backward_dot_reference(
    gu: &Tensor,
    dy: &Tensor,
    glu: Glu,
) -> Result<(Tensor, Tensor)> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let dgu = packed_backward(gu, dy, glu)?;
    let dot = (f32(dy)? * f32(&packed_forward(gu, glu)?)?)?.sum(1)?;
    Ok((dgu, dot))
}

/// (gu, dy) → dgu.
struct PackedBwd(Glu);

impl PackedBwd {
    fn fwd(&self, gu: &Tensor, dy: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if gu.device().is_cuda() {
            return cuda::packed_cuda(gu, Some(dy), self.0, 0);
        }
        packed_cpu(gu, Some(dy), self.0)
    }
}

impl CustomOp2 for PackedBwd {
    fn name(&self) -> &'static str {
        "swiglu_packed_bwd"
    }

    super::tensor_forward!(2, "swiglu_packed_bwd", fwd);
}
