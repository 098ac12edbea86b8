//! The packed activations' CUDA launches (`kernels/swiglu.cu`): forward and backward over a
//! fused gate_up `[rows, 2·I]`, and the backward with each row's dot. `extra` > 0 writes the
//! output rows that many columns wider (the vectorised silu kernels only): the expert adapters
//! inside their products' K take those columns (`ops::lora_in_k`).

use super::Glu;
use candle_core::{DType, Result, Shape, Tensor};

/// Runs `swiglu_packed_{fwd,bwd}_<dtype>` (`inputs` then the output, rows, half).
pub(super) fn packed_cuda(
    gu: &Tensor,
    dy: Option<&Tensor>,
    glu: Glu,
    extra: usize,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::Storage;
    let candle_core::Device::Cuda(dev) = gu.device() else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    let (rows, two_i) = gu.dims2()?;
    let half = two_i / 2;
    let (pass, n_out, shape) = match dy {
        None => (
            "fwd",
            rows * (half + extra),
            Shape::from((rows, half + extra)),
        ),
        Some(_) => (
            "bwd",
            rows * (two_i + extra),
            Shape::from((rows, two_i + extra)),
        ),
    };
    let suffix = match gu.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("swiglu_packed: {other:?} not supported"),
    };
    let (sg, lg) = gu.storage_and_layout();
    let dy_guard = dy.map(|t| t.storage_and_layout());
    let Storage::Cuda(sg) = &*sg else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    // 16-byte packs per thread when rows split into whole packs that start on 16 bytes (outputs
    // are fresh allocations, 256-byte aligned).
    let per_pack = 16 / gu.dtype().size_in_bytes();
    let aligned = |l: &candle_core::Layout| l.start_offset() % per_pack == 0;
    let vec =
        half % per_pack == 0 && aligned(lg) && dy_guard.as_ref().is_none_or(|(_, l)| aligned(l));
    // Output rows `extra` wider: the vectorised silu kernels'.
    let wide = extra > 0;
    if wide && !(vec && glu == Glu::Silu && extra % per_pack == 0) {
        candle_core::bail!("swiglu_packed: rows {extra} wider need the vectorised silu kernels");
    }
    let kind = match (wide, vec) {
        (true, _) => "_wide_vec",
        (false, true) => "_vec",
        (false, false) => "",
    };
    let per_thread = if vec { per_pack } else { 1 };
    // The output's row stride (the wide kernels' last argument).
    let ldo = extra + if dy.is_some() { two_i } else { half };
    let (name, per_thread) = match glu {
        Glu::Silu => (format!("swiglu_packed_{pass}{kind}_{suffix}"), per_thread),
        Glu::Clamped { .. } => (format!("clamped_glu_{pass}_{suffix}"), 1),
    };
    let func = dev.get_or_load_custom_func(&name, "moeq_swiglu", crate::ops::kernels::SWIGLU)?;
    let cfg = LaunchConfig::for_num_elems((rows * half / per_thread).min(1 << 30) as u32);
    macro_rules! run {
        ($g:expr, $variant:path, $wrap:path) => {{
            let g = $g.slice(lg.start_offset()..lg.start_offset() + rows * two_i);
            // SAFETY: the kernel writes every output element.
            let out = unsafe { dev.alloc(n_out)? };
            let mut b = func.builder();
            b.arg(&g);
            let d = match &dy_guard {
                Some((s, l)) => match &**s {
                    Storage::Cuda(c) => match &c.slice {
                        $variant(d) => {
                            Some(d.slice(l.start_offset()..l.start_offset() + rows * half))
                        }
                        _ => candle_core::bail!("swiglu_packed: gradient dtype differs"),
                    },
                    _ => candle_core::bail!("swiglu_packed: gradient not on CUDA"),
                },
                None => None,
            };
            if let Some(d) = &d {
                b.arg(d);
            }
            b.arg(&out);
            b.arg(&rows);
            b.arg(&half);
            if wide {
                b.arg(&ldo);
            }
            let clamps = match glu {
                Glu::Clamped { alpha, limit } => Some((alpha, limit)),
                Glu::Silu => None,
            };
            if let Some((alpha, limit)) = &clamps {
                b.arg(alpha);
                b.arg(limit);
            }
            // SAFETY: arguments match kernels/swiglu.cu.
            unsafe { b.launch(cfg) }.w()?;
            $wrap(out)
        }};
    }
    let slice = match &sg.slice {
        S::F32(g) => run!(g, S::F32, S::F32),
        S::BF16(g) => run!(g, S::BF16, S::BF16),
        S::F16(g) => run!(g, S::F16, S::F16),
        _ => candle_core::bail!("swiglu_packed: unsupported dtype"),
    };
    let storage = candle_core::CudaStorage {
        slice,
        device: dev.clone(),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// `swiglu_packed_bwd_dot_vec_<dtype>` on gu and dy at offset zero, or None where rows are not
/// whole 16-byte packs.
pub(super) fn packed_dot_cuda(
    gu: &Tensor,
    dy: &Tensor,
    extra: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice as S, WrapErr};
    use candle_core::Storage;
    let candle_core::Device::Cuda(dev) = gu.device() else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    let (rows, two_i) = gu.dims2()?;
    let half = two_i / 2;
    let per_pack = 16 / gu.dtype().size_in_bytes();
    if half % per_pack != 0 || extra % per_pack != 0 || rows == 0 || dy.dims2()? != (rows, half) {
        return Ok(None);
    }
    let ldg = two_i + extra;
    let suffix = match gu.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => return Ok(None),
    };
    let func = dev.get_or_load_custom_func(
        &match extra {
            0 => format!("swiglu_packed_bwd_dot_vec_{suffix}"),
            _ => format!("swiglu_packed_bwd_dot_wide_vec_{suffix}"),
        },
        "moeq_swiglu",
        crate::ops::kernels::SWIGLU,
    )?;
    // 8 rows (warps) per block of 256 threads.
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8).min(1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (sg, _) = gu.storage_and_layout();
    let (sd, _) = dy.storage_and_layout();
    let (Storage::Cuda(g), Storage::Cuda(d)) = (&*sg, &*sd) else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    // SAFETY: the kernel writes every row's dot.
    let dot = unsafe { dev.alloc::<f32>(rows)? };
    macro_rules! run {
        ($t:ty, $variant:path) => {{
            let (gv, dv) = (g.as_cuda_slice::<$t>()?, d.as_cuda_slice::<$t>()?);
            // SAFETY: the kernel writes every element of dgu.
            let dgu = unsafe { dev.alloc::<$t>(rows * ldg)? };
            let mut b = func.builder();
            b.arg(gv);
            b.arg(dv);
            b.arg(&dgu);
            b.arg(&dot);
            b.arg(&rows);
            b.arg(&half);
            if extra > 0 {
                b.arg(&ldg);
            }
            // SAFETY: arguments match kernels/swiglu.cu; both inputs start at offset zero.
            unsafe { b.launch(cfg) }.w()?;
            $variant(dgu)
        }};
    }
    let slice = match gu.dtype() {
        DType::F32 => run!(f32, S::F32),
        DType::BF16 => run!(half::bf16, S::BF16),
        DType::F16 => run!(half::f16, S::F16),
        _ => return Ok(None),
    };
    let wrap = |storage: CudaStorage, shape: Shape| {
        Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )
    };
    let dgu = wrap(
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((rows, ldg)),
    );
    let dot = wrap(
        CudaStorage::wrap_cuda_slice(dot, dev.clone()),
        Shape::from(rows),
    );
    Ok(Some((dgu, dot)))
}

