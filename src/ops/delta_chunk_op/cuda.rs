//! The CUDA side of the chunked delta-rule op (`kernels/delta_chunk.cu`): one block of 512
//! threads per (head, chunk), shared memory sized from the heads and the chunk.

use super::{Carried, Geo};
use crate::ops::delta_rule_op::cuda::{cuda_device, int, view};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{bail, CudaDevice, Result, Tensor};

const THREADS: u32 = 512;

/// The kernels and their shared memory: chunk-row buffers of the widest head (+1: an odd stride
/// for even heads), C × C buffers (C + 1 wide) and per-position scalars (and `out`'s copy of a
/// state), as each kernel lays them out.
#[derive(Clone, Copy)]
enum Kernel {
    Prep,
    Out,
    OutBwd,
    PrepBwd,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Prep => "delta_chunk_prep",
            Kernel::Out => "delta_chunk_out",
            Kernel::OutBwd => "delta_chunk_out_bwd",
            Kernel::PrepBwd => "delta_chunk_prep_bwd",
        }
    }

    fn shared_bytes(self, g: Geo) -> usize {
        let (c, ld) = (g.c, g.dk.max(g.dv) + 1);
        let (rows, squares, scalars) = match self {
            Kernel::Prep => (2, 3, 2 * c),
            Kernel::Out => (2, 1, 2 * c + g.dk * g.dv),
            Kernel::OutBwd => (4, 2, 3 * c),
            Kernel::PrepBwd => (4, 4, 5 * c + THREADS as usize / 32),
        };
        4 * (rows * c * ld + squares * c * (c + 1) + scalars)
    }

    fn load(self, dev: &CudaDevice, g: Geo) -> Result<(CudaFunction, LaunchConfig)> {
        let most = crate::ops::delta_carry_op::MAX_CHUNK;
        if !super::kernel_takes(g.dk, g.dv) || g.c > most {
            bail!(
                "delta_chunk kernels: heads Dk {} / Dv {} (at most 128, Dk a multiple of 4) or \
                 chunk {} (at most {most}) out of range; MOEQ_DELTA_RULE=recurrent runs the \
                 token-by-token kernels instead",
                g.dk,
                g.dv,
                g.c
            );
        }
        let func = dev.get_or_load_custom_func(
            self.name(),
            "moeq_delta_chunk",
            crate::ops::kernels::DELTA_CHUNK,
        )?;
        let smem = self.shared_bytes(g);
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (int(g.bh())? as u32, int(g.n)? as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        Ok((func.into_cuda_function(), cfg))
    }
}

/// The sizes every kernel takes last: T, H, Dk, Dv, C, N.
fn sizes(g: Geo) -> Result<[i32; 6]> {
    Ok([
        int(g.t)?,
        int(g.h)?,
        int(g.dk)?,
        int(g.dv)?,
        int(g.c)?,
        int(g.n)?,
    ])
}

/// The carry's packed inputs `wk` [BH, N, C, 2Dk] and `us` [BH, N·(C+1) + Dk, Dv].
pub(super) fn prep(g: Geo, qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(qkv)?;
    let (func, cfg) = Kernel::Prep.load(dev, g)?;
    let (gq, gg, gs) = (
        qkv.storage_and_layout(),
        gb.storage_and_layout(),
        s0.storage_and_layout(),
    );
    let (vq, vg, vs) = (view(&gq)?, view(&gg)?, view(&gs)?);
    let wk_len = g.bh() * g.n * g.c * 2 * g.dk;
    // SAFETY: the kernel writes every row of wk and us (each chunk's rows, decay rows, S_0).
    let wk = unsafe { dev.alloc::<f32>(wk_len)? };
    let us = unsafe { dev.alloc::<f32>(g.bh() * g.us_rows() * g.dv)? };
    let s = sizes(g)?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    a.arg(&vq).arg(&vg).arg(&vs).arg(&wk).arg(&us);
    for x in &s {
        a.arg(x);
    }
    // SAFETY: arguments match delta_chunk_prep; shapes checked by Geo::of.
    unsafe { a.launch(cfg) }.w()?;
    let wrap = crate::ops::cuda_tensor;
    Ok((
        wrap(S::F32(wk), dev, (g.bh(), g.n, g.c, 2 * g.dk).into()),
        wrap(S::F32(us), dev, (g.bh(), g.us_rows(), g.dv).into()),
    ))
}

