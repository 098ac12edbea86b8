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

/// `y + α·p·op(q)` with one rounding to y's dtype: on CUDA inside the product (cuBLAS with
/// β = 1 on y's buffer, which the caller owns: no `[N, out]` product, scale or add pass), on
/// the CPU in f32 — the same arithmetic, so both devices round alike.
pub fn add_product(y: Tensor, p: &Tensor, q: &Tensor, gemm: Gemm) -> Result<Tensor> {
    if y.device().is_cuda() {
        let y = crate::ops::at_offset_zero(&y)?;
        accumulate(&y, p, q, gemm)?;
        return Ok(y);
    }
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let q = if gemm.trans_b { f32(q)?.t()? } else { f32(q)? };
    let prod = (f32(p)?.matmul(&q)? * gemm.alpha)?;
    (f32(&y)? + prod)?.to_dtype(y.dtype())
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
mod cuda;
#[cfg(feature = "cuda")]
pub mod sm90;
