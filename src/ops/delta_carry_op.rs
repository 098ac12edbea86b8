//! The gated delta rule's pass over chunks — the only sequential part of the chunked form
//! ([`super::delta_rule::chunkwise`]) — as one custom op with a written-out backward: the CUDA
//! kernels of `kernels/delta_carry.cu` and their CPU twin ([`walk`]: the same loops). Per head,
//! with the state S entering chunk n, the chunk's W_n, K̃_n [C, Dk], U_n [C, Dv] and decay d_n:
//!
//! ```text
//! V'_n    = U_n − W_n S_n
//! S_{n+1} = d_n S_n + K̃_nᵀ V'_n
//! ```
//!
//! Each value column of S evolves alone, so the kernels split the columns over blocks and need
//! no sums across them. The backward walks the chunks in reverse with the same two products
//! (G the gradient of S_{n+1}, dS_n and dV'_n the outputs' own gradients):
//!
//! ```text
//! dV'_n   = dV'_n + K̃_n G            (= dU_n)
//! G       ← dS_n + d_n G − W_nᵀ dV'_n (the gradient of S_n)
//! dW_n    = −dV'_n S_nᵀ;  dK̃_n = V'_n G_{n+1}ᵀ;  dd_n = Σ G_{n+1} ⊙ S_n
//! ```
//!
//! the last line here, as batched products of the saved states and the kernel's outputs.
//! Packed so that the op has two inputs and one output (layouts in the kernel's header):
//! `wk` [BH, N, C, 2Dk] (W | K̃), `us` [BH, N·(C+1) + Dk, Dv] (per chunk U then its decay as
//! one row, then S_0), `out` [BH, N·C + (N+1)·Dk, Dv] (V', then S_0..S_N).

use candle_core::{bail, CustomOp2, DType, Device, Result, Tensor};

/// The longest chunk and key head the kernels take (shared memory and rows per warp), and the
/// key head's granule (rows are read four floats at a time).
pub const MAX_CHUNK: usize = 64;
const MAX_DK: usize = 256;

/// Whether the CUDA kernels take chunks of `chunk` positions with key heads of `dk` (the CPU
/// twin takes any).
pub fn kernel_takes(dk: usize, chunk: usize) -> bool {
    dk <= MAX_DK && dk % 4 == 0 && (1..=MAX_CHUNK).contains(&chunk)
}

/// The state carried across N chunks of C positions for BH heads: w, k_tail [BH, N, C, Dk],
/// u [BH, N, C, Dv], decay [BH, N], s0 [BH, Dk, Dv], all f32 → (V' [BH, N, C, Dv], the states
/// [BH, N + 1, Dk, Dv]: entering each chunk, then the final one).
pub fn carry(
    w: &Tensor,
    k_tail: &Tensor,
    u: &Tensor,
    decay: &Tensor,
    s0: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (bh, n, c, dk) = w.dims4()?;
    let dv = u.dim(3)?;
    if k_tail.dims() != w.dims()
        || u.dims() != [bh, n, c, dv]
        || decay.dims() != [bh, n]
        || s0.dims() != [bh, dk, dv]
    {
        bail!(
            "delta_carry: w {:?}, k_tail {:?}, u {:?}, decay {:?}, s0 {:?} must be [BH, N, C, Dk] \
             twice, [BH, N, C, Dv], [BH, N], [BH, Dk, Dv]",
            w.dims(),
            k_tail.dims(),
            u.dims(),
            decay.dims(),
            s0.dims()
        );
    }
    let wk = Tensor::cat(&[w, k_tail], 3)?;
    let decay_row = decay.reshape((bh, n, 1, 1))?.broadcast_as((bh, n, 1, dv))?;
    let chunks = Tensor::cat(&[u, &decay_row], 2)?.reshape((bh, n * (c + 1), dv))?;
    let us = Tensor::cat(&[&chunks, s0], 1)?;
    let at0 = super::at_offset_zero;
    let (wk, us) = (at0(&wk)?, at0(&us)?);
    let out = if super::records_graph(&[&wk, &us]) {
        wk.apply_op2(&us, DeltaCarry)?
    } else {
        run(&wk, &us, None)?
    };
    let v_new = out.narrow(1, 0, n * c)?.reshape((bh, n, c, dv))?;
    let states = out
        .narrow(1, n * c, (n + 1) * dk)?
        .reshape((bh, n + 1, dk, dv))?;
    Ok((v_new, states))
}

/// The op's sizes, from its packed inputs (checked against each other).
#[derive(Debug, Clone, Copy)]
struct Geo {
    bh: usize,
    n: usize,
    c: usize,
    dk: usize,
    dv: usize,
}

