//! The products of grouped LoRA — every one has a side of rank r — on tensor cores
//! (`kernels/grouped_lora.cu`), CUDA and bf16 only. cuBLAS's grouped GEMM runs these products
//! with tiles sized for large matrices: a rank-16 side fills a sixteenth of them, its weight
//! gradients (reduced over each expert's rows) become one kernel launch per expert, and every
//! update is added to the base projection by a separate pass. Here:
//! - `project`: `H = α · X · W_eᵀ` per group, W `[E, r, K]` (the hidden x·Aᵀ; dh through Bᵀ);
//! - `expand`: `Y (+)= α · H · V_eᵀ` per group, V `[E, N, r]`, added into Y in the same pass
//!   (the update on top of the base projection's output; dx through Aᵀ onto the base dx);
//! - `outer`: `D_e = α · R_eᵀ · X_e` over each group's rows (the factors' weight gradients).
//!
//! The CPU reference is the `grouped_gemm` formulation in `ops::experts` (candle matmuls);
//! `moeq gpu-check` compares both. `MOEQ_GROUPED_LORA=cublas` keeps the cuBLAS path (A/B).

use candle_core::{bail, DType, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Kernel launches so far in this process (gpu-check asserts its comparisons ran them).
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Largest rank the kernels take (zero-padded to 16, 32 or 64).
pub const MAX_RANK: usize = 64;

/// One grouping of rows sorted by expert — (expert, first row, rows) per non-empty group — as
/// the kernels' tables, uploaded once and shared by every product over it.
pub(crate) struct ThinPlan {
    groups: Vec<(usize, usize, usize)>,
    rows: usize,
    #[cfg(feature = "cuda")]
    tables: OnceLock<Tables>,
}

#[cfg(feature = "cuda")]
struct Tables {
    /// (expert, first row, rows ≤ 64) per row tile of `project` and `expand`.
    tiles: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    tile_count: usize,
    /// (first row, rows ≤ 256, workspace slot) per row chunk of `outer`.
    chunks: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    chunk_count: usize,
    /// (expert, first slot, slots) per group, for `outer`'s reduction.
    groups: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
}

/// Whether `MOEQ_GROUPED_LORA=cublas` asks for the cuBLAS path.
pub(crate) fn disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("MOEQ_GROUPED_LORA").is_ok_and(|v| v == "cublas"))
}

impl ThinPlan {
    /// `groups`: (expert, first row, rows), rows contiguous from 0 in group order.
    pub(crate) fn new(groups: Vec<(usize, usize, usize)>) -> ThinPlan {
        let groups: Vec<_> = groups.into_iter().filter(|g| g.2 > 0).collect();
        let rows = groups.last().map_or(0, |g| g.1 + g.2);
        ThinPlan {
            groups,
            rows,
            #[cfg(feature = "cuda")]
            tables: OnceLock::new(),
        }
    }

    /// Whether the kernels take products over these rows of `x` at rank `r` with the other
    /// sides `dims` long: CUDA, bf16, r a multiple of 8 up to `MAX_RANK`, every side a
    /// multiple of 8 (16-byte rows), row indices within u32.
    pub(crate) fn applies(&self, x: &Tensor, r: usize, dims: &[usize]) -> bool {
        x.device().is_cuda()
            && x.dtype() == DType::BF16
            && !disabled()
            && r > 0
            && r <= MAX_RANK
            && r % 8 == 0
            && dims.iter().all(|&d| d > 0 && d % 8 == 0)
            && self.rows < u32::MAX as usize
    }
}

/// `H [M, r] = α · X · W_eᵀ` over each group's rows; X `[M, K]`, W `[E, r, K]`.
pub(crate) fn project(x: &Tensor, w: &Tensor, plan: &ThinPlan, alpha: f64) -> Result<Tensor> {
    project_to(x, w, plan, alpha, None)
}

/// `project` written into `into`, an `[M, r]` view of rows (`row_layout`: e.g. the last r
/// columns of the `[M, K + r]` buffer whose first K columns are X) — returned.
pub(crate) fn project_into(
    x: &Tensor,
    w: &Tensor,
    plan: &ThinPlan,
    alpha: f64,
    into: &Tensor,
) -> Result<Tensor> {
    project_to(x, w, plan, alpha, Some(into))
}

fn project_to(
    x: &Tensor,
    w: &Tensor,
    plan: &ThinPlan,
    alpha: f64,
    into: Option<&Tensor>,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (e, r, kw) = w.dims3()?;
    check(plan, m, e, "project")?;
    if kw != k || x.dtype() != w.dtype() {
        bail!("thin_gemm project: X {:?} and W {:?}", x.dims(), w.dims());
    }
    if let Some(h) = into {
        if h.dims2()? != (m, r) || h.dtype() != x.dtype() || row_layout(h).is_none() {
            bail!("thin_gemm project: output {:?} for {m} × {r}", h.dims());
        }
    }
    #[cfg(feature = "cuda")]
    {
        cuda::project(x, w, plan, (m, k, r), alpha, into)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (r, alpha);
        bail!("thin_gemm: CUDA only")
    }
}

