//! AdamW's update of one parameter as one CUDA kernel (`kernels/adamw.cu`): the ≈ 14
//! element-wise tensor ops of `train::adamw` (each a pass over the parameter, its gradient or
//! a moment) become one pass that reads p, g, m, v and writes p, m, v in place — for the
//! 157 M expert-adapter parameters of a 12-layer Qwen3-30B-A3B bench model, ≈ 20 ms of a
//! step become ≈ 1.5. The kernel performs the same f32 operations in the same order, each
//! rounded on its own, so the result equals the tensor ops' bit for bit (`moeq gpu-check`).

use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Fused updates launched so far in this process (gpu-check asserts its comparison ran them).
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// The scalars of one step, as `train::adamw` derives them from the step count and the
/// learning rate (f64; the kernel, like candle's scalar ops, rounds each to f32).
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    /// The gradient's factor when clipping (`None`: not clipped this step).
    pub clip: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    /// `1 − lr·weight_decay`.
    pub decay: f64,
    /// `1 / √(1 − β2ᵗ)`.
    pub inv_sqrt_bias2: f64,
    pub eps: f64,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f64,
}

/// Whether `MOEQ_FUSED_ADAMW=0` asks for the tensor ops (A/B runs).
#[cfg(feature = "cuda")]
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("MOEQ_FUSED_ADAMW").is_ok_and(|v| v == "0"))
}

/// Updates `p`, `m` and `v` in place from `g` on CUDA and returns true; returns false (nothing
/// done) where the kernel does not apply — not on CUDA, not all f32, or not four distinct
/// buffers of one size that each start at offset 0 — and the caller runs the tensor ops.
pub fn fused_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &StepScalars) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && !disabled() {
        return cuda::step(p, g, m, v, s);
    }
    let _ = (p, g, m, v, s);
    Ok(false)
}

