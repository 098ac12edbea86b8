//! Many independent matrix products in one call: `C_g = α · op(A_g) · op(B_g)`, each operand a
//! row-major block of a flat buffer. On CUDA this is one cuBLAS grouped GEMM launch
//! (`cublasGemmGroupedBatchedEx`, f32 accumulation); on the CPU a loop of candle matmuls, which
//! is the reference the GPU path is checked against (`moeq gpu-check`).
//!
//! The expert projections use it with one product per expert over that expert's rows of a
//! token matrix sorted by expert (docs/ARCHITECTURE.md, "FLOPs and memory").

use candle_core::{bail, DType, Device, Result, Tensor};

/// One product in row-major terms: `C[m, n] = op(A)[m, k] · op(B)[k, n]`, where `op(A)` is A
/// stored `[m, k]`, or `[k, m]` transposed; likewise B (`[k, n]` or `[n, k]`). The offsets are
/// element offsets of each stored block in its flat buffer; rows are stored without padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// How every product of one call reads its operands.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// A is stored `[k, m]`.
    pub trans_a: bool,
    /// B is stored `[n, k]`.
    pub trans_b: bool,
    pub alpha: f64,
}

impl Gemm {
    /// `A · Bᵀ` (a token block times a weight stored `[out, in]`).
    pub fn nt(alpha: f64) -> Gemm {
        Gemm {
            trans_a: false,
            trans_b: true,
            alpha,
        }
    }

    /// `A · B`.
    pub fn nn(alpha: f64) -> Gemm {
        Gemm {
            trans_a: false,
            trans_b: false,
            alpha,
        }
    }

    /// `Aᵀ · B` (a weight gradient: rows of both operands summed over).
    pub fn tn(alpha: f64) -> Gemm {
        Gemm {
            trans_a: true,
            trans_b: false,
            alpha,
        }
    }
}

/// Checks that every product stays inside its buffers and that no two products write the same
/// elements of C (the CUDA path reads raw pointers, so this guards memory safety).
fn validate(products: &[Product], a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(products.len());
    for p in products {
        let fits = |off: usize, size: usize, len: usize| {
            off.checked_add(size).is_some_and(|end| end <= len)
        };
        if !fits(p.a, p.m * p.k, a_len) || !fits(p.b, p.k * p.n, b_len) {
            bail!("grouped_gemm: {p:?} reads outside its operands ({a_len}, {b_len} elements)");
        }
        if !fits(p.c, p.m * p.n, c_len) {
            bail!("grouped_gemm: {p:?} writes outside the {c_len}-element output");
        }
        if p.m * p.n > 0 {
            spans.push((p.c, p.c + p.m * p.n));
        }
    }
    spans.sort_unstable();
    if spans.windows(2).any(|w| w[1].0 < w[0].1) {
        bail!("grouped_gemm: two products write overlapping parts of the output");
    }
    Ok(())
}

/// `C` (flat, `c_len` elements, in the inputs' dtype) with every product written and every
/// element no product covers zero. `a` and `b` are flattened; both must have one dtype.
pub fn grouped_gemm(
    a: &Tensor,
    b: &Tensor,
    c_len: usize,
    products: &[Product],
    gemm: Gemm,
) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        bail!(
            "grouped_gemm: operands in {:?} and {:?}",
            a.dtype(),
            b.dtype()
        );
    }
    validate(products, a.elem_count(), b.elem_count(), c_len)?;
    let a = a.flatten_all()?.contiguous()?;
    let b = b.flatten_all()?.contiguous()?;
    match a.device() {
        Device::Cpu => cpu(&a, &b, c_len, products, gemm),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::grouped_gemm(&a, &b, c_len, products, gemm),
        _ => bail!("grouped_gemm: unsupported device"),
    }
}

/// `grouped_gemm` writing into `out` (flat, contiguous, the operands' dtype; CUDA only): the
/// products land at their offsets, elements no product covers keep their values. Lets a caller
/// assemble one output from several calls (the chunks of `ops::experts`) without a copy.
pub fn grouped_gemm_into(
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    products: &[Product],
    gemm: Gemm,
) -> Result<()> {
    if a.dtype() != b.dtype() || out.dtype() != a.dtype() {
        bail!(
            "grouped_gemm_into: operands in {:?} and {:?}, output in {:?}",
            a.dtype(),
            b.dtype(),
            out.dtype()
        );
    }
    if !out.is_contiguous() {
        bail!("grouped_gemm_into: the output must be contiguous");
    }
    validate(products, a.elem_count(), b.elem_count(), out.elem_count())?;
    let a = a.flatten_all()?.contiguous()?;
    let b = b.flatten_all()?.contiguous()?;
    match a.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::launch(out, &a, &b, products, gemm, 0.0),
        _ => {
            let _ = (b, gemm);
            bail!("grouped_gemm_into: CUDA only (the CPU reference is `grouped_gemm`)")
        }
    }
}

/// `out += α · op(a) · op(b)` for 2-D operands and a 2-D `out` that owns its contiguous buffer
/// (CUDA only): one cuBLAS call reading `out` as its C with β = 1, so the product is added
/// without a separate pass over `out` and rounded once.
pub fn accumulate(out: &Tensor, a: &Tensor, b: &Tensor, gemm: Gemm) -> Result<()> {
    let (m, n) = out.dims2()?;
    let (ar, ac) = a.dims2()?;
    let (br, bc) = b.dims2()?;
    let (am, k) = if gemm.trans_a { (ac, ar) } else { (ar, ac) };
    let (bk, bn) = if gemm.trans_b { (bc, br) } else { (br, bc) };
    if (am, bk, bn) != (m, k, n) || a.dtype() != b.dtype() || out.dtype() != a.dtype() {
        bail!(
            "accumulate: {:?} += {:?} · {:?} ({:?}) do not fit",
            out.dims(),
            a.dims(),
            b.dims(),
            gemm
        );
    }
    if out.layout().contiguous_offsets() != Some((0, m * n)) {
        bail!("accumulate: the output must own a contiguous buffer from offset 0");
    }
    let product = Product {
        a: 0,
        b: 0,
        c: 0,
        m,
        n,
        k,
    };
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    match a.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::launch(out, &a, &b, &[product], gemm, 1.0),
        _ => {
            let _ = (b, product);
            bail!("accumulate: CUDA only")
        }
    }
}