impl Geo {
    fn of(wk: &Tensor, us: &Tensor) -> Result<Geo> {
        let (bh, n, c, w) = wk.dims4()?;
        let (ubh, rows, dv) = us.dims3()?;
        let dk = w / 2;
        if w % 2 != 0 || ubh != bh || rows != n * (c + 1) + dk {
            bail!(
                "delta_carry op: wk {:?} and us {:?} must be [BH, N, C, 2Dk] and \
                 [BH, N·(C+1) + Dk, Dv]",
                wk.dims(),
                us.dims()
            );
        }
        if wk.dtype() != DType::F32 || us.dtype() != DType::F32 {
            bail!("delta_carry op: packed inputs must be f32");
        }
        Ok(Geo { bh, n, c, dk, dv })
    }

    fn us_rows(&self) -> usize {
        self.n * (self.c + 1) + self.dk
    }

    /// Rows of `out` per head: Y rows, then N + 1 slots of Dk.
    fn out_rows(&self) -> usize {
        self.n * self.c + (self.n + 1) * self.dk
    }
}

struct DeltaCarry;

impl DeltaCarry {
    fn forward(&self, wk: &Tensor, us: &Tensor) -> Result<Tensor> {
        run(wk, us, None)
    }
}

impl CustomOp2 for DeltaCarry {
    fn name(&self) -> &'static str {
        "delta_carry"
    }

    super::tensor_forward!(2, "delta_carry", forward);

    fn bwd(
        &self,
        wk: &Tensor,
        us: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: delta carry", wk.device());
        let g = Geo::of(wk, us)?;
        let dout = super::at_offset_zero(&dout.to_dtype(DType::F32)?)?;
        let grads = run(wk, us, Some(&dout))?;
        let (bh, n, c, dk, dv) = (g.bh, g.n, g.c, g.dk, g.dv);
        // [BH, rows, Dv] → per chunk: Y rows [BH·N, C, Dv], slots m..m+N [BH·N, Dk, Dv].
        let ys = |t: &Tensor| t.narrow(1, 0, n * c)?.reshape((bh * n, c, dv));
        let slots = |t: &Tensor, m: usize| {
            t.narrow(1, n * c + m * dk, n * dk)?
                .reshape((bh * n, dk, dv))
        };
        let d_v = ys(&grads)?; // dU_n = the total gradient of V'_n
        let (v_new, s_in, g_out) = (ys(out)?, slots(out, 0)?, slots(&grads, 1)?);
        let d_w = d_v.matmul(&s_in.t()?)?.neg()?; // [BH·N, C, Dk]
        let d_k_tail = v_new.matmul(&g_out.t()?)?;
        let d_decay = (&g_out * &s_in)?.sum_keepdim(1)?; // [BH·N, 1, Dv]
        let d_wk = Tensor::cat(&[&d_w, &d_k_tail], 2)?.reshape((bh, n, c, 2 * dk))?;
        let d_chunks = Tensor::cat(&[&d_v, &d_decay], 1)?.reshape((bh, n * (c + 1), dv))?;
        let d_us = Tensor::cat(&[&d_chunks, &grads.narrow(1, n * c, dk)?], 1)?;
        Ok((Some(d_wk), Some(d_us)))
    }
}

