//! The delta rule's inputs from the convolution's output in one op: the q, k and v heads of
//! Gated DeltaNet's conv + SiLU output `[B, T, C]` (C = 2·Hk·Dk + Hv·Dv, in that order), q and k
//! repeated to the value heads as transformers' `repeat_interleave` (value head h reads key head
//! h / (Hv / Hk)), L2-normalised (`x · 1/√(Σx² + 1e-6)`) and q scaled by Dk^-½, packed in f32 as
//! the token-by-token op takes them ([`super::delta_rule_op`]):
//!
//! ```text
//! out [B, T, Hv, 2Dk + Dv] = q̂ | k̂ | v        q̂ = s·q/‖q‖, k̂ = k/‖k‖, s = Dk^-½, ‖x‖ = √(Σx² + ε)
//! ```
//!
//! Backward, per token and key head (its r = Hv / Hk value heads' gradients summed first, as
//! the repeat's backward sums them), with d the summed gradient of q̂ (or k̂, s = 1):
//!
//! ```text
//! dq = s · (d/‖q‖ − q·(q·d)/‖q‖³)             dv = the gradient of v, rounded to C's dtype
//! ```
//!
//! It replaces the candle ops that did this (narrow, broadcast and copy for the repeat, casts,
//! the five ops of each L2 norm, the scale, a concatenation) and their autograd. CUDA kernels:
//! `kernels/delta_prep.cu`; the CPU twin is here (the same sums, in lane order on CUDA — f32
//! ulps apart). `tests/linear_attn_ops.rs` proves the twin against autograd through the
//! reference ([`reference`]), `moeq gpu-check` ("delta_prep") the kernels.

use super::f32s;
use candle_core::{bail, CustomOp1, DType, Device, Result, Tensor};

/// The eps of transformers' `l2norm`, inside the square root (as [`super::delta_rule`]'s).
const L2_EPS: f32 = 1e-6;

/// The head layout of the convolution's channels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    pub key_heads: usize,
    pub value_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

impl Heads {
    fn channels(&self) -> usize {
        2 * self.key_heads * self.dk + self.value_heads * self.dv
    }

    fn width(&self) -> usize {
        2 * self.dk + self.dv
    }

    fn group(&self) -> usize {
        self.value_heads / self.key_heads
    }

    /// (B, T) of a conv output `[B, T, C]` that fits these heads.
    pub(super) fn check(&self, conv: &Tensor) -> Result<(usize, usize)> {
        let (b, t, c) = conv.dims3()?;
        let h = *self;
        if h.key_heads == 0 || h.value_heads % h.key_heads != 0 || c != h.channels() {
            bail!(
                "delta rule: conv output {:?} must be [B, T, 2·Hk·Dk + Hv·Dv] with Hv a multiple of Hk \
                 ({h:?})",
                conv.dims()
            );
        }
        Ok((b, t))
    }
}

/// The reference: candle ops with autograd (the layer's code before this op).
pub fn reference(conv: &Tensor, h: Heads) -> Result<Tensor> {
    let (q, k, v) = super::delta_rule::heads(conv, h)?;
    let f32 = |x: Tensor| x.to_dtype(DType::F32);
    let q = (super::delta_rule::l2norm(&f32(q)?)? * (h.dk as f64).powf(-0.5))?;
    let k = super::delta_rule::l2norm(&f32(k)?)?;
    Tensor::cat(&[&q, &k, &f32(v)?], 3)
}

/// The op on any device (the CPU twin on the CPU): conv `[B, T, C]` (f32, bf16 or f16) →
/// `[B, T, Hv, 2Dk + Dv]` f32.
pub fn apply(conv: &Tensor, h: Heads) -> Result<Tensor> {
    h.check(conv)?;
    if !matches!(conv.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!(
            "delta_prep: conv must be f32, bf16 or f16, got {:?}",
            conv.dtype()
        );
    }
    let conv = super::at_offset_zero(conv)?;
    if super::records_graph(&[&conv]) {
        conv.apply_op1(Prep(h))
    } else {
        super::direct(forward(&conv, h)?)
    }
}

struct Prep(Heads);

impl Prep {
    fn forward(&self, conv: &Tensor) -> Result<Tensor> {
        forward(conv, self.0)
    }
}