/// `fused_step` for 8-bit blockwise moments (`train::adamw8`, `kernels/adamw8.cu`): `q` holds
/// the first moment's codes (u8) and block absmax (f32), then the second's; `maps` the signed
/// and unsigned code maps (256 f32 each). False where the kernel does not apply.
pub fn fused_step8(
    p: &Tensor,
    g: &Tensor,
    q: [&Tensor; 4],
    maps: (&Tensor, &Tensor),
    s: &StepScalars,
) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && !disabled() {
        return cuda::step8(p, g, q, maps, s);
    }
    let _ = (p, g, q, maps, s);
    Ok(false)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::StepScalars;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{DType, Device, Result, Storage, Tensor};

    /// The f32 scalars in kernel order: clip, β1, 1−β1, β2, 1−β2, decay, 1/√bias2, ε, step
    /// size (with the clipping flag).
    fn scalars(s: &StepScalars) -> (i32, [f32; 9]) {
        let f = |x: f64| x as f32;
        (
            i32::from(s.clip.is_some()),
            [
                f(s.clip.unwrap_or(1.0)),
                f(s.beta1),
                f(1.0 - s.beta1),
                f(s.beta2),
                f(1.0 - s.beta2),
                f(s.decay),
                f(s.inv_sqrt_bias2),
                f(s.eps),
                f(s.step_size),
            ],
        )
    }

    /// Whether `t` owns `n` elements of `dtype` from offset 0.
    fn owned(t: &Tensor, dtype: DType, n: usize) -> bool {
        t.dtype() == dtype && t.elem_count() == n && t.layout().contiguous_offsets() == Some((0, n))
    }

    pub(super) fn step8(
        p: &Tensor,
        g: &Tensor,
        q: [&Tensor; 4],
        maps: (&Tensor, &Tensor),
        s: &StepScalars,
    ) -> Result<bool> {
        let n = p.elem_count();
        let blocks = n.div_ceil(256);
        let Device::Cuda(dev) = p.device() else {
            return Ok(false);
        };
        if n == 0
            || !owned(p, DType::F32, n)
            || !owned(g, DType::F32, n)
            || !owned(q[0], DType::U8, n)
            || !owned(q[2], DType::U8, n)
            || !owned(q[1], DType::F32, blocks)
            || !owned(q[3], DType::F32, blocks)
            || !owned(maps.0, DType::F32, 256)
            || !owned(maps.1, DType::F32, 256)
        {
            return Ok(false);
        }
        let guards =
            [p, g, q[0], q[1], q[2], q[3], maps.0, maps.1].map(|t| t.storage_and_layout().0);
        let mut c = Vec::with_capacity(8);
        for st in &guards {
            match &**st {
                Storage::Cuda(x) => c.push(&x.slice),
                _ => return Ok(false),
            }
        }
        let (
            S::F32(p),
            S::F32(g),
            S::U8(mq),
            S::F32(ma),
            S::U8(vq),
            S::F32(va),
            S::F32(qs),
            S::F32(qu),
        ) = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7])
        else {
            return Ok(false);
        };
        // Written in place: p and the four state buffers must be distinct from each other and
        // from the gradient.
        let stream = dev.cuda_stream();
        let mut ptrs = [
            p.device_ptr(&stream).0,
            g.device_ptr(&stream).0,
            mq.device_ptr(&stream).0,
            ma.device_ptr(&stream).0,
            vq.device_ptr(&stream).0,
            va.device_ptr(&stream).0,
        ];
        ptrs.sort_unstable();
        if ptrs.windows(2).any(|w| w[0] == w[1]) {
            return Ok(false);
        }
        let func =
            dev.get_or_load_custom_func("adamw8_f32", "moeq_adamw8", crate::ops::kernels::ADAMW8)?;
        let (clipping, k) = scalars(s);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(p);
        b.arg(g);
        b.arg(mq);
        b.arg(ma);
        b.arg(vq);
        b.arg(va);
        b.arg(qs);
        b.arg(qu);
        b.arg(&n);
        b.arg(&clipping);
        for x in &k {
            b.arg(x);
        }
        // SAFETY: distinct buffers of the checked sizes; arguments in kernels/adamw8.cu's order.
        unsafe { b.launch(cfg) }.w()?;
        super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    pub(super) fn step(
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        s: &StepScalars,
    ) -> Result<bool> {
        let n = p.elem_count();
        let whole = |t: &Tensor| {
            t.dtype() == DType::F32
                && t.elem_count() == n
                && t.layout().contiguous_offsets() == Some((0, n))
        };
        let Device::Cuda(dev) = p.device() else {
            return Ok(false);
        };
        if n == 0 || ![p, g, m, v].into_iter().all(whole) {
            return Ok(false);
        }
        let (sp, _) = p.storage_and_layout();
        let (sg, _) = g.storage_and_layout();
        let (sm, _) = m.storage_and_layout();
        let (sv, _) = v.storage_and_layout();
        let (Storage::Cuda(sp), Storage::Cuda(sg), Storage::Cuda(sm), Storage::Cuda(sv)) =
            (&*sp, &*sg, &*sm, &*sv)
        else {
            return Ok(false);
        };
        let (S::F32(p), S::F32(g), S::F32(m), S::F32(v)) =
            (&sp.slice, &sg.slice, &sm.slice, &sv.slice)
        else {
            return Ok(false);
        };
        // Written in place: the three written buffers must not alias each other or the gradient.
        let stream = dev.cuda_stream();
        let mut ptrs = [
            p.device_ptr(&stream).0,
            g.device_ptr(&stream).0,
            m.device_ptr(&stream).0,
            v.device_ptr(&stream).0,
        ];
        ptrs.sort_unstable();
        if ptrs.windows(2).any(|w| w[0] == w[1]) {
            return Ok(false);
        }
        let func =
            dev.get_or_load_custom_func("adamw_f32", "moeq_adamw", crate::ops::kernels::ADAMW)?;
        let f = |x: f64| x as f32;
        let clipping = i32::from(s.clip.is_some());
        let (clip, beta1, one_minus_beta1, beta2, one_minus_beta2) = (
            f(s.clip.unwrap_or(1.0)),
            f(s.beta1),
            f(1.0 - s.beta1),
            f(s.beta2),
            f(1.0 - s.beta2),
        );
        let (decay, inv_sqrt_bias2, eps, step_size) =
            (f(s.decay), f(s.inv_sqrt_bias2), f(s.eps), f(s.step_size));
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(p);
        b.arg(g);
        b.arg(m);
        b.arg(v);
        b.arg(&n);
        b.arg(&clipping);
        b.arg(&clip);
        b.arg(&beta1);
        b.arg(&one_minus_beta1);
        b.arg(&beta2);
        b.arg(&one_minus_beta2);
        b.arg(&decay);
        b.arg(&inv_sqrt_bias2);
        b.arg(&eps);
        b.arg(&step_size);
        // SAFETY: four distinct f32 buffers of n elements (checked above), arguments in the
        // order of kernels/adamw.cu.
        unsafe { b.launch(cfg) }.w()?;
        super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }
}