/// (offset of the first element, row stride) of a 2-D tensor whose rows the kernels can read
/// and write in place: unit column stride, both counts multiples of 8 (16-byte aligned rows
/// of bf16). A contiguous `[M, N]` from offset 0 gives (0, N); the last columns of a wider
/// buffer (`narrow` along dim 1) give their start and the buffer's row length.
pub(crate) fn row_layout(t: &Tensor) -> Option<(usize, usize)> {
    let (m, c) = t.dims2().ok()?;
    let l = t.layout();
    let (stride, off) = (l.stride(), l.start_offset());
    let ld = if m <= 1 { c } else { stride[0] };
    let unit = c <= 1 || stride[1] == 1;
    (unit && ld >= c && ld % 8 == 0 && off % 8 == 0).then_some((off, ld))
}

/// `α · H · V_eᵀ` over each group's rows, H `[M, r]`, V `[E, N, r]`: added into `into`
/// (`[M, N]`, a buffer this call may write, returned) or as a new `[M, N]`.
pub(crate) fn expand(
    h: &Tensor,
    v: &Tensor,
    plan: &ThinPlan,
    alpha: f64,
    into: Option<Tensor>,
) -> Result<Tensor> {
    let (m, r) = h.dims2()?;
    let (e, n, rv) = v.dims3()?;
    check(plan, m, e, "expand")?;
    if rv != r || h.dtype() != v.dtype() {
        bail!("thin_gemm expand: H {:?} and V {:?}", h.dims(), v.dims());
    }
    if let Some(y) = &into {
        if y.dims2()? != (m, n) || y.dtype() != h.dtype() {
            bail!("thin_gemm expand: output {:?} for {m} × {n}", y.dims());
        }
    }
    #[cfg(feature = "cuda")]
    {
        cuda::expand(h, v, plan, (m, n, r), alpha, into)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (n, alpha, into);
        bail!("thin_gemm: CUDA only")
    }
}

/// `D [E, r, N]`: block e is `α · R_eᵀ · X_e` over group e's rows (zeros for experts without
/// rows); R `[M, r]`, X `[M, N]`.
pub(crate) fn outer(
    rm: &Tensor,
    x: &Tensor,
    plan: &ThinPlan,
    num_experts: usize,
    alpha: f64,
) -> Result<Tensor> {
    let (m, r) = rm.dims2()?;
    let (mx, n) = x.dims2()?;
    check(plan, m, num_experts, "outer")?;
    if mx != m || rm.dtype() != x.dtype() {
        bail!("thin_gemm outer: R {:?} and X {:?}", rm.dims(), x.dims());
    }
    #[cfg(feature = "cuda")]
    {
        cuda::outer(rm, x, plan, (num_experts, r, n), alpha)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (r, n, alpha);
        bail!("thin_gemm: CUDA only")
    }
}

