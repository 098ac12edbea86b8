//! The CUDA side of `grouped_gemm`: cuBLAS's grouped GEMM, the adapters' outer-product
//! kernel, and the dispatch to the Hopper kernel (`super::sm90`) where it applies.

use super::{Gemm, Product};
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::cublas::sys;
use cudarc::driver::DevicePtr;

/// Pointers into the three buffers and the per-group arguments of one cuBLAS call, in its
/// column-major terms: row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`,
/// so cuBLAS's first operand is our B and its second our A.
struct Call {
    transa: Vec<sys::cublasOperation_t>,
    transb: Vec<sys::cublasOperation_t>,
    m: Vec<i32>,
    n: Vec<i32>,
    k: Vec<i32>,
    lda: Vec<i32>,
    ldb: Vec<i32>,
    ldc: Vec<i32>,
    alpha: Vec<f32>,
    beta: Vec<f32>,
    ptrs: Vec<u64>,
}

fn dim(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("grouped_gemm: {v} > i32")))
}

fn call(
    products: &[&Product],
    gemm: Gemm,
    beta: f32,
    elem: usize,
    base: (u64, u64, u64),
) -> Result<Call> {
    use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let g = products.len();
    let mut c = Call {
        transa: vec![
            if gemm.trans_b {
                CUBLAS_OP_T
            } else {
                CUBLAS_OP_N
            };
            g
        ],
        transb: vec![
            if gemm.trans_a {
                CUBLAS_OP_T
            } else {
                CUBLAS_OP_N
            };
            g
        ],
        m: Vec::with_capacity(g),
        n: Vec::with_capacity(g),
        k: Vec::with_capacity(g),
        lda: Vec::with_capacity(g),
        ldb: Vec::with_capacity(g),
        ldc: Vec::with_capacity(g),
        alpha: vec![gemm.alpha as f32; g],
        beta: vec![beta; g],
        ptrs: vec![0; 3 * g],
    };
    for (i, p) in products.iter().enumerate() {
        c.m.push(dim(p.n)?);
        c.n.push(dim(p.m)?);
        c.k.push(dim(p.k)?);
        // Leading dimension = the stored row length of each row-major block.
        c.lda.push(dim(if gemm.trans_b { p.k } else { p.n })?);
        c.ldb.push(dim(if gemm.trans_a { p.m } else { p.k })?);
        c.ldc.push(dim(p.n)?);
        c.ptrs[i] = base.1 + (p.b * elem) as u64;
        c.ptrs[g + i] = base.0 + (p.a * elem) as u64;
        c.ptrs[2 * g + i] = base.2 + (p.c * elem) as u64;
    }
    Ok(c)
}