impl CustomOp1 for Prep {
    fn name(&self) -> &'static str {
        "delta_prep"
    }

    super::tensor_forward!(1, "delta_prep", forward);

    fn bwd(&self, conv: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let dout = super::at_offset_zero(&dout.to_dtype(DType::F32)?)?;
        Ok(Some(backward(conv, &dout, self.0)?))
    }
}

fn forward(conv: &Tensor, h: Heads) -> Result<Tensor> {
    let (b, t) = h.check(conv)?;
    match conv.device() {
        Device::Cpu => {
            let x = f32s(conv)?;
            let mut out = vec![0f32; b * t * h.value_heads * h.width()];
            for (bt, row) in x.chunks(h.channels()).enumerate() {
                for vh in 0..h.value_heads {
                    let at = (bt * h.value_heads + vh) * h.width();
                    let o = &mut out[at..at + h.width()];
                    let (q, k, v) = parts(row, h, vh);
                    let (iq, ik) = (inv_norm(q), inv_norm(k));
                    let s = scale(h);
                    for i in 0..h.dk {
                        o[i] = q[i] * iq * s;
                        o[h.dk + i] = k[i] * ik;
                    }
                    o[2 * h.dk..].copy_from_slice(v);
                }
            }
            Tensor::from_vec(out, (b, t, h.value_heads, h.width()), &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::run(conv, None, h, (b, t)),
        _ => bail!("delta_prep: CPU or CUDA only"),
    }
}

/// d conv `[B, T, C]` in conv's dtype for the gradient `dout` of the packed output (f32).
fn backward(conv: &Tensor, dout: &Tensor, h: Heads) -> Result<Tensor> {
    let (b, t) = h.check(conv)?;
    match conv.device() {
        Device::Cpu => {
            let (x, dy) = (f32s(conv)?, f32s(dout)?);
            let mut dx = vec![0f32; x.len()];
            let (c, w, r) = (h.channels(), h.width(), h.group());
            for bt in 0..b * t {
                let row = &x[bt * c..(bt + 1) * c];
                let drow = &mut dx[bt * c..(bt + 1) * c];
                let dy = &dy[bt * h.value_heads * w..(bt + 1) * h.value_heads * w];
                for kh in 0..h.key_heads {
                    // The group's gradients of q̂ and k̂, summed over its value heads in order.
                    let summed = |at: usize| -> Vec<f32> {
                        (0..h.dk)
                            .map(|i| (0..r).map(|j| dy[(kh * r + j) * w + at + i]).sum())
                            .collect()
                    };
                    let (q, k, _) = parts(row, h, kh * r);
                    for (x, d, at, s) in [
                        (q, summed(0), kh * h.dk, scale(h)),
                        (k, summed(h.dk), (h.key_heads + kh) * h.dk, 1.0),
                    ] {
                        let inv = inv_norm(x);
                        let dot: f32 = x.iter().zip(&d).map(|(a, b)| a * b).sum();
                        for i in 0..h.dk {
                            drow[at + i] = s * (d[i] * inv - x[i] * (inv * inv * inv) * dot);
                        }
                    }
                }
                for vh in 0..h.value_heads {
                    let at = 2 * h.key_heads * h.dk + vh * h.dv;
                    let from = vh * w + 2 * h.dk;
                    drow[at..at + h.dv].copy_from_slice(&dy[from..from + h.dv]);
                }
            }
            Tensor::from_vec(dx, conv.shape(), &Device::Cpu)?.to_dtype(conv.dtype())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::run(conv, Some(dout), h, (b, t)),
        _ => bail!("delta_prep: CPU or CUDA only"),
    }
}

/// Dk^-½ as the reference applies it (an f64 factor of an f32 tensor: rounded to f32).
fn scale(h: Heads) -> f32 {
    (h.dk as f64).powf(-0.5) as f32
}

/// q (of value head `vh`'s key head), k and v of one token's channels.
fn parts(row: &[f32], h: Heads, vh: usize) -> (&[f32], &[f32], &[f32]) {
    let kh = vh / h.group();
    let kd = h.key_heads * h.dk;
    let v = 2 * kd + vh * h.dv;
    (
        &row[kh * h.dk..(kh + 1) * h.dk],
        &row[kd + kh * h.dk..kd + (kh + 1) * h.dk],
        &row[v..v + h.dv],
    )
}

/// 1 / √(Σx² + ε), as the reference (sqrt, then the reciprocal).
fn inv_norm(x: &[f32]) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss + L2_EPS).sqrt()
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Heads, L2_EPS};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaDevice, DType, Result, Storage, Tensor};

    const WARPS: usize = 8;

    fn int(v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("delta_prep kernel: {v}")))
    }

    /// One kernel: `delta_prep_{fwd,bwd}_{suffix}` over `warps` warps.
    #[allow(clippy::too_many_arguments)]
    fn launch<X: DeviceRepr, O: DeviceRepr>(
        dev: &CudaDevice,
        kernel: &str,
        x: &CudaSlice<X>,
        dy: Option<&CudaSlice<f32>>,
        out: &CudaSlice<O>,
        rows: usize,
        warps: usize,
        h: Heads,
    ) -> Result<()> {
        let f = dev
            .get_or_load_custom_func(kernel, "moeq_delta_prep", crate::ops::kernels::DELTA_PREP)?
            .into_cuda_function();
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        let (rows, hk, hv) = (rows as i64, int(h.key_heads)?, int(h.value_heads)?);
        let (dk, dv, scale) = (int(h.dk)?, int(h.dv)?, super::scale(h));
        a.arg(x);
        if let Some(d) = dy {
            a.arg(d);
        }
        a.arg(out)
            .arg(&rows)
            .arg(&hk)
            .arg(&hv)
            .arg(&dk)
            .arg(&dv)
            .arg(&scale)
            .arg(&L2_EPS);
        let blocks = u32::try_from(warps.div_ceil(WARPS))
            .map_err(|_| candle_core::Error::Msg(format!("delta_prep kernel: {warps} warps")))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match kernels/delta_prep.cu; the sizes were checked by Heads::check
        // and the buffers hold them.
        unsafe { a.launch(cfg) }.w()?;
        Ok(())
    }

    /// The forward (`dout` None: the packed f32 output) or the backward (d conv in conv's
    /// dtype); inputs contiguous from offset 0.
    pub(super) fn run(
        conv: &Tensor,
        dout: Option<&Tensor>,
        h: Heads,
        (b, t): (usize, usize),
    ) -> Result<Tensor> {
        let (gc, _) = conv.storage_and_layout();
        let Storage::Cuda(sc) = &*gc else {
            bail!("delta_prep kernel: conv not on CUDA")
        };
        let dev = &sc.device;
        let gd = dout.map(|d| d.storage_and_layout());
        let dy = match gd.as_ref().map(|g| &*g.0) {
            Some(Storage::Cuda(c)) => match &c.slice {
                S::F32(s) => Some(s),
                _ => bail!("delta_prep kernel: the gradient must be f32"),
            },
            Some(_) => bail!("delta_prep kernel: the gradient not on CUDA"),
            None => None,
        };
        let rows = b * t;
        if rows == 0 {
            return match dout {
                None => Tensor::zeros((b, t, h.value_heads, h.width()), DType::F32, conv.device()),
                Some(_) => conv.zeros_like(),
            };
        }
        macro_rules! go {
            ($variant:ident, $t:ty, $name:literal) => {{
                let S::$variant(x) = &sc.slice else {
                    unreachable!()
                };
                match dy {
                    None => {
                        // SAFETY: the kernel writes every element.
                        let o = unsafe { dev.alloc::<f32>(rows * h.value_heads * h.width())? };
                        let kernel = concat!("delta_prep_fwd_", $name);
                        launch(dev, kernel, x, None, &o, rows, rows * h.value_heads, h)?;
                        let shape = (b, t, h.value_heads, h.width()).into();
                        crate::ops::cuda_tensor(S::F32(o), dev, shape)
                    }
                    Some(d) => {
                        // SAFETY: the kernel writes every element.
                        let o = unsafe { dev.alloc::<$t>(rows * h.channels())? };
                        let kernel = concat!("delta_prep_bwd_", $name);
                        launch(dev, kernel, x, Some(d), &o, rows, rows * h.key_heads, h)?;
                        crate::ops::cuda_tensor(S::$variant(o), dev, conv.shape().clone())
                    }
                }
            }};
        }
        Ok(match &sc.slice {
            S::F32(_) => go!(F32, f32, "f32"),
            S::BF16(_) => go!(BF16, half::bf16, "bf16"),
            S::F16(_) => go!(F16, half::f16, "f16"),
            _ => bail!("delta_prep kernel: f32, bf16 or f16 only"),
        })
    }
}