/// The packed backward written over gu itself (dgu in gu's buffer; with `dots`, each row's dot
/// too, returned): silu's vectorised kernels, whose threads each read a pack's gate, up and dy
/// before writing that pack's dgate and dup over the same places, so no thread reads what
/// another wrote. gu contiguous (a view from its buffer's start or not), dy `[rows, half]` at
/// offset zero in gu's dtype; None where the rows are not whole 16-byte packs on pack
/// boundaries (then nothing was written).
pub(super) fn packed_bwd_in_place(
    gu: &Tensor,
    dy: &Tensor,
    dots: bool,
) -> Result<Option<Option<Tensor>>> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::Storage;
    let candle_core::Device::Cuda(dev) = gu.device() else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    let (rows, two_i) = gu.dims2()?;
    let half = two_i / 2;
    let per_pack = 16 / gu.dtype().size_in_bytes();
    let off = gu.layout().start_offset();
    let whole = half % per_pack == 0 && off % per_pack == 0 && gu.is_contiguous();
    if !whole || rows == 0 || dy.dims2()? != (rows, half) || dy.dtype() != gu.dtype() {
        return Ok(None);
    }
    let suffix = match gu.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => return Ok(None),
    };
    let name = match dots {
        true => format!("swiglu_packed_bwd_dot_vec_{suffix}"),
        false => format!("swiglu_packed_bwd_vec_{suffix}"),
    };
    let func = dev.get_or_load_custom_func(&name, "moeq_swiglu", crate::ops::kernels::SWIGLU)?;
    let cfg = match dots {
        // 8 rows (warps) per block of 256 threads.
        true => LaunchConfig {
            grid_dim: (rows.div_ceil(8).min(1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        false => LaunchConfig::for_num_elems((rows * half / per_pack).min(1 << 30) as u32),
    };
    let dy = crate::ops::at_offset_zero(dy)?;
    let (sg, _) = gu.storage_and_layout();
    let (sd, _) = dy.storage_and_layout();
    let (Storage::Cuda(g), Storage::Cuda(d)) = (&*sg, &*sd) else {
        candle_core::bail!("swiglu_packed: not on CUDA")
    };
    // SAFETY: the kernel writes every row's dot.
    let dot = unsafe { dev.alloc::<f32>(if dots { rows } else { 1 })? };
    macro_rules! run {
        ($t:ty) => {{
            let gv = g.as_cuda_slice::<$t>()?.slice(off..off + rows * two_i);
            let dv = d.as_cuda_slice::<$t>()?.slice(0..rows * half);
            let mut b = func.builder();
            b.arg(&gv);
            b.arg(&dv);
            // dgu over gu: the same view as the input (see above).
            b.arg(&gv);
            if dots {
                b.arg(&dot);
            }
            b.arg(&rows);
            b.arg(&half);
            // SAFETY: arguments match kernels/swiglu.cu; every pack is read before its thread
            // writes it.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match gu.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(half::bf16),
        _ => run!(half::f16),
    }
    if !dots {
        return Ok(Some(None));
    }
    let dot = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(dot, dev.clone())),
        candle_core::Shape::from(rows),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok(Some(Some(dot)))
}
