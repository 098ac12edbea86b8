//! Gated DeltaNet's causal depthwise conv1d + SiLU ([`super::linear_attn_parts::causal_conv1d_silu`])
//! as one custom op with a written-out backward: the CUDA kernels of `kernels/conv_silu.cu` and
//! their CPU twin (here: the same sums in the same order, the same roundings). `tests/conv_silu.rs`
//! proves the twin against autograd through the reference, `moeq gpu-check` ("conv_silu") the
//! kernels.
//!
//! x `[B, T, C]` and the weight `[C, K]` share one dtype (f32, bf16 or f16); with
//! x = 0 before t = 0 and round = a rounding to that dtype:
//!
//! ```text
//! v  = round(Σ_k x[t + k − (K−1), c]·w[c, k])      f32, taps in order (the reference's sum)
//! y  = round(v·σ(v))
//! dv = round(dy·σ(v)·(1 + v·(1 − σ(v))))           the gradient of v, rounded as autograd
//! dx = round(Σ_k w[c, k]·dv[t + (K−1) − k, c])      rounds it through the reference's casts
//! dw = round(Σ_{b,t} dv[b, t, c]·x[b, t + k − (K−1), c])   only when the weight takes a gradient
//! ```

use super::{f32s, rounding};
use candle_core::{bail, CustomOp2, DType, Device, Result, Tensor};

/// The convolution + SiLU for training and prefill: the op on CUDA (x and the weight of one
/// dtype), the reference ops elsewhere (they equal transformers' CPU path exactly).
pub fn conv1d_silu(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let fits =
        x.dtype() == weight.dtype() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !x.device().is_cuda() || !fits {
        return super::linear_attn_parts::causal_conv1d_silu(x, weight);
    }
    apply(x, weight)
}

/// The op itself on any device (the CPU twin on the CPU).
pub fn apply(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Geo::of(x, weight)?;
    let at0 = super::at_offset_zero;
    let (x, w) = (at0(x)?, at0(weight)?);
    if super::records_graph(&[&x, &w]) {
        x.apply_op2(&w, ConvSilu)
    } else {
        super::direct(forward(&x, &w)?)
    }
}

#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    t: usize,
    c: usize,
    k: usize,
}

impl Geo {
    fn of(x: &Tensor, w: &Tensor) -> Result<Geo> {
        let (b, t, c) = x.dims3()?;
        let (wc, k) = w.dims2()?;
        if wc != c || k == 0 || x.dtype() != w.dtype() {
            bail!(
                "conv_silu op: x {:?} {:?} and weight {:?} {:?} must be [B, T, C] and [C, K ≥ 1] \
                 of one dtype",
                x.dims(),
                x.dtype(),
                w.dims(),
                w.dtype()
            );
        }
        Ok(Geo { b, t, c, k })
    }

    fn n(&self) -> usize {
        self.b * self.t * self.c
    }
}

struct ConvSilu;

impl ConvSilu {
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        forward(x, w)
    }
}

impl CustomOp2 for ConvSilu {
    fn name(&self) -> &'static str {
        "conv_silu"
    }

    super::tensor_forward!(2, "conv_silu", forward);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: conv + silu", x.device());
        let dy = super::at_offset_zero(&dy.to_dtype(x.dtype())?)?;
        let (dx, dw) = backward(x, w, &dy, w.track_op())?;
        Ok((Some(dx), dw))
    }
}