/// `super::grouped_outer` on CUDA: `lora_outer` over all groups in one launch.
pub(super) fn grouped_outer(
    rm: &Tensor,
    x: &Tensor,
    groups: &[(usize, usize, usize)],
    num_experts: usize,
    alpha: f64,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let candle_core::Device::Cuda(dev) = rm.device() else {
        bail!("grouped_outer: not a CUDA tensor")
    };
    let (r, n) = (rm.dim(1)?, x.dim(1)?);
    let out = Tensor::zeros(num_experts * r * n, rm.dtype(), rm.device())?;
    let live: Vec<u32> = groups
        .iter()
        .filter(|g| g.2 > 0)
        .flat_map(|&(e, first, rows)| [e as u32, first as u32, rows as u32])
        .collect();
    if live.is_empty() || r == 0 || n == 0 {
        return Ok(out);
    }
    let (rm, x) = (rm.contiguous()?, x.contiguous()?);
    let table = dev.clone_htod(&live)?;
    let suffix = match rm.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("grouped_outer: {other:?} not supported on CUDA"),
    };
    let func = dev.get_or_load_custom_func(
        &format!("lora_outer_{suffix}"),
        "moeq_lora",
        crate::ops::kernels::LORA,
    )?;
    // Matches kernels/lora.cu: OUTER_COLS columns and OUTER_RANK of r per block.
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(128) as u32,
            (live.len() / 3) as u32,
            r.div_ceil(16) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ri, ni, a) = (r as i32, n as i32, alpha as f32);
    {
        let (sr, lr) = rm.storage_and_layout();
        let (sx, lx) = x.storage_and_layout();
        let (so, _) = out.storage_and_layout();
        let (Storage::Cuda(sr), Storage::Cuda(sx), Storage::Cuda(so)) = (&*sr, &*sx, &*so) else {
            bail!("grouped_outer: operands not on the GPU")
        };
        macro_rules! run {
            ($t:ty) => {{
                let vr = sr.as_cuda_slice::<$t>()?.slice(lr.start_offset()..);
                let vx = sx.as_cuda_slice::<$t>()?.slice(lx.start_offset()..);
                let vo = so.as_cuda_slice::<$t>()?;
                let mut b = func.builder();
                b.arg(&vr);
                b.arg(&vx);
                b.arg(&table);
                // The kernel writes the groups' blocks of `out`, a fresh buffer.
                b.arg(vo);
                b.arg(&ri);
                b.arg(&ni);
                b.arg(&a);
                // SAFETY: arguments match kernels/lora.cu; `super::grouped_outer` checked that
                // every group's rows lie in R and X and every expert block in `out`.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match rm.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            other => bail!("grouped_outer: {other:?} not supported on CUDA"),
        }
    }
    Ok(out)
}

/// Flat uninitialised memory of `len` elements on the CUDA `device`.
pub(super) fn uninit(len: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = device else {
        bail!("grouped_gemm: not a CUDA device")
    };
    macro_rules! alloc {
        ($t:ty) => {{
            // SAFETY: callers write every element before reading any.
            let out = unsafe { dev.alloc::<$t>(len)? };
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let storage = match dtype {
        DType::BF16 => alloc!(half::bf16),
        DType::F16 => alloc!(half::f16),
        DType::F32 => alloc!(f32),
        other => bail!("grouped_gemm: {other:?} not supported on CUDA"),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        len,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

pub(super) fn grouped_gemm(
    a: &Tensor,
    b: &Tensor,
    c_len: usize,
    products: &[Product],
    gemm: Gemm,
) -> Result<Tensor> {
    let covered: usize = products
        .iter()
        .filter(|p| p.m * p.n * p.k > 0)
        .map(|p| p.m * p.n)
        .sum();
    // Every element no product writes must read as zero (products never overlap: validate).
    let out = if covered == c_len {
        uninit(c_len, a.dtype(), a.device())?
    } else {
        Tensor::zeros(c_len, a.dtype(), a.device())?
    };
    launch(&out, a, b, products, gemm, 0.0)?;
    Ok(out)
}

/// One grouped GEMM launch writing the products into `out` (β = 0) or adding them to it
/// (β = 1): the Hopper kernel where `sm90::applies`, else `cublasGemmEx` for one product and
/// `cublasGemmGroupedBatchedEx` for several.
pub(super) fn launch(
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    products: &[Product],
    gemm: Gemm,
    beta: f32,
) -> Result<()> {
    let dev = match a.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("grouped_gemm: not a CUDA tensor"),
    };
    let live: Vec<&Product> = products.iter().filter(|p| p.m * p.n * p.k > 0).collect();
    if live.is_empty() {
        return Ok(());
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (so, lo) = out.storage_and_layout();
    let (Storage::Cuda(sa), Storage::Cuda(sb), Storage::Cuda(so)) = (&*sa, &*sb, &*so) else {
        bail!("grouped_gemm: operands not on the GPU")
    };
    let stream = dev.cuda_stream();
    macro_rules! run {
        ($t:ty, $data_type:expr) => {{
            let elem = std::mem::size_of::<$t>();
            let va = sa.as_cuda_slice::<$t>()?.slice(la.start_offset()..);
            let vb = sb.as_cuda_slice::<$t>()?.slice(lb.start_offset()..);
            let vo = so.as_cuda_slice::<$t>()?.slice(lo.start_offset()..);
            let (pa, _ga) = va.device_ptr(&stream);
            let (pb, _gb) = vb.device_ptr(&stream);
            // cuBLAS writes through this pointer; the buffer is `out`'s, which the caller
            // handed over for writing (a fresh buffer, or one it assembles from calls).
            let (pc, _gc) = vo.device_ptr(&stream);
            if super::sm90::applies(&dev, &live, gemm, beta, a.dtype(), (pa, pb, pc)) {
                return super::sm90::launch(&dev, &live, gemm, (pa, pb, pc));
            }
            let c = call(&live, gemm, beta, elem, (pa, pb, pc))?;
            if live.len() == 1 {
                // One product: cuBLAS's plain GEMM (its Hopper kernels); the grouped API runs
                // an sm80 kernel at about half their rate (the β = 1 accumulations of the
                // layer backward: launch/bench/NOTES.md item 44).
                let blas = dev.cublas_handle();
                // SAFETY: `validate` checked the block against its buffers; the scalars are
                // read during the call.
                let status = unsafe {
                    sys::cublasGemmEx(
                        *blas.handle(),
                        c.transa[0],
                        c.transb[0],
                        c.m[0],
                        c.n[0],
                        c.k[0],
                        c.alpha.as_ptr() as *const _,
                        c.ptrs[0] as *const core::ffi::c_void,
                        $data_type,
                        c.lda[0],
                        c.ptrs[1] as *const core::ffi::c_void,
                        $data_type,
                        c.ldb[0],
                        c.beta.as_ptr() as *const _,
                        c.ptrs[2] as *mut core::ffi::c_void,
                        $data_type,
                        c.ldc[0],
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    bail!("grouped_gemm: cublasGemmEx failed: {status:?}");
                }
                return Ok(());
            }
            let table = dev.clone_htod(&c.ptrs)?;
            let (pt, _gt) = table.device_ptr(&stream);
            let g = live.len();
            let group_size = vec![1i32; g];
            let blas = dev.cublas_handle();
            // SAFETY: `validate` checked every block against its buffer; the host arrays
            // outlive the call, and the pointer table is freed in stream order.
            let status = unsafe {
                sys::cublasGemmGroupedBatchedEx(
                    *blas.handle(),
                    c.transa.as_ptr(),
                    c.transb.as_ptr(),
                    c.m.as_ptr(),
                    c.n.as_ptr(),
                    c.k.as_ptr(),
                    c.alpha.as_ptr() as *const _,
                    pt as *const *const core::ffi::c_void,
                    $data_type,
                    c.lda.as_ptr(),
                    (pt + (8 * g) as u64) as *const *const core::ffi::c_void,
                    $data_type,
                    c.ldb.as_ptr(),
                    c.beta.as_ptr() as *const _,
                    (pt + (16 * g) as u64) as *const *mut core::ffi::c_void,
                    $data_type,
                    c.ldc.as_ptr(),
                    g as i32,
                    group_size.as_ptr(),
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            };
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                bail!("grouped_gemm: cublasGemmGroupedBatchedEx failed: {status:?}");
            }
        }};
    }
    match a.dtype() {
        DType::BF16 => run!(half::bf16, sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => run!(half::f16, sys::cudaDataType_t::CUDA_R_16F),
        DType::F32 => run!(f32, sys::cudaDataType_t::CUDA_R_32F),
        other => bail!("grouped_gemm: {other:?} not supported on CUDA"),
    }
    Ok(())
}
