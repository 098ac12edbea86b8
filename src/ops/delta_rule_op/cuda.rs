//! The CUDA side of the delta-rule op (`kernels/delta_rule.cu`): the work split, the forward
//! (with or without the backward's state checkpoints) and the backward.

use super::Geo;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{bail, CudaDevice, Result, Storage, Tensor};

/// The most warps per block; half that for 4 columns per warp, whose registers 512 threads
/// cannot hold (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES).
const MAX_WARPS: usize = 16;

/// The kernels' tokens between checkpoints unless `MOEQ_DELTA_RULE_SPLIT` says otherwise.
const KERNEL_CKPT: usize = 16;

pub(in crate::ops) fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("delta_rule kernel: {v}")))
}

pub(in crate::ops) fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev),
        _ => bail!("delta_rule kernel: not on CUDA"),
    }
}

/// How the kernels split the work: grid (B·H, tiles), `warps` warps of `cpw` value columns
/// per block, `r` rows per lane, and the backward's chunk of `ckpt` tokens between the
/// forward's checkpoints. The forward that saves checkpoints and the backward must use the
/// same split (their checkpoints are private to each thread).
#[derive(Clone, Copy)]
struct Split {
    r: usize,
    cpw: usize,
    warps: usize,
    tiles: usize,
    ckpt: usize,
}

/// `MOEQ_DELTA_RULE_SPLIT=CPW,CHUNK[,WARPS]` (columns per warp 1, 2 or 4; tokens per
/// checkpoint; the most warps per block, 1 to 16), read once; 2, [`KERNEL_CKPT`] and
/// [`MAX_WARPS`] otherwise (half that for 4 columns per warp).
fn columns_chunk_warps() -> (usize, usize, usize) {
    static SPLIT: std::sync::OnceLock<(usize, usize, usize)> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| {
        let v = std::env::var("MOEQ_DELTA_RULE_SPLIT").unwrap_or_default();
        let mut it = v.split(',').map(|x| x.trim().parse::<usize>().ok());
        let (cpw, chunk) = match (it.next().flatten(), it.next().flatten()) {
            (Some(cpw @ (1 | 2 | 4)), Some(c)) if c > 0 => (cpw, c),
            _ => (2, KERNEL_CKPT),
        };
        let most = if cpw > 2 { MAX_WARPS / 2 } else { MAX_WARPS };
        match it.next().flatten() {
            Some(w) if (1..=most).contains(&w) => (cpw, chunk, w),
            _ => (cpw, chunk, most),
        }
    })
}

impl Split {
    fn of(g: Geo) -> Result<Split> {
        let Some(r) = [1usize, 2, 4, 8].into_iter().find(|r| 32 * r >= g.dk) else {
            bail!(
                "delta_rule kernel: key head size {} is over 256; use the chunked reference \
                 (delta_rule::chunked)",
                g.dk
            )
        };
        let (cpw, ckpt, max_warps) = columns_chunk_warps();
        let warps = g.dv.div_ceil(cpw).min(max_warps);
        Ok(Split {
            r,
            cpw,
            warps,
            tiles: g.dv.div_ceil(warps * cpw),
            ckpt,
        })
    }

    fn blocks(&self, g: Geo) -> usize {
        g.b * g.h * self.tiles
    }

    fn threads(&self) -> usize {
        self.warps * 32
    }

    /// Checkpoints per (b, h).
    fn ckpts(&self, g: Geo) -> usize {
        g.t.div_ceil(self.ckpt)
    }

    /// Floats of a thread-private array of `slots` slots (one state slice per thread each).
    fn private(&self, g: Geo, slots: usize) -> usize {
        self.blocks(g) * slots * self.cpw * self.r * self.threads()
    }

    fn kernel(&self, pass: &str) -> String {
        format!("delta_rule_{pass}_r{}_c{}", self.r, self.cpw)
    }