fn forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let g = Geo::of(x, w)?;
    match x.device() {
        Device::Cpu => {
            let (xs, ws) = (f32s(x)?, f32s(w)?);
            let round = rounding(x.dtype());
            let y: Vec<f32> = (0..g.n())
                .map(|i| {
                    let v = preact(g, &xs, &ws, i, &round);
                    round(v / (1.0 + (-v).exp()))
                })
                .collect();
            Tensor::from_vec(y, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(g, x, w),
        _ => bail!("conv_silu op: CPU or CUDA only"),
    }
}

/// (dx, dw when `want_dw`) for the upstream gradient `dy` (x's dtype, contiguous).
fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = Geo::of(x, w)?;
    match x.device() {
        Device::Cpu => {
            let (dx, dw) = backward_cpu(g, &f32s(x)?, &f32s(w)?, &f32s(dy)?, want_dw, x.dtype());
            let cpu = &Device::Cpu;
            let dx = Tensor::from_vec(dx, x.shape(), cpu)?.to_dtype(x.dtype())?;
            let dw = match dw {
                Some(dw) => Some(Tensor::from_vec(dw, w.shape(), cpu)?.to_dtype(w.dtype())?),
                None => None,
            };
            Ok((dx, dw))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(g, x, w, dy, want_dw),
        _ => bail!("conv_silu op: CPU or CUDA only"),
    }
}

/// v of element i = (b·T + t)·C + c: the taps in order, rounded.
fn preact(g: Geo, x: &[f32], w: &[f32], i: usize, round: &impl Fn(f32) -> f32) -> f32 {
    let (bt, c) = (i / g.c, i % g.c);
    let t = bt % g.t;
    let mut acc = 0f32;
    for k in 0..g.k {
        let back = g.k - 1 - k;
        if t >= back {
            acc += x[(bt - back) * g.c + c] * w[c * g.k + k];
        }
    }
    round(acc)
}

/// The CPU twin of `conv_silu_dv`, `conv_silu_dx` and `conv_silu_dw`.
fn backward_cpu(
    g: Geo,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    want_dw: bool,
    dtype: DType,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let round = rounding(dtype);
    let dv: Vec<f32> = (0..g.n())
        .map(|i| {
            let v = preact(g, x, w, i, &round);
            let s = 1.0 / (1.0 + (-v).exp());
            round(dy[i] * (s * (1.0 + v * (1.0 - s))))
        })
        .collect();
    let dx = (0..g.n())
        .map(|i| {
            let (bt, c) = (i / g.c, i % g.c);
            let t = bt % g.t;
            let mut acc = 0f32;
            for k in 0..g.k {
                let ahead = g.k - 1 - k;
                if t + ahead < g.t {
                    acc += w[c * g.k + k] * dv[(bt + ahead) * g.c + c];
                }
            }
            round(acc)
        })
        .collect();
    let dw = want_dw.then(|| {
        let mut dw = vec![0f32; g.c * g.k];
        for (ck, out) in dw.iter_mut().enumerate() {
            let (c, k) = (ck / g.k, ck % g.k);
            let back = g.k - 1 - k;
            let mut acc = 0f32;
            for b in 0..g.b {
                for t in back..g.t {
                    let bt = b * g.t + t;
                    acc += dv[bt * g.c + c] * x[(bt - back) * g.c + c];
                }
            }
            *out = round(acc);
        }
        dw
    });
    (dx, dw)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Geo;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaDevice, Result, Storage, Tensor};

    fn int(v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("conv_silu kernel: {v}")))
    }

    fn elems(n: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig::for_num_elems(u32::try_from(n).map_err(
            |_| candle_core::Error::Msg(format!("conv_silu kernel: {n} elements")),
        )?))
    }

    fn slice<T: DeviceRepr>(
        s: &candle_core::CudaStorage,
        pick: fn(&S) -> Option<&CudaSlice<T>>,
    ) -> Result<&CudaSlice<T>> {
        pick(&s.slice).ok_or_else(|| candle_core::Error::Msg("conv_silu kernel: dtypes".into()))
    }

    /// The kernels for one storage dtype T (suffix `name`).
    fn run<T: DeviceRepr>(
        dev: &CudaDevice,
        g: Geo,
        name: &str,
        [x, w, dy]: [&CudaSlice<T>; 3],
        forward: bool,
        want_dw: bool,
    ) -> Result<(CudaSlice<T>, Option<CudaSlice<T>>)> {
        let func = |k: &str| {
            dev.get_or_load_custom_func(
                &format!("conv_silu_{k}_{name}"),
                "moeq_conv_silu",
                crate::ops::kernels::CONV_SILU,
            )
        };
        let stream = dev.cuda_stream();
        let (n, t, c, k) = (g.n() as i64, int(g.t)?, int(g.c)?, int(g.k)?);
        // SAFETY (every alloc below): the kernel that follows writes each element.
        if forward {
            let y = unsafe { dev.alloc::<T>(g.n())? };
            let f = func("fwd")?.into_cuda_function();
            let mut a = stream.launch_builder(&f);
            a.arg(x).arg(w).arg(&y).arg(&n).arg(&t).arg(&c).arg(&k);
            // SAFETY: arguments match kernels/conv_silu.cu.
            unsafe { a.launch(elems(g.n())?) }.w()?;
            return Ok((y, None));
        }
        let d = unsafe { dev.alloc::<f32>(g.n())? };
        let f = func("dv")?.into_cuda_function();
        let mut a = stream.launch_builder(&f);
        a.arg(x)
            .arg(w)
            .arg(dy)
            .arg(&d)
            .arg(&n)
            .arg(&t)
            .arg(&c)
            .arg(&k);
        // SAFETY: arguments match kernels/conv_silu.cu.
        unsafe { a.launch(elems(g.n())?) }.w()?;
        let dx = unsafe { dev.alloc::<T>(g.n())? };
        let f = func("dx")?.into_cuda_function();
        let mut a = stream.launch_builder(&f);
        a.arg(&d).arg(w).arg(&dx).arg(&n).arg(&t).arg(&c).arg(&k);
        // SAFETY: as above.
        unsafe { a.launch(elems(g.n())?) }.w()?;
        let dw = if want_dw {
            let dw = unsafe { dev.alloc::<T>(g.c * g.k)? };
            let f = func("dw")?.into_cuda_function();
            let b = int(g.b)?;
            let mut a = stream.launch_builder(&f);
            a.arg(&d).arg(x).arg(&dw).arg(&b).arg(&t).arg(&c).arg(&k);
            // SAFETY: as above.
            unsafe { a.launch(elems(g.c * g.k)?) }.w()?;
            Some(dw)
        } else {
            None
        };
        Ok((dx, dw))
    }

    type Guard<'a> = (candle_core::StorageRef<'a>, &'a candle_core::Layout);

    fn storage<'a>(g: &'a Guard<'_>) -> Result<&'a candle_core::CudaStorage> {
        match &*g.0 {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("conv_silu kernel: tensor not on CUDA"),
        }
    }

    /// (y or dx, dw) for x, w and (backward) dy, all contiguous from offset 0.
    fn dispatch(
        g: Geo,
        x: &Tensor,
        w: &Tensor,
        dy: Option<&Tensor>,
        want_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (gx, gw) = (x.storage_and_layout(), w.storage_and_layout());
        let gd = dy.map(|d| d.storage_and_layout());
        let (sx, sw) = (storage(&gx)?, storage(&gw)?);
        let sd = match &gd {
            Some(gd) => storage(gd)?,
            None => sx,
        };
        let dev = &sx.device;
        let fwd = dy.is_none();
        macro_rules! go {
            ($variant:ident, $t:ty, $name:literal) => {{
                fn pick(s: &S) -> Option<&CudaSlice<$t>> {
                    match s {
                        S::$variant(v) => Some(v),
                        _ => None,
                    }
                }
                let ins = [slice(sx, pick)?, slice(sw, pick)?, slice(sd, pick)?];
                let (a, b) = run(dev, g, $name, ins, fwd, want_dw)?;
                (S::$variant(a), b.map(S::$variant))
            }};
        }
        let (a, b) = match &sx.slice {
            S::F32(_) => go!(F32, f32, "f32"),
            S::BF16(_) => go!(BF16, half::bf16, "bf16"),
            S::F16(_) => go!(F16, half::f16, "f16"),
            _ => bail!("conv_silu kernel: f32, bf16 or f16 only"),
        };
        let wrap = crate::ops::cuda_tensor;
        Ok((
            wrap(a, dev, x.shape().clone()),
            b.map(|b| wrap(b, dev, w.shape().clone())),
        ))
    }

    pub(super) fn forward(g: Geo, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(dispatch(g, x, w, None, false)?.0)
    }

    pub(super) fn backward(
        g: Geo,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        want_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        dispatch(g, x, w, Some(dy), want_dw)
    }
}