/// `out` [BH, N·C + (N+1)·Dk, Dv] of the packed inputs: the forward's, or with `dout` the
/// backward's (Y = dU, slots = the states' gradients).
pub(super) fn run(wk: &Tensor, us: &Tensor, dout: Option<&Tensor>) -> Result<Tensor> {
    let g = Geo::of(wk, us)?;
    match wk.device() {
        Device::Cpu => {
            let vec = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
            let d = dout.map(vec).transpose()?;
            let mut out = vec![0f32; g.bh * g.out_rows() * g.dv];
            walk(g, &vec(wk)?, &vec(us)?, d.as_deref(), &mut out);
            Tensor::from_vec(out, (g.bh, g.out_rows(), g.dv), &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::run(g, wk, us, dout),
        _ => bail!("delta_carry op: CPU or CUDA only"),
    }
}

/// The CPU twin of `delta_carry_fwd` (`dout` None) and `delta_carry_bwd`: the kernel's
/// equations (module doc), each head's columns in turn.
fn walk(g: Geo, wk: &[f32], us: &[f32], dout: Option<&[f32]>, out: &mut [f32]) {
    let (n, c, dk, dv) = (g.n, g.c, g.dk, g.dv);
    let (us_rows, out_rows, slots) = (g.us_rows(), g.out_rows(), n * c);
    let back = dout.is_some();
    // Forward: Y = U − W G, G = d G + K̃ᵀ Y; backward: Y = dV' + K̃ G, G = dS + d G − Wᵀ Y.
    let (a_at, b_at, sign_a, sign_b) = if back {
        (dk, 0, 1f32, -1f32)
    } else {
        (0, dk, -1f32, 1f32)
    };
    let mut y = vec![0f32; c * dv];
    for bh in 0..g.bh {
        let u = &us[bh * us_rows * dv..(bh + 1) * us_rows * dv];
        let d_out = dout.map(|d| &d[bh * out_rows * dv..(bh + 1) * out_rows * dv]);
        let o = &mut out[bh * out_rows * dv..(bh + 1) * out_rows * dv];
        let rows = &wk[bh * n * c * 2 * dk..(bh + 1) * n * c * 2 * dk];
        let first = if back { n } else { 0 };
        let mut s = match d_out {
            Some(d) => d[(slots + n * dk) * dv..(slots + (n + 1) * dk) * dv].to_vec(),
            None => u[n * (c + 1) * dv..us_rows * dv].to_vec(),
        }; // [Dk, Dv]
        o[(slots + first * dk) * dv..(slots + (first + 1) * dk) * dv].copy_from_slice(&s);
        for step in 0..n {
            let m = if back { n - 1 - step } else { step };
            let chunk = &rows[m * c * 2 * dk..(m + 1) * c * 2 * dk];
            for i in 0..c {
                let a = &chunk[i * 2 * dk + a_at..i * 2 * dk + a_at + dk];
                for j in 0..dv {
                    let acc: f32 = (0..dk).map(|d| a[d] * s[d * dv + j]).sum();
                    let x = match d_out {
                        Some(dd) => dd[(m * c + i) * dv + j],
                        None => u[(m * (c + 1) + i) * dv + j],
                    };
                    y[i * dv + j] = x + sign_a * acc;
                }
            }
            o[m * c * dv..(m + 1) * c * dv].copy_from_slice(&y);
            let decay = &u[(m * (c + 1) + c) * dv..(m * (c + 1) + c + 1) * dv];
            for d in 0..dk {
                for j in 0..dv {
                    let acc: f32 = (0..c)
                        .map(|i| chunk[i * 2 * dk + b_at + d] * y[i * dv + j])
                        .sum();
                    let e = d_out.map_or(0.0, |dd| dd[(slots + m * dk + d) * dv + j]);
                    s[d * dv + j] = e + decay[j] * s[d * dv + j] + sign_b * acc;
                }
            }
            let slot = if back { m } else { m + 1 };
            o[(slots + slot * dk) * dv..(slots + (slot + 1) * dk) * dv].copy_from_slice(&s);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Geo, MAX_CHUNK};
    use crate::ops::delta_rule_op::cuda::{cuda_device, int, view};
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, Result, Tensor};

    /// Columns per block and threads per block (`COLS`, `WARPS` in the kernel).
    const COLS: usize = 32;
    const THREADS: usize = 512;

    pub(super) fn run(g: Geo, wk: &Tensor, us: &Tensor, dout: Option<&Tensor>) -> Result<Tensor> {
        if !super::kernel_takes(g.dk, g.c) {
            bail!(
                "delta_carry kernel: key head {} (a multiple of 4, at most {}) or chunk {} (at \
                 most {MAX_CHUNK}) out of range",
                g.dk,
                super::MAX_DK,
                g.c
            );
        }
        let dev = cuda_device(wk)?;
        let rg = [4usize, 8, 16]
            .into_iter()
            .find(|r| 16 * r >= g.dk)
            .expect("dk ≤ 256");
        let name = format!(
            "delta_carry_{}_r{rg}",
            if dout.is_some() { "bwd" } else { "fwd" }
        );
        let func = dev.get_or_load_custom_func(
            &name,
            "moeq_delta_carry",
            crate::ops::kernels::DELTA_CARRY,
        )?;
        let smem = (2 * g.c * g.dk + (g.dk + g.c) * COLS) * 4;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let func = func.into_cuda_function();
        let (gw, gu) = (wk.storage_and_layout(), us.storage_and_layout());
        let (vw, vu) = (view(&gw)?, view(&gu)?);
        // SAFETY: the kernel writes every row of out (Y rows and every slot).
        let out = unsafe { dev.alloc::<f32>(g.bh * g.out_rows() * g.dv)? };
        let (n, c, dk, dv) = (int(g.n)?, int(g.c)?, int(g.dk)?, int(g.dv)?);
        let cfg = LaunchConfig {
            grid_dim: (int(g.bh)? as u32, int(g.dv.div_ceil(COLS))? as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&func);
        a.arg(&vw).arg(&vu);
        let gd = dout.map(|d| d.storage_and_layout());
        let vd = gd.as_ref().map(view).transpose()?;
        if let Some(vd) = &vd {
            a.arg(vd);
        }
        a.arg(&out).arg(&n).arg(&c).arg(&dk).arg(&dv);
        // SAFETY: arguments match kernels/delta_carry.cu; shapes checked by Geo::of.
        unsafe { a.launch(cfg) }.w()?;
        let shape = (g.bh, g.out_rows(), g.dv);
        Ok(crate::ops::cuda_tensor(S::F32(out), dev, shape.into()))
    }
}