/// `out` [B, H, T + Dk, Dv] from the carry's output.
pub(super) fn out(g: Geo, qkv: &Tensor, gb: &Tensor, cout: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(qkv)?;
    let (func, cfg) = Kernel::Out.load(dev, g)?;
    let cout = crate::ops::at_offset_zero(cout)?;
    let (gq, gg, gc) = (
        qkv.storage_and_layout(),
        gb.storage_and_layout(),
        cout.storage_and_layout(),
    );
    let (vq, vg, vc) = (view(&gq)?, view(&gg)?, view(&gc)?);
    // SAFETY: the kernel writes every o row inside T and the final state's rows.
    let out = unsafe { dev.alloc::<f32>(g.bh() * g.rows() * g.dv)? };
    let s = sizes(g)?;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    a.arg(&vq).arg(&vg).arg(&vc).arg(&out);
    for x in &s {
        a.arg(x);
    }
    // SAFETY: arguments match delta_chunk_out; shapes checked by Geo::of.
    unsafe { a.launch(cfg) }.w()?;
    Ok(crate::ops::cuda_tensor(
        S::F32(out),
        dev,
        (g.b, g.h, g.rows(), g.dv).into(),
    ))
}

/// (d qkv, d gb, the carry's gradients) for `dout`: `delta_chunk_out_bwd`, the carry's
/// backward, then `delta_chunk_prep_bwd`.
pub(super) fn backward(
    g: Geo,
    qkv: &Tensor,
    gb: &Tensor,
    dout: &Tensor,
    x: &Carried,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(qkv)?;
    let cout = crate::ops::at_offset_zero(&x.cout)?;
    let wrap = crate::ops::cuda_tensor;
    let s = sizes(g)?;
    let stream = dev.cuda_stream();
    // SAFETY: out_bwd writes dq and dk of every position, every row of cdout (dV' rows, each
    // chunk's slot and the last slot) and dc; prep_bwd adds to dk and writes dv and dgb.
    let dqkv = unsafe { dev.alloc::<f32>(qkv.elem_count())? };
    let dgb = unsafe { dev.alloc::<f32>(gb.elem_count())? };
    let cdout = unsafe { dev.alloc::<f32>(cout.elem_count())? };
    let dc = unsafe { dev.alloc::<f32>(g.bh() * g.n * g.c)? };
    {
        let (func, cfg) = Kernel::OutBwd.load(dev, g)?;
        let (gq, gg, gd, gc) = (
            qkv.storage_and_layout(),
            gb.storage_and_layout(),
            dout.storage_and_layout(),
            cout.storage_and_layout(),
        );
        let (vq, vg, vd, vc) = (view(&gq)?, view(&gg)?, view(&gd)?, view(&gc)?);
        let mut a = stream.launch_builder(&func);
        a.arg(&vq)
            .arg(&vg)
            .arg(&vd)
            .arg(&vc)
            .arg(&dqkv)
            .arg(&cdout)
            .arg(&dc);
        for v in &s {
            a.arg(v);
        }
        // SAFETY: arguments match delta_chunk_out_bwd; shapes checked by Geo::of.
        unsafe { a.launch(cfg) }.w()?;
    }
    let cdout = wrap(S::F32(cdout), dev, cout.shape().clone());
    let cgrad = crate::ops::delta_carry_op::run(&x.wk, &x.us, Some(&cdout))?;
    {
        let (func, cfg) = Kernel::PrepBwd.load(dev, g)?;
        let (gq, gg, gc, gr) = (
            qkv.storage_and_layout(),
            gb.storage_and_layout(),
            cout.storage_and_layout(),
            cgrad.storage_and_layout(),
        );
        let (vq, vg, vc, vr) = (view(&gq)?, view(&gg)?, view(&gc)?, view(&gr)?);
        let mut a = stream.launch_builder(&func);
        a.arg(&vq)
            .arg(&vg)
            .arg(&vc)
            .arg(&vr)
            .arg(&dc)
            .arg(&dqkv)
            .arg(&dgb);
        for v in &s {
            a.arg(v);
        }
        // SAFETY: arguments match delta_chunk_prep_bwd; shapes checked by Geo::of.
        unsafe { a.launch(cfg) }.w()?;
    }
    Ok((
        wrap(S::F32(dqkv), dev, qkv.shape().clone()),
        wrap(S::F32(dgb), dev, gb.shape().clone()),
        cgrad,
    ))
}