/// A flat output buffer of `len` elements for `grouped_gemm_into` whose every element will be
/// written (uninitialised on CUDA, zeros elsewhere).
pub fn output_for_products(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::uninit(len, dtype, device),
        _ => Tensor::zeros(len, dtype, device),
    }
}

/// Rows of the largest group below which CUDA's `grouped_outer` uses its own kernel.
pub const OUTER_KERNEL_ROWS: usize = 320;

/// Per-group products reduced over each group's rows, as the weight gradients of grouped LoRA
/// factors need: for each group `(e, first row, rows)`, block `e` of the output (`[E, r, n]`
/// flat, E = `num_experts`; blocks of experts without a group are zero) is
/// `alpha · R_gᵀ · X_g`, with R `[M, r]` and X `[M, n]` (one dtype) and R_g, X_g the group's
/// rows. CPU: these products through `grouped_gemm` (the reference); CUDA: the same for large
/// groups, and for small ones (all under `OUTER_KERNEL_ROWS` rows) one launch of
/// `kernels/lora.cu` `lora_outer` (cuBLAS's grouped GEMM runs these k = rows products as one
/// kernel per group, whose launches dominate when the groups are small).
pub fn grouped_outer(
    rm: &Tensor,
    x: &Tensor,
    groups: &[(usize, usize, usize)],
    num_experts: usize,
    alpha: f64,
) -> Result<Tensor> {
    let (m, r) = rm.dims2()?;
    let (mx, n) = x.dims2()?;
    let mut seen = vec![false; num_experts];
    let overlapping = groups
        .iter()
        .any(|&(e, _, _)| e < num_experts && std::mem::replace(&mut seen[e], true));
    if m != mx
        || m > u32::MAX as usize
        || rm.dtype() != x.dtype()
        || overlapping
        || groups
            .iter()
            .any(|&(e, first, rows)| e >= num_experts || first + rows > m)
    {
        bail!(
            "grouped_outer: R {:?} {:?}, X {:?} {:?}, groups beyond {num_experts} experts or {m} rows, or two for one expert",
            rm.dims(),
            rm.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    // The kernel wins where groups are small and cuBLAS's per-group launches dominate (≈ 128
    // rows per expert: +16% per training step with expert adapters at micro-batch 1); from
    // ≈ 512 rows per group cuBLAS's kernels are as fast or faster (−2% with the kernel at 512
    // and 1,024; launch/bench/NOTES.md item 33). The largest group decides: one block walks a
    // group's rows one after another, so one large group would hold up the kernel.
    #[cfg(feature = "cuda")]
    if rm.device().is_cuda() && groups.iter().all(|g| g.2 < OUTER_KERNEL_ROWS) {
        return cuda::grouped_outer(rm, x, groups, num_experts, alpha);
    }
    let products: Vec<Product> = groups
        .iter()
        .map(|&(e, first, rows)| Product {
            a: first * r,
            b: first * n,
            c: e * r * n,
            m: r,
            n,
            k: rows,
        })
        .collect();
    grouped_gemm(rm, x, num_experts * r * n, &products, Gemm::tn(alpha))
}

/// The reference: one candle matmul per product, assembled in output order with zeros between.
fn cpu(a: &Tensor, b: &Tensor, c_len: usize, products: &[Product], gemm: Gemm) -> Result<Tensor> {
    let block = |t: &Tensor, off: usize, rows: usize, cols: usize, trans: bool| -> Result<Tensor> {
        let s = t.narrow(0, off, rows * cols)?.reshape((rows, cols))?;
        if trans {
            s.t()
        } else {
            Ok(s)
        }
    };
    let mut order: Vec<&Product> = products.iter().filter(|p| p.m * p.n > 0).collect();
    order.sort_unstable_by_key(|p| p.c);
    let zeros = |n: usize| Tensor::zeros(n, a.dtype(), a.device());
    let mut parts = Vec::with_capacity(2 * order.len() + 1);
    let mut at = 0;
    for p in order {
        if p.c > at {
            parts.push(zeros(p.c - at)?);
        }
        let c = if p.k == 0 {
            zeros(p.m * p.n)?
        } else {
            let (ar, ac) = if gemm.trans_a { (p.k, p.m) } else { (p.m, p.k) };
            let (br, bc) = if gemm.trans_b { (p.n, p.k) } else { (p.k, p.n) };
            let prod = block(a, p.a, ar, ac, gemm.trans_a)?.matmul(&block(
                b,
                p.b,
                br,
                bc,
                gemm.trans_b,
            )?)?;
            (prod * gemm.alpha)?.flatten_all()?
        };
        parts.push(c);
        at = p.c + p.m * p.n;
    }
    if at < c_len {
        parts.push(zeros(c_len - at)?);
    }
    Tensor::cat(&parts, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
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
            let (Storage::Cuda(sr), Storage::Cuda(sx), Storage::Cuda(so)) = (&*sr, &*sx, &*so)
            else {
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

    /// One `cublasGemmGroupedBatchedEx` call writing the products into `out` (β = 0) or adding
    /// them to it (β = 1).
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
                let c = call(&live, gemm, beta, elem, (pa, pb, pc))?;
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
}
