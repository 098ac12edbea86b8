//! SwiGLU: `out = silu(gate) * up`, the activation of every expert and dense MLP.
//! gate, up: [.., I] (same shape, any dtype of f32/bf16/f16) → out: same shape and dtype.
//! Forward is one custom op (CPU loop or `kernels/swiglu.cu`), computed in f32 with one
//! rounding to the storage dtype; backward is expressed in tensor ops so it runs on every
//! device and keeps gradients flowing to both inputs.

use crate::ops::contiguous_slice;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

struct SwiGlu;

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