    fn launch(&self, g: Geo, shared: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (int(g.b * g.h)? as u32, int(self.tiles)? as u32, 1),
            block_dim: (self.threads() as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }
}

fn function(
    dev: &CudaDevice,
    kernel: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    let func =
        dev.get_or_load_custom_func(kernel, "moeq_delta_rule", crate::ops::kernels::DELTA_RULE)?;
    Ok(func.into_cuda_function())
}

pub(in crate::ops) type Guard<'a> = (candle_core::StorageRef<'a>, &'a candle_core::Layout);

pub(in crate::ops) fn view<'a>(g: &'a Guard<'_>) -> Result<CudaView<'a, f32>> {
    let Storage::Cuda(c) = &*g.0 else {
        bail!("delta_rule kernel: tensor not on CUDA")
    };
    Ok(c.as_cuda_slice::<f32>()?.slice(g.1.start_offset()..))
}

/// `out` [B, H, T + Dk, Dv] and, when `ckpt`, the checkpoints (thread-private, ⌈T/C⌉
/// slots).
fn run_forward(
    g: Geo,
    split: Split,
    qkv: &Tensor,
    gb: &Tensor,
    s0: &Tensor,
    ckpt: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = cuda_device(qkv)?;
    let func = function(dev, &split.kernel("fwd"))?;
    let (gq, gg, gs) = (
        qkv.storage_and_layout(),
        gb.storage_and_layout(),
        s0.storage_and_layout(),
    );
    let (vq, vg, vs) = (view(&gq)?, view(&gg)?, view(&gs)?);
    let saved_len = if ckpt {
        split.private(g, split.ckpts(g))
    } else {
        1
    };
    // SAFETY: the kernel writes every row of out and, when asked, every checkpoint.
    let out = unsafe { dev.alloc::<f32>(g.b * g.h * g.rows() * g.dv)? };
    let saved = unsafe { dev.alloc::<f32>(saved_len)? };
    let every = if ckpt { int(split.ckpt)? } else { 0 };
    let (t, h, dk, dv) = (int(g.t)?, int(g.h)?, int(g.dk)?, int(g.dv)?);
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    a.arg(&vq).arg(&vg).arg(&vs).arg(&out).arg(&saved);
    a.arg(&t).arg(&h).arg(&dk).arg(&dv).arg(&every);
    // SAFETY: arguments match kernels/delta_rule.cu; shapes checked by Geo::of.
    unsafe { a.launch(split.launch(g, 0)?) }.w()?;
    let wrap = crate::ops::cuda_tensor;
    let out = wrap(S::F32(out), dev, (g.b, g.h, g.rows(), g.dv).into());
    Ok((
        out,
        ckpt.then(|| wrap(S::F32(saved), dev, saved_len.into())),
    ))
}

pub(super) fn forward(g: Geo, qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Tensor> {
    Ok(run_forward(g, Split::of(g)?, qkv, gb, s0, false)?.0)
}

/// `out` and the checkpoints the backward reads (the same split as the backward's).
pub(super) fn forward_keeping(
    g: Geo,
    qkv: &Tensor,
    gb: &Tensor,
    s0: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match run_forward(g, Split::of(g)?, qkv, gb, s0, true)? {
        (out, Some(ckpt)) => Ok((out, ckpt)),
        _ => bail!("delta_rule kernel: the forward kept no checkpoints"),
    }
}

pub(super) fn backward(
    g: Geo,
    qkv: &Tensor,
    gb: &Tensor,
    s0: &Tensor,
    dout: &Tensor,
    saved: Option<Tensor>,
) -> Result<[Tensor; 3]> {
    let dev = cuda_device(qkv)?;
    let split = Split::of(g)?;
    // The forward's checkpoints when it kept them (same split: the process's one), else a
    // rerun of the forward that writes them.
    let ckpt = match saved {
        Some(c) if c.elem_count() == split.private(g, split.ckpts(g)) => {
            super::count_kept_read();
            c
        }
        _ => match run_forward(g, split, qkv, gb, s0, true)? {
            (_, Some(c)) => c,
            _ => bail!("delta_rule kernel: the forward kept no checkpoints"),
        },
    };
    let p = 2 * g.dk + 2;
    let tokens = g.b * g.t * g.h;
    let (gq, gg, gc, gd) = (
        qkv.storage_and_layout(),
        gb.storage_and_layout(),
        ckpt.storage_and_layout(),
        dout.storage_and_layout(),
    );
    let (vq, vg, vc, vd) = (view(&gq)?, view(&gg)?, view(&gc)?, view(&gd)?);
    // SAFETY: each thread writes its scratch before reading it; the backward writes dv, every
    // partial sum and d s0, the sum kernel dq, dk and dgb: every element is written.
    let scratch = unsafe { dev.alloc::<f32>(split.private(g, split.ckpt))? };
    let part = unsafe { dev.alloc::<f32>(split.tiles * tokens * p)? };
    let dqkv = unsafe { dev.alloc::<f32>(qkv.elem_count())? };
    let dgb = unsafe { dev.alloc::<f32>(gb.elem_count())? };
    let ds0 = unsafe { dev.alloc::<f32>(s0.elem_count())? };
    let (t, h, dk, dv, c) = (
        int(g.t)?,
        int(g.h)?,
        int(g.dk)?,
        int(g.dv)?,
        int(split.ckpt)?,
    );
    let stream = dev.cuda_stream();
    let func = function(dev, &split.kernel("bwd"))?;
    let mut a = stream.launch_builder(&func);
    a.arg(&vq).arg(&vg).arg(&vc).arg(&vd).arg(&scratch);
    a.arg(&dqkv).arg(&part).arg(&ds0);
    a.arg(&t).arg(&h).arg(&dk).arg(&dv).arg(&c);
    // SAFETY: arguments match kernels/delta_rule.cu; shapes checked by Geo::of.
    unsafe { a.launch(split.launch(g, 2 * 4 * split.warps * p)?) }.w()?;
    let func = function(dev, "delta_rule_bwd_sum")?;
    let n = tokens * p;
    let (bth, tiles) = (tokens as i64, int(split.tiles)?);
    let mut a = stream.launch_builder(&func);
    a.arg(&part).arg(&dqkv).arg(&dgb);
    a.arg(&bth).arg(&tiles).arg(&dk).arg(&dv);
    // SAFETY: arguments match delta_rule_bwd_sum; part holds tiles·B·T·H·(2Dk + 2) floats.
    unsafe { a.launch(LaunchConfig::for_num_elems(int(n)? as u32)) }.w()?;
    let wrap = crate::ops::cuda_tensor;
    Ok([
        wrap(S::F32(dqkv), dev, qkv.shape().clone()),
        wrap(S::F32(dgb), dev, gb.shape().clone()),
        wrap(S::F32(ds0), dev, s0.shape().clone()),
    ])
}