/// The plan covers exactly `m` rows and names experts below `e` (the kernels index raw memory).
fn check(plan: &ThinPlan, m: usize, e: usize, what: &str) -> Result<()> {
    if plan.rows != m || plan.groups.iter().any(|g| g.0 >= e) {
        bail!(
            "thin_gemm {what}: a plan of {} rows over experts up to {:?} for {m} rows and {e} experts",
            plan.rows,
            plan.groups.iter().map(|g| g.0).max()
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Tables, ThinPlan};

    /// Rows per tile of `project` and `expand` (kernels/grouped_lora.cu `BM`).
    const TILE_ROWS: usize = 64;
    /// Rows per partial sum of `outer` (8 of its 32-row steps).
    const CHUNK_ROWS: usize = 256;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{bail, DType, Result, Storage, Tensor};
    use half::bf16;

    fn device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            candle_core::Device::Cuda(d) => Ok(d.clone()),
            _ => bail!("thin_gemm: not a CUDA tensor"),
        }
    }

    impl ThinPlan {
        fn tables(&self, dev: &CudaDevice) -> Result<&Tables> {
            if let Some(t) = self.tables.get() {
                return Ok(t);
            }
            let mut tiles = Vec::new();
            for &(e, first, rows) in &self.groups {
                for start in (0..rows).step_by(TILE_ROWS) {
                    let n = (rows - start).min(TILE_ROWS);
                    tiles.extend([e as u32, (first + start) as u32, n as u32]);
                }
            }
            let (mut chunks, mut groups) = (Vec::new(), Vec::new());
            for &(e, first, rows) in &self.groups {
                let slot = chunks.len() / 3;
                for start in (0..rows).step_by(CHUNK_ROWS) {
                    let n = (rows - start).min(CHUNK_ROWS);
                    chunks.extend([(first + start) as u32, n as u32, (chunks.len() / 3) as u32]);
                }
                groups.extend([e as u32, slot as u32, (chunks.len() / 3 - slot) as u32]);
            }
            let t = Tables {
                tile_count: tiles.len() / 3,
                tiles: dev.clone_htod(&tiles)?,
                chunk_count: chunks.len() / 3,
                chunks: dev.clone_htod(&chunks)?,
                groups: dev.clone_htod(&groups)?,
            };
            Ok(self.tables.get_or_init(|| t))
        }
    }

    /// The kernel width for rank r: 16, 32 or 64.
    fn padded(r: usize) -> usize {
        match r {
            0..=16 => 16,
            17..=32 => 32,
            _ => 64,
        }
    }

    fn bf16_slice<'a>(s: &'a candle_core::CudaStorage, what: &str) -> Result<&'a CudaSlice<bf16>> {
        match &s.slice {
            candle_core::cuda_backend::CudaStorageSlice::BF16(v) => Ok(v),
            _ => bail!("thin_gemm {what}: bf16 only"),
        }
    }

    fn uninit(dev: &CudaDevice, len: usize) -> Result<Tensor> {
        if len == 0 {
            return Tensor::zeros(0, DType::BF16, &candle_core::Device::Cuda(dev.clone()));
        }
        // SAFETY: the kernels write every element of the outputs made with this.
        let out = unsafe { dev.alloc::<bf16>(len)? };
        Ok(Tensor::from_storage(
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())),
            len,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    fn cfg(grid: (u32, u32)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// t with (offset, row stride) the kernels read it at: in place where `row_layout` allows,
    /// else a contiguous copy from offset 0.
    fn rows_of(t: &Tensor) -> Result<(Tensor, usize, usize)> {
        if let Some((off, ld)) = super::row_layout(t) {
            return Ok((t.clone(), off, ld));
        }
        let t = crate::ops::at_offset_zero(t)?;
        let c = t.dim(1)?;
        Ok((t, 0, c))
    }

    pub(super) fn project(
        x: &Tensor,
        w: &Tensor,
        plan: &ThinPlan,
        (m, k, r): (usize, usize, usize),
        alpha: f64,
        into: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dev = device(x)?;
        let out = match into {
            Some(h) => h.clone(),
            None => uninit(&dev, m * r)?.reshape((m, r))?,
        };
        let t = plan.tables(&dev)?;
        if t.tile_count > 0 {
            let ((x, xo, ldx), w) = (rows_of(x)?, crate::ops::at_offset_zero(w)?);
            let Some((oo, ldh)) = super::row_layout(&out) else {
                bail!("thin_gemm project: the output's rows are not in place")
            };
            let (sx, _) = x.storage_and_layout();
            let (sw, _) = w.storage_and_layout();
            let (so, _) = out.storage_and_layout();
            let (Storage::Cuda(sx), Storage::Cuda(sw), Storage::Cuda(so)) = (&*sx, &*sw, &*so)
            else {
                bail!("thin_gemm project: operands not on the GPU")
            };
            let name = format!("lora_project_r{}", padded(r));
            let func = dev.get_or_load_custom_func(
                &name,
                "moeq_grouped_lora",
                crate::ops::kernels::GROUPED_LORA,
            )?;
            let (ki, ri, a) = (k as i32, r as i32, alpha as f32);
            let (ldx, ldh) = (ldx as i32, ldh as i32);
            let xv = bf16_slice(sx, "project")?.slice(xo..);
            let ov = bf16_slice(so, "project")?.slice(oo..);
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(bf16_slice(sw, "project")?);
            b.arg(&t.tiles);
            b.arg(&ov);
            b.arg(&ki);
            b.arg(&ri);
            b.arg(&a);
            b.arg(&ldx);
            b.arg(&ldh);
            // SAFETY: `super::project` checked the shapes, the plan's rows and experts against
            // them; `applies` the rank and the 16-byte rows, `row_layout` the rows' alignment
            // and strides; arguments as in the kernel.
            unsafe { b.launch(cfg((t.tile_count as u32, 1))) }.w()?;
            super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(out)
    }

    pub(super) fn expand(
        h: &Tensor,
        v: &Tensor,
        plan: &ThinPlan,
        (m, n, r): (usize, usize, usize),
        alpha: f64,
        into: Option<Tensor>,
    ) -> Result<Tensor> {
        let dev = device(h)?;
        let accumulate = into.is_some();
        let out = match into {
            Some(y) if y.layout().contiguous_offsets() == Some((0, m * n)) => y,
            Some(y) => y.force_contiguous()?,
            None => uninit(&dev, m * n)?,
        };
        let t = plan.tables(&dev)?;
        if t.tile_count > 0 {
            let (h, v) = (
                crate::ops::at_offset_zero(h)?,
                crate::ops::at_offset_zero(v)?,
            );
            let (sh, _) = h.storage_and_layout();
            let (sv, _) = v.storage_and_layout();
            let (so, _) = out.storage_and_layout();
            let (Storage::Cuda(sh), Storage::Cuda(sv), Storage::Cuda(so)) = (&*sh, &*sv, &*so)
            else {
                bail!("thin_gemm expand: operands not on the GPU")
            };
            let kind = if accumulate { "expand_add" } else { "expand" };
            let name = format!("lora_{kind}_r{}", padded(r));
            let func = dev.get_or_load_custom_func(
                &name,
                "moeq_grouped_lora",
                crate::ops::kernels::GROUPED_LORA,
            )?;
            let (ni, ri, a) = (n as i32, r as i32, alpha as f32);
            let mut b = func.builder();
            b.arg(bf16_slice(sh, "expand")?);
            b.arg(bf16_slice(sv, "expand")?);
            b.arg(&t.tiles);
            b.arg(bf16_slice(so, "expand")?);
            b.arg(&ni);
            b.arg(&ri);
            b.arg(&a);
            // SAFETY: as in `project`; the output is [m, n] contiguous from offset 0.
            unsafe { b.launch(cfg((t.tile_count as u32, n.div_ceil(128) as u32))) }.w()?;
            super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out.reshape((m, n))
    }

    pub(super) fn outer(
        rm: &Tensor,
        x: &Tensor,
        plan: &ThinPlan,
        (e, r, n): (usize, usize, usize),
        alpha: f64,
    ) -> Result<Tensor> {
        let dev = device(rm)?;
        // Experts without rows keep these zeros.
        let out = Tensor::zeros(e * r * n, DType::BF16, rm.device())?;
        let t = plan.tables(&dev)?;
        let groups = plan.groups.len();
        if groups > 0 {
            let ((rm, ro, ldr), (x, xo, ldx)) = (rows_of(rm)?, rows_of(x)?);
            // SAFETY: the outer kernel writes every chunk's [r, n] partial before the
            // reduction reads it (same stream).
            let partial = unsafe { dev.alloc::<f32>(t.chunk_count * r * n)? };
            let (sr, _) = rm.storage_and_layout();
            let (sx, _) = x.storage_and_layout();
            let (so, _) = out.storage_and_layout();
            let (Storage::Cuda(sr), Storage::Cuda(sx), Storage::Cuda(so)) = (&*sr, &*sx, &*so)
            else {
                bail!("thin_gemm outer: operands not on the GPU")
            };
            let load = |name: &str| {
                dev.get_or_load_custom_func(
                    name,
                    "moeq_grouped_lora",
                    crate::ops::kernels::GROUPED_LORA,
                )
            };
            let func = load(&format!("lora_outer_mma_r{}", padded(r)))?;
            let (ri, ni, a) = (r as i32, n as i32, alpha as f32);
            let (ldr, ldx) = (ldr as i32, ldx as i32);
            let (rv, xv) = (
                bf16_slice(sr, "outer")?.slice(ro..),
                bf16_slice(sx, "outer")?.slice(xo..),
            );
            let mut b = func.builder();
            b.arg(&rv);
            b.arg(&xv);
            b.arg(&t.chunks);
            b.arg(&partial);
            b.arg(&ri);
            b.arg(&ni);
            b.arg(&ldr);
            b.arg(&ldx);
            // SAFETY: as in `project`; the workspace holds chunk_count × r × n f32.
            unsafe { b.launch(cfg((t.chunk_count as u32, n.div_ceil(128) as u32))) }.w()?;
            let func = load("lora_outer_reduce")?;
            let mut b = func.builder();
            b.arg(&partial);
            b.arg(&t.groups);
            b.arg(bf16_slice(so, "outer")?);
            b.arg(&ri);
            b.arg(&ni);
            b.arg(&a);
            // SAFETY: r·n is a multiple of 8 (`applies`), so the float4 reads and bf16 pair
            // writes stay inside each [r, n] block; the output is a fresh [e, r, n].
            let blocks = (r * n).div_ceil(512).min(64) as u32;
            unsafe { b.launch(cfg((blocks, groups as u32))) }.w()?;
            super::LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out.reshape((e, r, n))
    }
}
